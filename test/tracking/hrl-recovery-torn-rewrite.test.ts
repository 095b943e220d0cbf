import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { HRL_ME_CHECKSUM_OFFSET, HRL_ME_DATA_CHECKSUM_OFFSET, HRL_ME_TIMESTAMP_OFFSET, computeHrlMetadataEntryChecksum, hrlChecksum } from '../../src/tracking/hrl-format';
import { HrlLogFile, type HrlLogEntry } from '../../src/tracking/hrl-reader';
import { recoverHrlLog } from '../../src/tracking/hrl-recovery';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { prng } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const MS = 128; // 3 entries per block: a dozen writes make several blocks
const SECTOR = 512;

function payload(i: number, length: number): Buffer {
  const b = Buffer.alloc(length, (i * 37 + 11) & 0xff);
  b.writeUInt32LE(i, 0);
  return b;
}

/** Entries of a sealed (verifying) log, with their payloads. */
async function sealedEntries(file: string): Promise<{ entry: HrlLogEntry; data: Buffer }[]> {
  const log = await HrlLogFile.open(file);
  try {
    const v = await log.verify();
    const out: { entry: HrlLogEntry; data: Buffer }[] = [];
    for await (const e of log.entries(v)) out.push({ entry: e, data: await log.readPayload(e, 0, e.dataLength) });
    return out;
  } finally {
    await log.close();
  }
}

interface Fixture {
  readonly dir: string;
  /** The unsealed log as a crash after its last flush leaves it. */
  readonly bytes: Buffer;
  /** durableEndBytes after the first flushes: the bound a tracker would persist. */
  readonly boundBytes: number;
  /** Entries (file positions in `bytes`) and payloads, in apply order. */
  readonly entries: { entry: HrlLogEntry; data: Buffer }[];
}

/** Nine writes flushed (the bound), then three more flushed: four blocks after the anchor. */
async function fixture(): Promise<Fixture> {
  const dir = tempDir();
  const file = path.join(dir, 'open.hrl');
  const w = await HrlWriter.create(file, { metadataSizeBytes: MS });
  for (let i = 0; i < 9; i++) await w.append(i * 4096, payload(i, 600 + i * 10));
  await w.flush();
  const boundBytes = w.durableEndBytes;
  for (let i = 9; i < 12; i++) await w.append(i * 4096, payload(i, 600 + i * 10));
  await w.flush();
  await w.close();
  const bytes = fs.readFileSync(file);
  const copy = path.join(dir, 'reference.hrl');
  fs.writeFileSync(copy, bytes);
  await recoverHrlLog(copy);
  const entries = await sealedEntries(copy);
  expect(entries).toHaveLength(12);
  return { dir, bytes, boundBytes, entries };
}

/**
 * What a torn in-place rewrite of entry `e` with `next` may leave: the new
 * payload's first `sectors` sectors (counted from the payload start) and
 * the old entry, or the new entry (DataChecksum of `next`) when `newEntry`.
 */
function tearRewrite(bytes: Buffer, e: HrlLogEntry, next: Buffer, sectors: number, newEntry: boolean): void {
  next.copy(bytes, e.payloadFileOffset, 0, Math.min(next.length, sectors * SECTOR));
  if (newEntry) {
    bytes.writeUInt32LE(hrlChecksum(next), e.entryFileOffset + HRL_ME_DATA_CHECKSUM_OFFSET);
    bytes.writeUInt32LE(bytes.readUInt32LE(e.entryFileOffset + HRL_ME_TIMESTAMP_OFFSET) + 60, e.entryFileOffset + HRL_ME_TIMESTAMP_OFFSET);
    bytes.writeUInt32LE(computeHrlMetadataEntryChecksum(bytes, e.entryFileOffset), e.entryFileOffset + HRL_ME_CHECKSUM_OFFSET);
  }
}

async function recoverCopy(f: Fixture, name: string, bytes: Buffer, options: Parameters<typeof recoverHrlLog>[1] = {}): Promise<{ rec: Awaited<ReturnType<typeof recoverHrlLog>>; file: string }> {
  const file = path.join(f.dir, name);
  fs.writeFileSync(file, bytes);
  return { rec: await recoverHrlLog(file, options), file };
}

describe('recovery of a log with torn in-place rewrites', () => {
  it('keeps every block when a payload below the bound was torn by a rewrite, reports the entry, and seals a log that verifies', async () => {
    const f = await fixture();
    const e = f.entries[1]!.entry; // in the first block after the anchor
    for (const [sectors, newEntry] of [[1, false], [0, true], [1, true]] as const) {
      const bytes = Buffer.from(f.bytes);
      tearRewrite(bytes, e, Buffer.alloc(e.dataLength, 0xee), sectors, newEntry);
      for (const hints of [[], [f.bytes.length], [f.boundBytes]]) {
        const { rec, file } = await recoverCopy(f, `torn-${sectors}-${newEntry}-${hints.join('-')}.hrl`, bytes, { rewritableBelowBytes: f.boundBytes, hintEndBytes: hints });
        const what = `sectors ${sectors}, new entry ${newEntry}, hints ${hints}`;
        expect(rec.entryCount, what).toBe(12);
        expect(rec.durableEndBytes, what).toBe(f.bytes.length);
        expect(rec.tornEntries.map((t) => [t.byteOffset, t.dataLength, t.entryFileOffset, t.payloadFileOffset]), what).toEqual([[e.byteOffset, e.dataLength, e.entryFileOffset, e.payloadFileOffset]]);
        const got = await sealedEntries(file); // verify() passes: the torn entry's checksums were rewritten
        expect(got.map((g) => g.entry.byteOffset)).toEqual(f.entries.map((x) => x.entry.byteOffset));
        for (let i = 0; i < 12; i++) {
          // The torn entry holds the bytes present; every other entry is untouched.
          const want = i === 1 ? bytes.subarray(e.payloadFileOffset, e.payloadFileOffset + e.dataLength) : f.entries[i]!.data;
          expect(got[i]!.data.equals(want), `${what}: entry ${i}`).toBe(true);
        }
      }
    }
  });

  it('cuts the log at a torn rewrite when no bound is given (the strict reading that would lose later flushed blocks)', async () => {
    const f = await fixture();
    const e = f.entries[1]!.entry;
    const bytes = Buffer.from(f.bytes);
    tearRewrite(bytes, e, Buffer.alloc(e.dataLength, 0xee), 1, false);
    const { rec } = await recoverCopy(f, 'strict.hrl', bytes);
    expect(rec.entryCount).toBe(0);
    expect(rec.tornEntries).toEqual([]);
  });

  it('stays strict past the bound: a bad payload in a block ending after it is a torn tail, not a torn rewrite', async () => {
    const f = await fixture();
    const e = f.entries[10]!.entry; // in the last block, past the bound
    const bytes = Buffer.from(f.bytes);
    tearRewrite(bytes, e, Buffer.alloc(e.dataLength, 0xee), 1, true);
    for (const hints of [[], [f.bytes.length], [f.boundBytes]]) {
      const { rec, file } = await recoverCopy(f, `past-${hints.join('-')}.hrl`, bytes, { rewritableBelowBytes: f.boundBytes, hintEndBytes: hints });
      expect(rec.entryCount, `hints ${hints}`).toBe(9);
      expect(rec.durableEndBytes).toBe(f.boundBytes);
      expect(rec.tornEntries).toEqual([]);
      expect((await sealedEntries(file)).map((g) => g.data)).toEqual(f.entries.slice(0, 9).map((x) => x.data));
    }
  });

  it('tolerates a block ending exactly at the bound and not one ending a byte past it', async () => {
    const f = await fixture();
    const e = f.entries[8]!.entry; // in the block that ends at the bound
    const bytes = Buffer.from(f.bytes);
    tearRewrite(bytes, e, Buffer.alloc(e.dataLength, 0xee), 1, false);
    expect((await recoverCopy(f, 'at.hrl', bytes, { rewritableBelowBytes: f.boundBytes })).rec.entryCount).toBe(12);
    expect((await recoverCopy(f, 'below.hrl', bytes, { rewritableBelowBytes: f.boundBytes - 1 })).rec.entryCount).toBe(6);
  });

  it('still ends the log at a damaged entry below the bound (an entry rewrite is one sector write, never torn)', async () => {
    const f = await fixture();
    const bytes = Buffer.from(f.bytes);
    bytes[f.entries[4]!.entry.entryFileOffset + 3]! ^= 0x40; // ByteOffset changed, checksum not
    const { rec } = await recoverCopy(f, 'bad-entry.hrl', bytes, { rewritableBelowBytes: f.boundBytes });
    expect(rec.entryCount).toBe(3);
    expect(rec.tornEntries).toEqual([]);
  });

  it('recovers a second time to the same log when the first recovery stopped before its seal', async () => {
    const f = await fixture();
    const e = f.entries[2]!.entry;
    const bytes = Buffer.from(f.bytes);
    tearRewrite(bytes, e, Buffer.alloc(e.dataLength, 0x77), 1, false);
    const { file } = await recoverCopy(f, 'once.hrl', bytes, { rewritableBelowBytes: f.boundBytes });
    const once = fs.readFileSync(file);
    // The entry repaired, the header not yet written: a crash inside the recovery.
    const half = Buffer.from(bytes);
    once.copy(half, e.entryFileOffset, e.entryFileOffset, e.entryFileOffset + 32);
    const { rec, file: again } = await recoverCopy(f, 'twice.hrl', half, { rewritableBelowBytes: f.boundBytes });
    expect(rec.tornEntries).toEqual([]);
    expect(rec.entryCount).toBe(12);
    expect(fs.readFileSync(again).subarray(4096).equals(once.subarray(4096))).toBe(true);
  });

  it('keeps every entry and reports exactly the torn ones for random torn rewrites below the bound (seeded)', async () => {
    const f = await fixture();
    const rnd = prng(515);
    const below = f.entries.filter((x) => x.entry.payloadFileOffset + x.entry.dataLength < f.boundBytes);
    expect(below).toHaveLength(9);
    for (let round = 0; round < 150; round++) {
      const bytes = Buffer.from(f.bytes);
      const torn = new Set<number>();
      for (const [i, x] of below.entries()) {
        if (rnd() < 0.5) continue;
        const e = x.entry;
        const next = Buffer.alloc(e.dataLength, 1 + Math.floor(rnd() * 255));
        const sectors = Math.floor(rnd() * (Math.ceil(e.dataLength / SECTOR) + 1));
        const newEntry = rnd() < 0.5;
        tearRewrite(bytes, e, next, sectors, newEntry);
        // Whole (every sector and the new entry) or not at all: not torn.
        const whole = newEntry && sectors * SECTOR >= e.dataLength;
        const none = !newEntry && sectors === 0;
        if (!whole && !none) torn.add(i);
      }
      const hints = rnd() < 0.5 ? [f.bytes.length] : [];
      const { rec, file } = await recoverCopy(f, `fuzz-${round}.hrl`, bytes, { rewritableBelowBytes: f.boundBytes, hintEndBytes: hints });
      expect(rec.entryCount, `round ${round}`).toBe(12);
      expect(rec.tornEntries.map((t) => t.entryFileOffset), `round ${round}`).toEqual([...torn].map((i) => below[i]!.entry.entryFileOffset));
      const got = await sealedEntries(file);
      for (let i = 0; i < 12; i++) {
        const e = f.entries[i]!.entry;
        expect(got[i]!.data.equals(bytes.subarray(e.payloadFileOffset, e.payloadFileOffset + e.dataLength))).toBe(true);
      }
      fs.rmSync(file);
    }
  });
});
