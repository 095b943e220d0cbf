import { describe, expect, it } from 'vitest';
import xxhashWasm from 'xxhash-wasm';
import { isBlockrelayError } from '../../src/retry/blockrelay-error';
import { DirtyMap, xxh64, type DirtyExtent } from '../../src/tracking/dirty-map';
import {
  DIRTY_MAP_MAGIC,
  DM_BODY_BYTES_OFFSET,
  DM_BODY_CHECKSUM_OFFSET,
  DM_BODY_OFFSET,
  DM_CHUNK_BLOCKS,
  DM_DIRTY_BLOCKS_OFFSET,
  DM_DISK_SIZE_OFFSET,
  DM_GRANULARITY_OFFSET,
  DM_HEADER_BYTES,
  DM_HEADER_CHECKSUM_OFFSET,
  DM_RECORD_BITMAP,
  DM_RECORD_FULL,
  DM_RECORD_RUNS,
  DM_RESERVED_OFFSET,
  DM_VERSION_OFFSET,
} from '../../src/tracking/dirty-map-format';
import { prng } from '../helpers/prng';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

function all(map: DirtyMap, offset?: number, length?: number): DirtyExtent[] {
  return [...map.extents(offset, length)];
}

function expectCode(fn: () => unknown, code: string, message?: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(isBlockrelayError(caught), `expected ${code}, got ${String(caught)}`).toBe(true);
  if (!isBlockrelayError(caught)) return;
  expect(caught.code).toBe(code);
  if (message) expect(caught.message).toMatch(message);
}

/** Rewrites both checksums so damage reaches the field and body checks. */
function reseal(buf: Buffer): Buffer {
  const bodyBytes = buf.length - DM_BODY_OFFSET;
  if (bodyBytes >= 0) buf.writeBigUInt64LE(xxh64(buf, DM_BODY_OFFSET, bodyBytes), DM_BODY_CHECKSUM_OFFSET);
  buf.writeBigUInt64LE(xxh64(buf, 0, DM_HEADER_CHECKSUM_OFFSET), DM_HEADER_CHECKSUM_OFFSET);
  return buf;
}

function corruptOffset(fn: () => unknown): number {
  try {
    fn();
  } catch (err) {
    if (isBlockrelayError(err) && err.code === 'BR_DIRTYMAP_CORRUPT') return Number(err.details.offset);
    throw err;
  }
  throw new Error('expected BR_DIRTYMAP_CORRUPT, nothing was thrown');
}

describe('DirtyMap marking and querying', () => {
  it('dirties both blocks when a write crosses a block boundary', () => {
    const map = new DirtyMap(1 * MiB, 4096);
    map.mark(4000, 200);
    expect(map.isDirty(0)).toBe(true);
    expect(map.isDirty(4096)).toBe(true);
    expect(map.isDirty(8192)).toBe(false);
    expect(map.dirtyBlockCount).toBe(2);
    expect(map.dirtyBytes()).toBe(8192);
    expect(all(map)).toEqual([{ offset: 0, length: 8192 }]);
  });

  it('dirties the whole block for a write of one byte', () => {
    const map = new DirtyMap(1 * MiB, 512);
    map.mark(1000, 1);
    expect(all(map)).toEqual([{ offset: 512, length: 512 }]);
    expect(map.isDirty(512, 1)).toBe(true);
    expect(map.isDirty(1023, 1)).toBe(true);
    expect(map.isDirty(1024, 1)).toBe(false);
    expect(map.isDirty(0, 512)).toBe(false);
    expect(map.isDirty(0, 513)).toBe(true);
  });

  it('coalesces adjacent blocks into one extent and keeps gaps apart', () => {
    const map = new DirtyMap(1 * MiB, 4096);
    map.mark(8192, 4096);
    map.mark(16384, 4096);
    map.mark(12288, 4096);
    map.mark(40960, 1);
    expect(all(map)).toEqual([
      { offset: 8192, length: 12288 },
      { offset: 40960, length: 4096 },
    ]);
  });

  it('coalesces extents across the boundary of the addon\'s 64 Ki-block chunks', () => {
    const map = new DirtyMap(4 * GiB, 4096);
    const chunkBytes = DM_CHUNK_BLOCKS * 4096;
    map.mark(chunkBytes - 4096, 4096);
    map.mark(chunkBytes, 4096);
    map.mark(3 * chunkBytes - 8192, 2 * chunkBytes + 8192 - 4096);
    expect(all(map)).toEqual([
      { offset: chunkBytes - 4096, length: 8192 },
      { offset: 3 * chunkBytes - 8192, length: 2 * chunkBytes + 4096 },
    ]);
    expect(map.checkInvariants()).toBeNull();
  });

  it('marks a batch of ranges like the same marks one by one, or none when a pair is bad', () => {
    const random = prng(5);
    const one = new DirtyMap(1 * GiB, 512);
    const ranges: number[] = [];
    for (let i = 0; i < 2000; i++) {
      const offset = Math.floor(random() * (1 * GiB - 100_000));
      const length = Math.floor(random() * 100_000);
      ranges.push(offset, length);
      one.mark(offset, length);
    }
    const many = new DirtyMap(1 * GiB, 512);
    many.markMany(Float64Array.from(ranges));
    expect(all(many)).toEqual(all(one));
    expect(many.dirtyBlockCount).toBe(one.dirtyBlockCount);

    const untouched = new DirtyMap(1 * MiB);
    expectCode(() => untouched.markMany([0, 4096, 1 * MiB - 10, 11]), 'BR_DIRTYMAP_RANGE', /markMany \(pair 1\)/);
    expect(() => untouched.markMany([0, 4096, 8192])).toThrow(/ranges must hold offset, length pairs, got 3 numbers/);
    expect(() => untouched.markMany([0, 4096, -1, 5])).toThrow(/markMany \(pair 1\): offset must be an integer/);
    expect(untouched.dirtyBlockCount).toBe(0);
  });

  it('treats a zero length as touching nothing', () => {
    const map = new DirtyMap(1 * MiB);
    map.mark(4096, 0);
    expect(map.dirtyBlockCount).toBe(0);
    map.mark(0, 4096);
    expect(map.isDirty(0, 0)).toBe(false);
    expect(all(map, 0, 0)).toEqual([]);
  });

  it('clips the last partial block at the disk end in extents and dirty bytes', () => {
    const map = new DirtyMap(10_000, 4096);
    expect(map.blockCount).toBe(3);
    map.mark(9_000, 1_000);
    expect(all(map)).toEqual([{ offset: 8192, length: 1808 }]);
    expect(map.dirtyBytes()).toBe(1808);
    map.mark(0, 10_000);
    expect(map.dirtyBytes()).toBe(10_000);
    expect(map.dirtyBlockCount).toBe(3);
  });

  it('refuses ranges past the disk end with BR_DIRTYMAP_RANGE and changes nothing', () => {
    const map = new DirtyMap(1 * MiB);
    expectCode(() => map.mark(1 * MiB - 4096, 4097), 'BR_DIRTYMAP_RANGE', /mark: range \[1044480, 1048577\) reaches past the disk end at 1048576/);
    expectCode(() => map.mark(1 * MiB, 1), 'BR_DIRTYMAP_RANGE');
    expectCode(() => map.clear(0, 2 * MiB), 'BR_DIRTYMAP_RANGE');
    expectCode(() => map.isDirty(1 * MiB), 'BR_DIRTYMAP_RANGE');
    expectCode(() => map.extentBatch(0, 1 * MiB + 1), 'BR_DIRTYMAP_RANGE');
    expect(map.dirtyBlockCount).toBe(0);
    map.mark(1 * MiB - 1, 1);
    expect(map.dirtyBlockCount).toBe(1);
  });

  it('refuses malformed arguments with messages naming the argument, the expectation and the value', () => {
    expect(() => new DirtyMap(0)).toThrow(/DirtyMap: diskSizeBytes must be an integer from 1 to 1125899906842624, got 0/);
    expect(() => new DirtyMap(2 ** 51)).toThrow(/diskSizeBytes/);
    expect(() => new DirtyMap(1 * MiB, 1000)).toThrow(/granularityBytes must be a power of two from 512 to 1048576, got 1000/);
    expect(() => new DirtyMap(1 * MiB, 256)).toThrow(/granularityBytes/);
    expect(() => new DirtyMap(1 * MiB, 2 * MiB)).toThrow(/granularityBytes/);
    const map = new DirtyMap(1 * MiB);
    expect(() => map.mark(-1, 10)).toThrow(/DirtyMap.mark: offset must be an integer from 0 to .*, got -1/);
    expect(() => map.mark(0, 1.5)).toThrow(/DirtyMap.mark: length must be an integer .* got 1.5/);
    expect(() => map.clear(Number.NaN, 1)).toThrow(/DirtyMap.clear: offset .* got NaN/);
    expect(() => map.extentBatch(0, 4096, 0)).toThrow(/maxExtents must be an integer from 1 to 65536, got 0/);
    expect(() => map.merge({} as DirtyMap)).toThrow(/other must be a DirtyMap, got Object/);
  });
});

describe('DirtyMap.clear', () => {
  it('clears only the blocks the range covers entirely', () => {
    const map = new DirtyMap(1 * MiB, 4096);
    map.mark(0, 5 * 4096);
    // [2048, 14336) covers block 1 and 2 entirely, blocks 0 and 3 in part.
    map.clear(2048, 12288);
    expect(all(map)).toEqual([
      { offset: 0, length: 4096 },
      { offset: 12288, length: 8192 },
    ]);
    // A range inside one block clears nothing.
    map.clear(100, 3000);
    expect(map.isDirty(0)).toBe(true);
    map.clear(0, 4096);
    expect(map.isDirty(0)).toBe(false);
  });

  it('clears the partial last block when the range reaches the disk end', () => {
    const map = new DirtyMap(10_000, 4096);
    map.mark(0, 10_000);
    map.clear(8192, 1808);
    expect(all(map)).toEqual([{ offset: 0, length: 8192 }]);
  });

  it('splits a fully dirty chunk and gives memory back when everything is cleared', () => {
    const map = new DirtyMap(2 * TiB);
    const empty = map.memoryBytes();
    map.mark(0, 2 * TiB);
    map.clear(1 * TiB, 4096);
    expect(map.dirtyBlockCount).toBe(2 * TiB / 4096 - 1);
    expect(all(map)).toEqual([
      { offset: 0, length: 1 * TiB },
      { offset: 1 * TiB + 4096, length: 1 * TiB - 4096 },
    ]);
    map.clear(0, 2 * TiB);
    expect(map.dirtyBlockCount).toBe(0);
    expect(map.memoryBytes()).toBe(empty);
    expect(map.checkInvariants()).toBeNull();
  });
});

describe('DirtyMap extents', () => {
  it('limits extents to a range and clips them at both ends', () => {
    const map = new DirtyMap(1 * MiB, 4096);
    map.mark(0, 16384);
    map.mark(32768, 16384);
    expect(all(map, 6000, 30000)).toEqual([
      { offset: 6000, length: 16384 - 6000 },
      { offset: 32768, length: 36000 - 32768 },
    ]);
    expect(all(map, 16384, 16384)).toEqual([]);
    expect(all(map, 40000)).toEqual([{ offset: 40000, length: 49152 - 40000 }]);
  });

  it('returns bounded batches that resume where the previous one stopped', () => {
    const map = new DirtyMap(1 * GiB, 4096);
    for (let i = 0; i < 10_000; i++) map.mark(i * 3 * 4096, 4096);
    const first = map.extentBatch(0, 1 * GiB, 100);
    expect(first.extents).toHaveLength(100);
    expect(first.extents[99]).toEqual({ offset: 99 * 3 * 4096, length: 4096 });
    expect(first.nextOffset).toBe(100 * 3 * 4096);
    const collected: DirtyExtent[] = [];
    let next: number | undefined = 0;
    let calls = 0;
    while (next !== undefined) {
      const batch = map.extentBatch(next, 1 * GiB - next, 333);
      expect(batch.extents.length).toBeLessThanOrEqual(333);
      collected.push(...batch.extents);
      next = batch.nextOffset;
      calls++;
    }
    expect(calls).toBe(Math.ceil(10_000 / 333));
    expect(collected).toEqual(all(map));
    expect(collected).toHaveLength(10_000);
  });

  it('visits every extent once when the caller clears each one while iterating', () => {
    const map = new DirtyMap(1 * GiB, 4096);
    for (let i = 0; i < 1000; i++) map.mark(i * 5 * 4096, 2 * 4096);
    const seen: DirtyExtent[] = [];
    for (const extent of map.extents(0, 1 * GiB, 7)) {
      seen.push(extent);
      map.clear(extent.offset, extent.length);
    }
    expect(seen).toHaveLength(1000);
    expect(seen[999]).toEqual({ offset: 999 * 5 * 4096, length: 8192 });
    expect(map.dirtyBlockCount).toBe(0);
  });

  it('refuses an extents range that starts past the disk end', () => {
    const map = new DirtyMap(1 * MiB);
    expectCode(() => [...map.extents(2 * MiB)], 'BR_DIRTYMAP_RANGE');
  });

  it('iterates a fully dirty 2 TiB map as one extent', () => {
    const map = new DirtyMap(2 * TiB);
    map.mark(0, 2 * TiB);
    expect(all(map)).toEqual([{ offset: 0, length: 2 * TiB }]);
    expect(map.dirtyBytes()).toBe(2 * TiB);
  });
});

describe('DirtyMap.merge', () => {
  it('forms the union of two maps', () => {
    const a = new DirtyMap(1 * GiB);
    const b = new DirtyMap(1 * GiB);
    a.mark(0, 8192);
    a.mark(1 * MiB, 4096);
    b.mark(8192, 4096);
    b.mark(512 * MiB, 512 * MiB);
    a.merge(b);
    expect(all(a)).toEqual([
      { offset: 0, length: 12288 },
      { offset: 1 * MiB, length: 4096 },
      { offset: 512 * MiB, length: 512 * MiB },
    ]);
    expect(all(b)).toHaveLength(2);
    expect(a.checkInvariants()).toBeNull();
  });

  it('refuses maps of another disk size or granularity', () => {
    const a = new DirtyMap(1 * GiB);
    expectCode(() => a.merge(new DirtyMap(2 * GiB)), 'BR_DIRTYMAP_MISMATCH', /1073741824 bytes at 4096-byte blocks/);
    expectCode(() => a.merge(new DirtyMap(1 * GiB, 512)), 'BR_DIRTYMAP_MISMATCH');
  });
});

describe('DirtyMap memory bounds (addon accounting)', () => {
  it('holds a few thousand scattered extents on a 2 TiB disk in well under 1 MiB', () => {
    const map = new DirtyMap(2 * TiB);
    const random = prng(42);
    const blocks = 2 * TiB / 4096;
    for (let i = 0; i < 5000; i++) {
      const block = Math.floor(random() * (blocks - 64));
      map.mark(block * 4096, (1 + Math.floor(random() * 32)) * 4096);
    }
    expect(all(map).length).toBeGreaterThan(4900);
    const bytes = map.memoryBytes();
    console.log(`2 TiB, 5000 scattered marks: ${bytes} bytes`);
    expect(bytes).toBeLessThan(512 * KiB);
    expect(map.checkInvariants()).toBeNull();
  });

  it('holds a fully dirty 2 TiB disk in far less than 64 MiB', () => {
    const map = new DirtyMap(2 * TiB);
    for (let offset = 0; offset < 2 * TiB; offset += 64 * GiB) map.mark(offset, 64 * GiB);
    const bytes = map.memoryBytes();
    console.log(`2 TiB fully dirty: ${bytes} bytes`);
    expect(bytes).toBeLessThan(1 * MiB);
    expect(map.dirtyBytes()).toBe(2 * TiB);
  });

  it('never needs more than a flat bitmap plus its pages when every chunk is fragmented', () => {
    // 64 chunks (1 TiB of blocks at 4 KiB would be 4096 chunks; the bound is
    // per chunk, so 64 show it) with every other block dirty.
    const chunks = 64;
    const map = new DirtyMap(chunks * DM_CHUNK_BLOCKS * 4096);
    for (let block = 0; block < chunks * DM_CHUNK_BLOCKS; block += 2) map.mark(block * 4096, 4096);
    const bitmapBytes = (chunks * DM_CHUNK_BLOCKS) / 8;
    const bytes = map.memoryBytes();
    console.log(`${chunks} fragmented chunks: ${bytes} bytes for a ${bitmapBytes}-byte bitmap`);
    expect(bytes).toBeLessThan(bitmapBytes * 1.05);
    expect(map.chunkStats()).toEqual({ runChunks: 0, bitmapChunks: chunks, fullChunks: 0, pages: 1 });
    expect(map.checkInvariants()).toBeNull();
    // Clearing most of it turns bitmaps back into run arrays, then nothing.
    map.clear(0, (chunks * DM_CHUNK_BLOCKS - 100) * 4096);
    expect(map.memoryBytes()).toBeLessThan(32 * KiB);
    expect(map.chunkStats()).toEqual({ runChunks: 1, bitmapChunks: 0, fullChunks: 0, pages: 1 });
    expect(map.checkInvariants()).toBeNull();
  });
});

describe('DirtyMap serialize', () => {
  it('round-trips empty, scattered, fragmented, full and partial-end maps', () => {
    const random = prng(9);
    const shapes: Array<[string, () => DirtyMap]> = [
      ['empty', () => new DirtyMap(1 * TiB)],
      ['full', () => { const m = new DirtyMap(2 * TiB); m.mark(0, 2 * TiB); return m; }],
      ['partial end', () => { const m = new DirtyMap(10 * GiB + 1234, 512); m.mark(10 * GiB - 700, 1934); m.mark(0, 1); return m; }],
      ['scattered', () => {
        const m = new DirtyMap(2 * TiB);
        for (let i = 0; i < 3000; i++) m.mark(Math.floor(random() * (2 * TiB / 4096 - 8)) * 4096, 4096 * (1 + Math.floor(random() * 8)));
        return m;
      }],
      ['fragmented', () => {
        const m = new DirtyMap(4 * GiB, 4096);
        for (let b = 0; b < 3 * DM_CHUNK_BLOCKS; b += 2 + Math.floor(random() * 3)) m.mark(b * 4096, 4096);
        return m;
      }],
    ];
    for (const [name, make] of shapes) {
      const map = make();
      const bytes = map.serialize();
      const back = DirtyMap.deserialize(bytes);
      expect(back.diskSizeBytes, name).toBe(map.diskSizeBytes);
      expect(back.granularityBytes, name).toBe(map.granularityBytes);
      expect(back.dirtyBlockCount, name).toBe(map.dirtyBlockCount);
      expect(all(back), name).toEqual(all(map));
      expect(back.checkInvariants(), name).toBeNull();
      expect(back.serialize().equals(bytes), name).toBe(true);
    }
  });

  it('writes the documented header and body bytes', () => {
    const map = new DirtyMap(1 * MiB, 4096);
    map.mark(0, 8192);
    map.mark(40960, 4096);
    const bytes = map.serialize();
    // Body: chunk 0, a runs record of two runs: (gap 0, length 2), (gap 8, length 1).
    const body = Buffer.from([0x00, DM_RECORD_RUNS, 0x02, 0x00, 0x01, 0x08, 0x00]);
    expect(bytes.length).toBe(DM_HEADER_BYTES + body.length);
    expect(bytes.subarray(0, 8).equals(DIRTY_MAP_MAGIC)).toBe(true);
    expect(bytes.subarray(0, 8).toString('latin1')).toBe('BRDIRTYM');
    expect(bytes.readUInt32LE(DM_VERSION_OFFSET)).toBe(1);
    expect(bytes.readUInt32LE(DM_GRANULARITY_OFFSET)).toBe(4096);
    expect(bytes.readBigUInt64LE(DM_DISK_SIZE_OFFSET)).toBe(BigInt(MiB));
    expect(bytes.readBigUInt64LE(DM_DIRTY_BLOCKS_OFFSET)).toBe(3n);
    expect(bytes.readBigUInt64LE(DM_BODY_BYTES_OFFSET)).toBe(BigInt(body.length));
    expect(bytes.readBigUInt64LE(DM_RESERVED_OFFSET)).toBe(0n);
    expect(bytes.subarray(DM_BODY_OFFSET).equals(body)).toBe(true);

    // A full chunk is a bare record; a dense partial chunk becomes a bitmap.
    const full = new DirtyMap(DM_CHUNK_BLOCKS * 512 * 2, 512);
    full.mark(DM_CHUNK_BLOCKS * 512, DM_CHUNK_BLOCKS * 512);
    expect(full.serialize().subarray(DM_BODY_OFFSET)).toEqual(Buffer.from([0x01, DM_RECORD_FULL]));
    const dense = new DirtyMap(64 * 512, 512);
    for (let b = 0; b < 64; b += 2) dense.mark(b * 512, 512);
    expect(dense.serialize().subarray(DM_BODY_OFFSET)).toEqual(Buffer.from([0x00, DM_RECORD_BITMAP, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55]));
  });

  it('checksums with XXH64 exactly as the xxhash-wasm package computes it', async () => {
    const { h64Raw } = await xxhashWasm();
    const random = prng(3);
    for (const length of [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 100, 1000, 4096 + 5, (1 << 20) + 3]) {
      const data = Uint8Array.from({ length }, () => Math.floor(random() * 256));
      expect(xxh64(data), `length ${length}`).toBe(h64Raw(data));
    }
    const backing = Uint8Array.from({ length: 300 }, () => Math.floor(random() * 256));
    expect(xxh64(backing, 17, 200)).toBe(h64Raw(backing.subarray(17, 217)));
    expect(() => xxh64(backing, 250, 100)).toThrow(/xxh64: length must be an integer from 0 to 50, got 100/);
    const map = new DirtyMap(1 * GiB);
    map.mark(12345, 678_901);
    const bytes = map.serialize();
    expect(bytes.readBigUInt64LE(DM_HEADER_CHECKSUM_OFFSET)).toBe(h64Raw(bytes.subarray(0, DM_HEADER_CHECKSUM_OFFSET)));
    expect(bytes.readBigUInt64LE(DM_BODY_CHECKSUM_OFFSET)).toBe(h64Raw(bytes.subarray(DM_BODY_OFFSET)));
  });
});

describe('DirtyMap.deserialize refuses damage', () => {
  function sample(): Buffer {
    const map = new DirtyMap(1 * GiB, 4096);
    map.mark(0, 8192);
    map.mark(40960, 4096);
    map.mark(512 * MiB, 256 * MiB);
    return map.serialize();
  }

  it('names the offset of each kind of header damage', () => {
    const good = sample();
    expect(corruptOffset(() => DirtyMap.deserialize(good.subarray(0, 40)))).toBe(40);
    const magic = Buffer.from(good);
    magic[3] ^= 1;
    expect(corruptOffset(() => DirtyMap.deserialize(magic))).toBe(0);
    const version = Buffer.from(good);
    version.writeUInt32LE(2, DM_VERSION_OFFSET);
    expect(() => DirtyMap.deserialize(version)).toThrow(/byte 8: format version 2 is not 1/);
    const flipped = Buffer.from(good);
    flipped[DM_DISK_SIZE_OFFSET] ^= 0x10;
    expect(() => DirtyMap.deserialize(flipped)).toThrow(/byte 56: header checksum/);
    const granularity = Buffer.from(good);
    granularity.writeUInt32LE(3000, DM_GRANULARITY_OFFSET);
    expect(corruptOffset(() => DirtyMap.deserialize(reseal(granularity)))).toBe(DM_GRANULARITY_OFFSET);
    const size = Buffer.from(good);
    size.writeBigUInt64LE(0n, DM_DISK_SIZE_OFFSET);
    expect(corruptOffset(() => DirtyMap.deserialize(reseal(size)))).toBe(DM_DISK_SIZE_OFFSET);
    const reserved = Buffer.from(good);
    reserved[DM_RESERVED_OFFSET + 5] = 1;
    expect(corruptOffset(() => DirtyMap.deserialize(reseal(reserved)))).toBe(DM_RESERVED_OFFSET + 5);
    const count = Buffer.from(good);
    count.writeBigUInt64LE(4n, DM_DIRTY_BLOCKS_OFFSET);
    expect(() => DirtyMap.deserialize(reseal(count))).toThrow(/byte 24: header counts 4 dirty blocks, the body holds 65539/);
  });

  it('names the offset of truncation, trailing bytes and body damage', () => {
    const good = sample();
    const short = good.subarray(0, good.length - 2);
    expect(() => DirtyMap.deserialize(short)).toThrow(new RegExp(`byte ${short.length}: file ends 2 bytes before`));
    const long = Buffer.concat([good, Buffer.from([0])]);
    expect(corruptOffset(() => DirtyMap.deserialize(long))).toBe(good.length);
    const body = Buffer.from(good);
    body[DM_BODY_OFFSET + 3] ^= 0x40;
    expect(() => DirtyMap.deserialize(body)).toThrow(/byte 64: body checksum/);
  });

  it('names the offset of malformed records even when the checksums were recomputed', () => {
    const header = sample().subarray(0, DM_HEADER_BYTES);
    const withBody = (bytes: number[], dirtyBlocks = 1): Buffer => {
      const buf = Buffer.concat([header, Buffer.from(bytes)]);
      buf.writeBigUInt64LE(BigInt(bytes.length), DM_BODY_BYTES_OFFSET);
      buf.writeBigUInt64LE(BigInt(dirtyBlocks), DM_DIRTY_BLOCKS_OFFSET);
      return reseal(buf);
    };
    // 1 GiB at 4 KiB = 262144 blocks = 4 chunks.
    expect(() => DirtyMap.deserialize(withBody([0x00, 0x07]))).toThrow(/byte 65: unknown record kind 7/);
    expect(() => DirtyMap.deserialize(withBody([0x04, 0x01]))).toThrow(/byte 64: chunk index lies beyond the disk's 4 chunks/);
    expect(() => DirtyMap.deserialize(withBody([0x00, 0x01, 0x00, 0x01], 131072))).toThrow(/byte 66: chunk index does not ascend/);
    expect(() => DirtyMap.deserialize(withBody([0x00]))).toThrow(/byte 65: record ends before its kind byte/);
    expect(() => DirtyMap.deserialize(withBody([0x00, 0x02, 0x00]))).toThrow(/byte 66: run count 0 is impossible/);
    expect(() => DirtyMap.deserialize(withBody([0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00], 2))).toThrow(/byte 69: run touches the previous run/);
    expect(() => DirtyMap.deserialize(withBody([0x00, 0x02, 0x01, 0xff, 0xff, 0x03, 0x01]))).toThrow(/byte 67: run reaches past the end of its chunk/);
    expect(() => DirtyMap.deserialize(withBody([0x00, 0x02, 0x01, 0x80]))).toThrow(/byte 67: run is truncated/);
    expect(() => DirtyMap.deserialize(withBody([0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02, 0x01]))).toThrow(/byte 64: chunk index is truncated or longer than 64 bits/);
    expect(() => DirtyMap.deserialize(withBody([0x00, 0x03, 0x00]))).toThrow(/byte 66: bitmap is truncated/);
    expect(DirtyMap.deserialize(withBody([0x00, 0x02, 0x01, 0x00, 0x00], 1)).dirtyBlockCount).toBe(1);
  });

  it('refuses bit flips and truncations anywhere with BR_DIRTYMAP_CORRUPT and never crashes (fuzz)', () => {
    const random = prng(0xf022);
    const seeds = [sample()];
    {
      const fragmented = new DirtyMap(2 * DM_CHUNK_BLOCKS * 512 + 777, 512);
      for (let b = 0; b < 2 * DM_CHUNK_BLOCKS; b += 2 + Math.floor(random() * 2)) fragmented.mark(b * 512, 512);
      fragmented.mark(2 * DM_CHUNK_BLOCKS * 512, 777);
      seeds.push(fragmented.serialize());
      const full = new DirtyMap(2 * TiB);
      full.mark(0, 1 * TiB);
      seeds.push(full.serialize());
    }
    let refused = 0;
    let accepted = 0;
    const started = Date.now();
    for (let iteration = 0; iteration < 6000; iteration++) {
      const seed = seeds[iteration % seeds.length]!;
      let buf = Buffer.from(seed);
      const action = random();
      if (action < 0.3) {
        buf = buf.subarray(0, Math.floor(random() * buf.length));
      } else {
        const flips = 1 + Math.floor(random() * 4);
        // Aim most flips at the header and the first records, where the
        // decoder's checks live, rather than deep inside a bitmap.
        for (let f = 0; f < flips; f++) {
          const at = random() < 0.7 ? Math.floor(random() * Math.min(buf.length, DM_HEADER_BYTES + 64)) : Math.floor(random() * buf.length);
          buf[at] ^= 1 << Math.floor(random() * 8);
        }
      }
      // Half the time recompute the checksums so the damage reaches the
      // field checks and the body decoder instead of stopping at a checksum.
      if (random() < 0.5 && buf.length >= DM_HEADER_BYTES) {
        if (random() < 0.5) buf.writeBigUInt64LE(BigInt(buf.length - DM_BODY_OFFSET), DM_BODY_BYTES_OFFSET);
        reseal(buf);
      }
      try {
        const map = DirtyMap.deserialize(buf);
        accepted++;
        expect(map.checkInvariants()).toBeNull();
        expect(DirtyMap.deserialize(map.serialize()).dirtyBlockCount).toBe(map.dirtyBlockCount);
      } catch (err) {
        if (!isBlockrelayError(err) || err.code !== 'BR_DIRTYMAP_CORRUPT') throw err;
        expect(err.message).toMatch(/^dirty map damaged at byte \d+: /);
        expect(Number(err.details.offset)).toBeLessThanOrEqual(buf.length);
        refused++;
      }
    }
    console.log(`fuzz: ${refused} refused, ${accepted} accepted (resealed mutations that stay valid), ${Date.now() - started} ms`);
    expect(refused).toBeGreaterThan(5000);
  });
});

describe('DirtyMap against a plain model', () => {
  it('agrees with a per-block model over thousands of random operations', () => {
    const random = prng(0xd1a7);
    const granularity = 512;
    // Three full chunks and a partial fourth, with a partial last block.
    const blockCount = 3 * DM_CHUNK_BLOCKS + 1000;
    const diskSize = (blockCount - 1) * granularity + 100;
    const map = new DirtyMap(diskSize, granularity);
    const model = new Uint8Array(blockCount);

    const modelExtents = (offset: number, length: number): DirtyExtent[] => {
      const out: DirtyExtent[] = [];
      if (length === 0) return out;
      const end = offset + length;
      for (let b = Math.floor(offset / granularity); b < Math.ceil(end / granularity); b++) {
        if (!model[b]) continue;
        const start = Math.max(b * granularity, offset);
        const stop = Math.min((b + 1) * granularity, end);
        const last = out[out.length - 1];
        if (last && last.offset + last.length === start) out[out.length - 1] = { offset: last.offset, length: stop - last.offset };
        else out.push({ offset: start, length: stop - start });
      }
      return out;
    };
    // The first phase scatters small marks over the boundary of chunks 0 and
    // 1, so those chunks collect more than 1024 runs and become bitmaps; the
    // mixed phase after it clears them back down to run arrays.
    const scatterOps = 3000;
    const hotStart = (DM_CHUNK_BLOCKS - 10_000) * granularity;
    const hotBytes = 20_000 * granularity;
    const randomRange = (scatter: boolean): [number, number] => {
      if (scatter) return [hotStart + Math.floor(random() * hotBytes), 1 + Math.floor(random() * granularity)];
      const pick = random();
      const offset = random() < 0.3 ? hotStart + Math.floor(random() * hotBytes) : Math.floor(random() * diskSize);
      const maxLength = diskSize - offset;
      const length =
        pick < 0.6 ? Math.min(maxLength, Math.floor(random() * 4 * granularity)) : pick < 0.9 ? Math.min(maxLength, Math.floor(random() * 200 * granularity)) : Math.floor(random() * maxLength);
      return [offset, length];
    };

    let dirtyCount = 0;
    let mostBitmaps = 0;
    let bitmapsReturnedToRuns = false;
    for (let op = 0; op < 8000; op++) {
      const scatter = op < scatterOps;
      const kind = scatter ? 0 : random();
      const [offset, length] = randomRange(scatter);
      if (kind < 0.55) {
        map.mark(offset, length);
        if (length > 0) {
          for (let b = Math.floor(offset / granularity); b < Math.ceil((offset + length) / granularity); b++) {
            if (!model[b]) dirtyCount++;
            model[b] = 1;
          }
        }
      } else if (kind < 0.8) {
        map.clear(offset, length);
        const end = offset + length;
        const first = Math.ceil(offset / granularity);
        const last = end === diskSize ? blockCount : Math.floor(end / granularity);
        for (let b = first; b < last; b++) {
          if (model[b]) dirtyCount--;
          model[b] = 0;
        }
      } else if (kind < 0.95) {
        let expected = false;
        for (let b = Math.floor(offset / granularity); length > 0 && b < Math.ceil((offset + length) / granularity); b++) {
          if (model[b]) {
            expected = true;
            break;
          }
        }
        expect(map.isDirty(offset, length), `op ${op} isDirty(${offset}, ${length})`).toBe(expected);
      } else {
        expect(all(map, offset, length), `op ${op} extents(${offset}, ${length})`).toEqual(modelExtents(offset, length));
      }
      expect(map.dirtyBlockCount, `op ${op}`).toBe(dirtyCount);
      const { bitmapChunks } = map.chunkStats();
      if (bitmapChunks < mostBitmaps) bitmapsReturnedToRuns = true;
      mostBitmaps = Math.max(mostBitmaps, bitmapChunks);
      if (op % 500 === 0) {
        expect(map.checkInvariants(), `op ${op}`).toBeNull();
        expect(all(map), `op ${op}`).toEqual(modelExtents(0, diskSize));
        const lastDirty = model[blockCount - 1] ? (blockCount - 1) * granularity : -1;
        expect(map.dirtyBytes()).toBe(dirtyCount * granularity - (lastDirty >= 0 ? granularity - 100 : 0));
      }
      if (op % 1000 === 999) {
        const copy = DirtyMap.deserialize(map.serialize());
        expect(all(copy)).toEqual(all(map));
        const union = new DirtyMap(diskSize, granularity);
        union.merge(copy);
        expect(union.dirtyBlockCount).toBe(dirtyCount);
      }
    }
    expect(all(map)).toEqual(modelExtents(0, diskSize));
    expect(map.checkInvariants()).toBeNull();
    // The run the model checked went through every chunk representation.
    expect(mostBitmaps).toBeGreaterThan(0);
    expect(bitmapsReturnedToRuns).toBe(true);
  });
});
