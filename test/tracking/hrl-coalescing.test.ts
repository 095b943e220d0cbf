import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { hrlTimestampFromMs } from '../../src/tracking/hrl-format';
import { HrlLogFile, verifyHrlLog } from '../../src/tracking/hrl-reader';
import { HRL_COALESCE_MAX_ENTRIES, HrlWriter, type HrlWriterFile, type HrlWriterOptions } from '../../src/tracking/hrl-writer';
import { prng, randomData } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();

type Path = 'typescript' | 'native';

/** Creates a log through the TypeScript path (an injected file) or the native appender (a real file). */
async function createLog(file: string, via: Path, options: HrlWriterOptions): Promise<HrlWriter> {
  if (via === 'native') {
    const w = await HrlWriter.create(file, options);
    expect(w.nativeAppender, 'a real file appends through the addon').toBeDefined();
    return w;
  }
  const w = await HrlWriter.create(file, { ...options, openFile: (p) => fsp.open(p, 'wx+') });
  expect(w.nativeAppender).toBeUndefined();
  return w;
}

interface Entry {
  byteOffset: number;
  dataLength: number;
  timestamp: number;
  data: Buffer;
}

async function entriesOf(file: string): Promise<Entry[]> {
  const log = await HrlLogFile.open(file);
  try {
    const out: Entry[] = [];
    for await (const e of log.entries(await log.verify())) {
      out.push({ byteOffset: e.byteOffset, dataLength: e.dataLength, timestamp: e.timestamp, data: await log.readPayload(e, 0, e.dataLength) });
    }
    return out;
  } finally {
    await log.close();
  }
}

/** Applies sealed logs to a zero image of `sizeBytes`; its bytes. */
async function applyToZeroImage(dir: string, files: string[], sizeBytes: number): Promise<Buffer> {
  const image = path.join(dir, `applied-${path.basename(files[0]!)}.img`);
  const target = await openDisk(`raw:${image}`, { create: { sizeBytes } });
  try {
    await applyHrlLogs(target, files);
  } finally {
    await target.close();
  }
  return fs.readFileSync(image);
}

const DISK_BYTES = 512 * 1024;
const MAX_ENTRY_BYTES = 4096;

/**
 * A seeded sequence of writes: exact repeats of earlier extents (whole
 * writes and single pieces), partial overlaps, zero ranges, writes over
 * maxEntryBytes, flushes in between. Applied to `model` as it goes.
 */
async function runSequence(w: HrlWriter, seed: number, steps: number, model: Buffer): Promise<void> {
  const rand = prng(seed);
  const pick = (n: number): number => Math.floor(rand() * n);
  const extents: Array<[number, number]> = [];
  for (let i = 0; i < steps; i++) {
    const r = rand();
    let offset: number;
    let length: number;
    if (r < 0.45 && extents.length > 0) {
      [offset, length] = extents[pick(extents.length)]!;
    } else if (r < 0.55 && extents.length > 0) {
      // A partial overlap of an earlier extent: it stops being rewritable.
      const [o, n] = extents[pick(extents.length)]!;
      offset = Math.max(0, o + pick(n) - 256);
      length = 1 + pick(3000);
    } else if (r < 0.6) {
      // Over maxEntryBytes: several pieces, each its own coalescible entry.
      offset = pick(DISK_BYTES - 3 * MAX_ENTRY_BYTES);
      length = MAX_ENTRY_BYTES + 1 + pick(2 * MAX_ENTRY_BYTES);
    } else {
      offset = pick(64) * 4096 + (rand() < 0.2 ? pick(4096) : 0);
      length = rand() < 0.7 ? 4096 : 1 + pick(4096);
    }
    length = Math.min(length, DISK_BYTES - offset);
    if (rand() < 0.15) {
      await w.appendZeroes(offset, length);
      model.fill(0, offset, offset + length);
    } else {
      const data = randomData(rand, length);
      await w.append(offset, data);
      data.copy(model, offset);
    }
    if (extents.length < 200) extents.push([offset, length]);
    else extents[pick(extents.length)] = [offset, length];
    if (rand() < 0.05) await w.flush();
  }
}

describe.each<Path>(['typescript', 'native'])('HrlWriter coalescing of overwrites (%s path)', (via) => {
  it('keeps the log exact over seeded random writes, with fewer entries and fewer bytes than appending', async () => {
    const dir = tempDir();
    for (const seed of [1, 2, 3]) {
      const options: HrlWriterOptions = { metadataSizeBytes: 256, stagingBytes: 8192, maxEntryBytes: MAX_ENTRY_BYTES };
      const results: Array<{ entryCount: number; sizeBytes: number; rewrites: number; rewrittenBytes: number; image: Buffer }> = [];
      for (const coalesceOverwrites of [true, false]) {
        const file = path.join(dir, `seq-${seed}-${coalesceOverwrites}.hrl`);
        const w = await createLog(file, via, { ...options, coalesceOverwrites });
        const model = Buffer.alloc(DISK_BYTES);
        await runSequence(w, seed, 1500, model);
        const rewrites = w.rewriteCount;
        const rewrittenBytes = w.rewrittenBytes;
        const sealed = await w.seal();
        const v = await verifyHrlLog(file);
        expect(v.entryCount).toBe(sealed.entryCount);
        expect(v.unverifiedPayloads).toBe(0);
        expect(fs.statSync(file).size).toBe(sealed.sizeBytes);
        const image = await applyToZeroImage(dir, [file], DISK_BYTES);
        expect(image.equals(model), `seed ${seed}, coalescing ${coalesceOverwrites}: the applied log gives the written image`).toBe(true);
        results.push({ entryCount: sealed.entryCount, sizeBytes: sealed.sizeBytes, rewrites, rewrittenBytes, image });
      }
      const [on, off] = results as [typeof results[0], typeof results[0]];
      expect(off.rewrites).toBe(0);
      // Fewer than the repeats: entries at unaligned file positions, and native ranges in flight, are appended.
      expect(on.rewrites).toBeGreaterThan(30);
      // Every piece is either appended or rewritten in place.
      expect(on.entryCount + on.rewrites).toBe(off.entryCount);
      expect(on.sizeBytes).toBeLessThan(off.sizeBytes);
      expect(on.sizeBytes).toBeLessThanOrEqual(off.sizeBytes - on.rewrittenBytes);
    }
  }, 60_000);

  it('rewrites an exact repeat in place wherever the entry is (open block, closed block, written), with a fresh timestamp', async () => {
    const clock = new SimulatedClock(Date.UTC(2026, 10, 21));
    const file = path.join(tempDir(), 'places.hrl');
    // Two entry slots per block, staging smaller than the payloads: entries land in every place.
    const w = await createLog(file, via, { clock, metadataSizeBytes: 96, stagingBytes: 8192, maxEntryBytes: 65536 });
    await w.append(0, randomData(prng(1), 4096));
    await w.append(8192, randomData(prng(2), 16384)); // larger than staging: written straight
    await w.append(65536, randomData(prng(3), 4096)); // a second block
    await w.append(65536, randomData(prng(4), 4096)); // payload staged, entry in the open block: in memory
    await w.flush();
    await clock.advance(7000);
    const last = [randomData(prng(11), 4096), randomData(prng(12), 16384), randomData(prng(13), 4096)];
    await w.append(0, last[0]!);
    await w.append(8192, last[1]!);
    await w.append(65536, last[2]!);
    expect(w.rewriteCount).toBe(4);
    expect(w.rewrittenBytes).toBe(4096 + 16384 + 4096 + 4096);
    expect(w.entryCount).toBe(3);
    await w.seal();
    const entries = await entriesOf(file);
    expect(entries.map((e) => [e.byteOffset, e.dataLength])).toEqual([[0, 4096], [8192, 16384], [65536, 4096]]);
    expect(entries.map((e) => e.data)).toEqual(last);
    // Both paths take the timestamp from the writer's clock: the rewrites' time, 7 s after the first writes.
    expect(entries.map((e) => e.timestamp)).toEqual(Array(3).fill(hrlTimestampFromMs(clock.now())));
  });

  it('appends instead of rewriting once a later entry overlaps, and coalesces zero ranges too', async () => {
    const file = path.join(tempDir(), 'overlap.hrl');
    const w = await createLog(file, via, { metadataSizeBytes: 256, stagingBytes: 8192, maxEntryBytes: 4096 });
    await w.append(0, Buffer.alloc(4096, 1));
    await w.append(2048, Buffer.alloc(32, 2)); // overlaps [0, 4096): that entry is no longer rewritable
    await w.append(0, Buffer.alloc(4096, 3)); // appended
    await w.appendZeroes(8192, 8192);
    // (Each flush waits for the native appender's file writes: a range still in flight is appended, not rewritten.)
    await w.flush();
    await w.appendZeroes(8192, 8192); // two exact pieces: rewritten
    await w.flush();
    await w.append(8192, Buffer.alloc(4096, 4)); // exact first piece of the zero range
    expect(w.rewriteCount).toBe(3);
    await w.seal();
    const entries = await entriesOf(file);
    expect(entries.map((e) => [e.byteOffset, e.dataLength, e.data[0]])).toEqual([
      [0, 4096, 1], [2048, 32, 2], [0, 4096, 3], [8192, 4096, 4], [12288, 4096, 0],
    ]);
  });

  it('stops remembering entries at the map bound while overlaps still forget', async () => {
    const file = path.join(tempDir(), 'bound.hrl');
    const w = await createLog(file, via, { coalesceMaxEntries: 4, metadataSizeBytes: 256, stagingBytes: 8192 });
    for (let i = 0; i < 8; i++) await w.append(i * 4096, Buffer.alloc(4096, i));
    // Remembered: the first four. [0, 100) forgets [0, 4096) and takes its place.
    await w.append(0, Buffer.alloc(100, 9));
    await w.append(9 * 4096, Buffer.alloc(4096, 9)); // the map is full: not remembered
    // (The flush waits for the native appender's spare writes: a range still in flight is not rewritten.)
    await w.flush();
    // [0, 4096) forgets [0, 100) and is remembered; [4096, 16384) are rewritten; the rest appended.
    for (let i = 0; i < 10; i++) await w.append(i * 4096, Buffer.alloc(4096, 20 + i));
    expect(w.rewriteCount).toBe(3);
    const sealed = await w.seal();
    expect(sealed.entryCount).toBe(8 + 2 + 10 - 3);
    const image = await applyToZeroImage(path.dirname(file), [file], 10 * 4096);
    for (let i = 0; i < 10; i++) expect(image[i * 4096]).toBe(20 + i);
  });

  it('appends pieces shorter than coalesceMinBytes and rewrites the longer ones', async () => {
    const file = path.join(tempDir(), 'min.hrl');
    const w = await createLog(file, via, { coalesceMinBytes: 8192, metadataSizeBytes: 256, stagingBytes: 65536 });
    await w.append(0, Buffer.alloc(4096, 1));
    await w.append(65536, Buffer.alloc(8192, 2));
    await w.append(0, Buffer.alloc(4096, 3)); // too short to be remembered: appended
    await w.append(65536, Buffer.alloc(8192, 4)); // rewritten in place
    expect(w.rewriteCount).toBe(1);
    expect(w.rewrittenBytes).toBe(8192);
    const sealed = await w.seal();
    expect(sealed.entryCount).toBe(3);
    const image = await applyToZeroImage(path.dirname(file), [file], 81920);
    expect([image[0], image[65536], image[65536 + 8191]]).toEqual([3, 4, 4]);
  });

  it('rewrites an entry in the file only at a 32-aligned position (one that cannot cross a sector)', async () => {
    const file = path.join(tempDir(), 'aligned.hrl');
    const w = await createLog(file, via, { metadataSizeBytes: 256, stagingBytes: 8192 });
    // Payloads start at 4096 + 256; 100 + 6 * 512 bytes put block 1 at 7524 (≡ 4 mod 32).
    await w.append(0, Buffer.alloc(100, 1));
    for (let i = 1; i <= 6; i++) await w.append(i * 4096, Buffer.alloc(512, i));
    await w.flush();
    // Block 1 ends at 7780; 28 bytes of payload put block 2 at 7808 (aligned).
    await w.append(100_000, Buffer.alloc(28, 7));
    await w.flush();
    await w.append(4096, Buffer.alloc(512, 11)); // its entry is at 7524 + 32 + 32: appended
    await w.append(100_000, Buffer.alloc(28, 12)); // its entry is at 7808 + 32: rewritten
    expect(w.rewriteCount).toBe(1);
    const sealed = await w.seal();
    expect(sealed.entryCount).toBe(9);
    const entries = await entriesOf(file);
    expect(entries.map((e) => [e.byteOffset, e.data[0]])).toEqual([
      [0, 1], [4096, 1], [8192, 2], [12288, 3], [16384, 4], [20480, 5], [24576, 6], [100_000, 12], [4096, 11],
    ]);
  });

  it('appends every piece with coalescing off', async () => {
    const file = path.join(tempDir(), 'off.hrl');
    const w = await createLog(file, via, { coalesceOverwrites: false });
    for (let i = 0; i < 5; i++) await w.append(0, Buffer.alloc(4096, i));
    expect(w.rewriteCount).toBe(0);
    expect((await w.seal()).entryCount).toBe(5);
  });
});

describe('HrlWriter coalescing options', () => {
  it('refuses a map bound outside [0, HRL_COALESCE_MAX_ENTRIES]', async () => {
    const dir = tempDir();
    await expect(HrlWriter.create(path.join(dir, 'a.hrl'), { coalesceMaxEntries: HRL_COALESCE_MAX_ENTRIES + 1 })).rejects.toMatchObject({ code: 'BR_CONFIG_INVALID' });
    await expect(HrlWriter.create(path.join(dir, 'b.hrl'), { coalesceMaxEntries: -1 })).rejects.toMatchObject({ code: 'BR_CONFIG_INVALID' });
    expect(fs.existsSync(path.join(dir, 'a.hrl'))).toBe(false);
  });
});

/** Records every write and sync the writer makes to a real file. */
class RecordingFile implements HrlWriterFile {
  readonly ops: Array<{ kind: 'write'; position: number; length: number } | { kind: 'sync' }> = [];
  constructor(private readonly fh: fsp.FileHandle) {}
  async write(buffer: Buffer, offset: number, length: number, position: number): Promise<unknown> {
    this.ops.push({ kind: 'write', position, length });
    return this.fh.write(buffer, offset, length, position);
  }
  async writev(buffers: Buffer[], position: number): Promise<unknown> {
    this.ops.push({ kind: 'write', position, length: buffers.reduce((n, b) => n + b.length, 0) });
    return this.fh.writev(buffers, position);
  }
  async datasync(): Promise<void> {
    this.ops.push({ kind: 'sync' });
    return this.fh.datasync();
  }
  close(): Promise<void> {
    return this.fh.close();
  }
}

describe('HrlWriter coalescing durability', () => {
  it('fdatasyncs a flush after only rewrites (payload, then the 32-byte entry on its own) and skips an idle one', async () => {
    let file: RecordingFile | undefined;
    const w = await HrlWriter.create(path.join(tempDir(), 'sync.hrl'), {
      metadataSizeBytes: 256,
      openFile: async (p) => (file = new RecordingFile(await fsp.open(p, 'wx+'))),
    });
    await w.append(4096, Buffer.alloc(4096, 1));
    await w.flush();
    const end = w.durableEndBytes;
    const before = file!.ops.length;
    await w.flush();
    expect(file!.ops.length, 'an idle flush does no I/O').toBe(before);
    await w.append(4096, Buffer.alloc(4096, 2));
    expect(w.sizeBytes).toBe(end);
    await w.flush();
    expect(w.durableEndBytes).toBe(end);
    const ops = file!.ops.slice(before);
    // Payload at HRL header + anchor block (4096 + 256), entry in the block after it.
    expect(ops).toEqual([
      { kind: 'write', position: 4096 + 256, length: 4096 },
      { kind: 'write', position: 4096 + 256 + 4096 + 32, length: 32 },
      { kind: 'sync' },
    ]);
    await w.flush();
    expect(file!.ops.length, 'the rewrite is durable: the next idle flush syncs nothing').toBe(before + 3);
    await w.seal();
  });

  it('native: reports a rewrite since the last sync (set again when its file write lands), so the flush syncs', async () => {
    const w = await HrlWriter.create(path.join(tempDir(), 'native-sync.hrl'));
    const core = w.nativeAppender!;
    expect(core).toBeDefined();
    await w.append(0, Buffer.alloc(4096, 1));
    await w.flush();
    expect(core.takeRewrittenSinceSync()).toBe(false);
    await w.append(0, Buffer.alloc(4096, 2));
    expect(core.takeRewrittenSinceSync()).toBe(true);
    // The file part of the rewrite is written by an I/O thread, which sets
    // the flag again once written; the flush waits for it, then takes it.
    await w.flush();
    expect(core.takeRewrittenSinceSync()).toBe(false);
    await w.append(0, Buffer.alloc(4096, 3));
    await w.flush();
    expect(core.takeRewrittenSinceSync(), 'the flush took it').toBe(false);
    expect(w.rewriteCount).toBe(2);
    await w.seal();
  });
});

describe('HrlWriter native coalescing under concurrent callers', () => {
  it('keeps the log exact while a pool thread rewrites a zero range and the main thread appends, rewrites and closes blocks', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'concurrent.hrl');
    // A small staging buffer keeps spare writes in flight: rewrites there fall back to appends.
    const w = await HrlWriter.create(file, { maxEntryBytes: 4096, stagingBytes: 8192 });
    const core = w.nativeAppender!;
    expect(core).toBeDefined();
    const zeroBytes = 16 << 20;
    const sizeBytes = zeroBytes + (1 << 20);
    const model = Buffer.alloc(sizeBytes);
    const rand = prng(42);
    let done = false;
    const zeroing = (async () => {
      expect(await core.appendZeroesAsync(0, zeroBytes, 0)).toBe(0);
      expect(await core.appendZeroesAsync(0, zeroBytes, 0)).toBe(0);
      done = true;
    })();
    let appends = 0;
    while (!done || appends < 200) {
      const offset = zeroBytes + Math.floor(rand() * 64) * 4096;
      const data = randomData(rand, 4096);
      expect(core.append(offset, data, 0)).toBe(0);
      data.copy(model, offset);
      if (appends % 7 === 0) expect(core.closeBlock()).toBe(0);
      appends++;
      await new Promise((r) => setImmediate(r));
    }
    await zeroing;
    expect(w.rewriteCount).toBeGreaterThan(0);
    const sealed = await w.seal();
    const v = await verifyHrlLog(file);
    expect(v.entryCount).toBe(sealed.entryCount);
    expect(v.unverifiedPayloads).toBe(0);
    // Every piece was appended or rewritten.
    expect(sealed.entryCount + w.rewriteCount).toBe(2 * (zeroBytes / 4096) + appends);
    const image = await applyToZeroImage(dir, [file], sizeBytes);
    expect(image.equals(model)).toBe(true);
  }, 60_000);
});
