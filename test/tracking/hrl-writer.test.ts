import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { hrlChecksum, HRL_HEADER_SIZE } from '../../src/tracking/hrl-format';
import { HrlLogFile, verifyHrlLog } from '../../src/tracking/hrl-reader';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();

/** Deterministic pseudo-random bytes. */
function bytes(seed: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

async function readAllEntries(file: string): Promise<{ byteOffset: number; data: Buffer }[]> {
  const log = await HrlLogFile.open(file);
  try {
    const v = await log.verify();
    const out: { byteOffset: number; data: Buffer }[] = [];
    for await (const e of log.entries(v)) out.push({ byteOffset: e.byteOffset, data: await log.readPayload(e, 0, e.dataLength) });
    return out;
  } finally {
    await log.close();
  }
}

describe('HrlWriter -> HrlLogFile round trip', () => {
  it('reads back every write in order, across full and partial metadata blocks', async () => {
    const file = path.join(tempDir(), 'a.hrl');
    const w = await HrlWriter.create(file, { metadataSizeBytes: 256, stagingBytes: 8192 });
    const writes: { byteOffset: number; data: Buffer }[] = [];
    for (let i = 0; i < 40; i++) {
      const data = bytes(i + 1, 512 * (1 + (i % 7)) + (i % 3));
      writes.push({ byteOffset: i * 3000, data });
      await w.append(i * 3000, data);
      if (i % 9 === 0) await w.flush();
    }
    const sealed = await w.seal();
    expect(sealed.entryCount).toBe(40);
    expect(fs.statSync(file).size).toBe(sealed.sizeBytes);
    const v = await verifyHrlLog(file);
    expect(v.entryCount).toBe(40);
    expect(v.header.eolLocation).toBe(sealed.sizeBytes);
    expect(v.header.totalMetadataEntries).toBe(40);
    expect(v.blocks[0]).toMatchObject({ offset: HRL_HEADER_SIZE, validEntries: 0, previousMetadataLocation: 0 });
    expect(v.unverifiedPayloads).toBe(0);
    expect(await readAllEntries(file)).toEqual(writes);
  });

  it('splits writes larger than maxEntryBytes and logs zero ranges as zero-filled entries', async () => {
    const file = path.join(tempDir(), 'b.hrl');
    const w = await HrlWriter.create(file, { maxEntryBytes: 4096, stagingBytes: 4096 });
    const big = bytes(7, 10_000);
    await w.append(1_000_000, big);
    await w.appendZeroes(50_000, 9000);
    await w.seal();
    const got = await readAllEntries(file);
    expect(got.map((e) => [e.byteOffset, e.data.length])).toEqual([
      [1_000_000, 4096], [1_004_096, 4096], [1_008_192, 1808],
      [50_000, 4096], [54_096, 4096], [58_192, 808],
    ]);
    expect(Buffer.concat(got.slice(0, 3).map((e) => e.data))).toEqual(big);
    expect(got.slice(3).every((e) => e.data.every((b) => b === 0))).toBe(true);
  });

  it('logs a large zero range off the main thread and keeps call order with the appends around it', async () => {
    const file = path.join(tempDir(), 'z.hrl');
    const w = await HrlWriter.create(file);
    expect(w.nativeAppender, 'a real file appends through the addon').toBeDefined();
    await w.append(0, bytes(1, 4096));
    const zeroing = w.appendZeroes(1 << 20, 64 << 20);
    // Called while the zero range is being logged: lands after it.
    const after = w.append(4096, bytes(2, 4096));
    // The event loop turns before the 64 MiB of zero entries are written.
    const first = await Promise.race([zeroing.then(() => 'zeroes'), new Promise((r) => setImmediate(() => r('event loop')))]);
    expect(first).toBe('event loop');
    await Promise.all([zeroing, after]);
    await w.seal();
    const got = await readAllEntries(file);
    expect(got.length).toBe(2 + 64);
    expect(got[0]!.data).toEqual(bytes(1, 4096));
    expect(got.slice(1, 65).map((e) => e.byteOffset)).toEqual(Array.from({ length: 64 }, (_, i) => (1 << 20) + i * (1 << 20)));
    expect(got.slice(1, 65).every((e) => e.data.every((b) => b === 0))).toBe(true);
    expect(got[65]).toEqual({ byteOffset: 4096, data: bytes(2, 4096) });
  });

  it('writes the header with EOLLocation 0 while open and the real end, counts and times once sealed', async () => {
    const clock = new SimulatedClock(Date.UTC(2026, 0, 1));
    const file = path.join(tempDir(), 'c.hrl');
    const w = await HrlWriter.create(file, { clock, previousUniqueId: 'a8ae4b46-f7ad-4402-87aa-5b33e9f89c77' });
    await w.append(0, bytes(3, 4096));
    await w.flush();
    const open = fs.readFileSync(file);
    expect(open.readBigUInt64LE(44)).toBe(0n);
    expect(open.readUInt32LE(40)).toBe(hrlChecksum(open.subarray(0, 4096), 40));
    await clock.advance(5000);
    const sealed = await w.seal();
    const v = await verifyHrlLog(file);
    expect(v.header).toMatchObject({ eolLocation: sealed.sizeBytes, currentSize: sealed.sizeBytes, previousUniqueId: 'a8ae4b46-f7ad-4402-87aa-5b33e9f89c77', uniqueId: w.uniqueId });
    expect(v.header.lastModifiedTimestamp - v.header.timestamp).toBe(5);
  });

  it('refuses use after seal with BR_HRL_CLOSED', async () => {
    const w = await HrlWriter.create(path.join(tempDir(), 'd.hrl'));
    await w.seal();
    await expect(w.append(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'BR_HRL_CLOSED' });
  });

  it('applies sealed, chained logs to a raw disk exactly as the writes would', async () => {
    const dir = tempDir();
    const sizeBytes = 1 << 20;
    const model = Buffer.alloc(sizeBytes);
    const files: string[] = [];
    let prev: string | undefined;
    for (let l = 0; l < 3; l++) {
      const file = path.join(dir, `log-${l}.hrl`);
      const w = await HrlWriter.create(file, { previousUniqueId: prev, metadataSizeBytes: 512 });
      for (let i = 0; i < 30; i++) {
        const off = ((l * 31 + i * 17) % 200) * 4096;
        const data = bytes(l * 100 + i + 1, 4096 + 512 * (i % 3));
        await w.append(off, data);
        data.copy(model, off);
      }
      prev = (await w.seal()).uniqueId;
      files.push(file);
    }
    const target = await openDisk(`raw:${path.join(dir, 'disk.img')}`, { create: { sizeBytes } });
    try {
      const result = await applyHrlLogs(target, files);
      expect(result.entriesApplied).toBe(90);
    } finally {
      await target.close();
    }
    expect(fs.readFileSync(path.join(dir, 'disk.img'))).toEqual(model);
  });
});

/** statfs type of ext2/3/4: the only file system the appender reserves blocks on. */
const EXT4_SUPER_MAGIC = 0xef53;

/** Writes 24 MiB through the native appender and waits (bounded) for the recycler's reservation. */
async function growLog(file: string, seed: number): Promise<{ w: HrlWriter; piece: Buffer; reserves: boolean }> {
  const w = await HrlWriter.create(file);
  expect(w.nativeAppender, 'a real file appends through the addon').toBeDefined();
  const piece = bytes(seed, 1 << 20);
  for (let i = 0; i < 24; i++) await w.append(i * piece.length, piece);
  await w.flush();
  const reserves = fs.statfsSync(file).type === EXT4_SUPER_MAGIC;
  // The appender's own thread reserves ahead once 8 MiB are written; it
  // runs beside the appends, so give it a moment where it should.
  const deadline = Date.now() + 5000;
  while (reserves && fs.statSync(file).blocks * 512 < fs.statSync(file).size + (32 << 20) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
  }
  return { w, piece, reserves };
}

describe('HrlWriter native appender block reservation', () => {
  it('reserves blocks past the end of a growing log on ext4 without changing its size, and gives them back when sealed', async () => {
    const file = path.join(tempDir(), 'reserve.hrl');
    const { w, piece, reserves } = await growLog(file, 7);
    const st = fs.statSync(file);
    expect(st.size, 'the size is what was written: readers see no reserved bytes').toBe(w.sizeBytes);
    if (reserves) expect(st.blocks * 512, 'blocks are reserved past the end').toBeGreaterThanOrEqual(st.size + (32 << 20));
    else expect(st.blocks * 512, 'nothing is reserved off ext4 (tmpfs would keep it)').toBeLessThan(st.size + (1 << 20));
    const sealed = await w.seal();
    const after = fs.statSync(file);
    expect(after.size).toBe(sealed.sizeBytes);
    expect(after.blocks * 512, 'a sealed log keeps no reserved blocks').toBeLessThan(after.size + (1 << 20));
    const entries = await readAllEntries(file);
    expect(entries).toHaveLength(24);
    for (const [i, e] of entries.entries()) {
      expect(e.byteOffset).toBe(i * piece.length);
      expect(e.data.equals(piece)).toBe(true);
    }
  });

  it('gives the reserved blocks back when the log is closed unsealed', async () => {
    const file = path.join(tempDir(), 'reserve-close.hrl');
    const { w, reserves } = await growLog(file, 9);
    if (reserves) expect(fs.statSync(file).blocks * 512).toBeGreaterThanOrEqual(fs.statSync(file).size + (32 << 20));
    await w.close();
    const after = fs.statSync(file);
    expect(after.blocks * 512).toBeLessThan(after.size + (1 << 20));
  });
});

describe('HrlWriter native appender under concurrent callers', () => {
  it('keeps every entry with its payload when a block close comes while an append waits for a staging buffer', async () => {
    // A small staging buffer makes the pool append wait for a free spare
    // often; the main thread closes the block meanwhile, as a FLUSH does
    // while the tap's connection threads append. The close must wait for
    // the whole append: an entry counted in a block whose payload is not
    // staged yet is a log the hop refuses.
    const file = path.join(tempDir(), 'race.hrl');
    const w = await HrlWriter.create(file, { maxEntryBytes: 4096, stagingBytes: 8192 });
    const core = w.nativeAppender;
    expect(core, 'a real file appends through the addon').toBeDefined();
    const zeroBytes = 64 << 20;
    let closes = 0;
    let closeErrno = 0;
    let appended = false;
    const zeroing = core!.appendZeroesAsync(0, zeroBytes, 0).then((errno) => {
      appended = true;
      return errno;
    });
    while (!appended) {
      const errno = core!.closeBlock();
      if (errno !== 0) closeErrno = errno;
      closes++;
      await new Promise((r) => setImmediate(r));
    }
    expect(await zeroing).toBe(0);
    expect(closeErrno).toBe(0);
    expect(closes).toBeGreaterThan(1);
    const sealed = await w.seal();
    expect(sealed.entryCount).toBe(zeroBytes / 4096);
    const v = await verifyHrlLog(file);
    expect(v.entryCount).toBe(zeroBytes / 4096);
    expect(v.unverifiedPayloads).toBe(0);
    let at = 0;
    const log = await HrlLogFile.open(file);
    try {
      for await (const e of log.entries(await log.verify())) {
        expect(e.byteOffset).toBe(at);
        at += e.dataLength;
      }
    } finally {
      await log.close();
    }
    expect(at).toBe(zeroBytes);
  });
});

describe('HrlWriter after its file is renamed', () => {
  const tmp = useTempDirs();

  it('names the new path once told, and seals the file there', async () => {
    const dir = tmp();
    const first = path.join(dir, 'disk0.next-1.hrl.spare');
    const moved = path.join(dir, 'disk0-000000000002.hrl.open');
    const w = await HrlWriter.create(first);
    fs.renameSync(first, moved);
    w.renamed(moved);
    expect(w.path).toBe(moved);
    await w.append(0, Buffer.alloc(4096, 7));
    const sealed = await w.seal();
    expect(sealed.path).toBe(moved);
    expect((await verifyHrlLog(moved)).entryCount).toBe(1);
  });
});
