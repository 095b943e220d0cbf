import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  canPunchHoles,
  fileAllocation,
  nativeFileExtents,
  NO_MORE_DATA,
  SEEKS_PER_EVENT_LOOP_TURN,
  type FileExtent,
  type FileExtentOps,
} from '../../src/platform/file-extents';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const KiB = 1024;
const MiB = 1024 * KiB;

/** A sparse file made the way an operator would: truncate, then dd writes (offsets in bytes). */
function makeSparseFile(file: string, sizeBytes: number, writes: ReadonlyArray<{ offset: number; length: number }>): void {
  execFileSync('truncate', ['-s', String(sizeBytes), file]);
  for (const w of writes) {
    execFileSync('dd', ['if=/dev/urandom', `of=${file}`, 'bs=64K', `seek=${w.offset}`, `count=${w.length}`, 'conv=notrunc', 'status=none', 'iflag=count_bytes,fullblock', 'oflag=seek_bytes']);
  }
}

async function collect(it: AsyncIterable<FileExtent>): Promise<FileExtent[]> {
  const out: FileExtent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

/** qemu-img's allocation map of a raw file, clipped to the file's size (qemu rounds it up to 512). */
function qemuMap(file: string): FileExtent[] {
  const sizeBytes = fs.statSync(file).size;
  const json = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', '-f', 'raw', file], { encoding: 'utf8' })) as Array<{ start: number; length: number; data: boolean }>;
  const out: FileExtent[] = [];
  for (const e of json) {
    const end = Math.min(e.start + e.length, sizeBytes);
    if (end <= e.start) continue;
    const last = out[out.length - 1];
    if (last !== undefined && last.zero === !e.data && last.offset + last.length === e.start) out[out.length - 1] = { ...last, length: end - last.offset };
    else out.push({ offset: e.start, length: end - e.start, zero: !e.data });
  }
  return out;
}

function withFd<T>(file: string, flags: string, body: (fd: number) => Promise<T>): Promise<T> {
  const fd = fs.openSync(file, flags);
  return body(fd).finally(() => fs.closeSync(fd));
}

/** A file map held in memory: the data runs of a pretend filesystem, for the walk's own rules. */
function modelOps(sizeBytes: number, data: ReadonlyArray<readonly [number, number]>): FileExtentOps & { seeks: number } {
  const model = {
    seeks: 0,
    seekData(_fd: number, offset: number) {
      model.seeks++;
      if (offset >= sizeBytes) return NO_MORE_DATA;
      for (const [s, e] of data) if (e > offset) return Math.max(s, offset);
      return NO_MORE_DATA;
    },
    seekHole(_fd: number, offset: number) {
      model.seeks++;
      if (offset >= sizeBytes) return NO_MORE_DATA;
      for (const [s, e] of data) if (s <= offset && e > offset) return e;
      return offset;
    },
    punchHole: async () => 'unsupported' as const,
  };
  return model;
}

function expectCovers(extents: FileExtent[], offset: number, length: number): void {
  let at = offset;
  let lastZero: boolean | undefined;
  for (const e of extents) {
    expect(e.offset, 'runs are contiguous and in order').toBe(at);
    expect(e.length).toBeGreaterThan(0);
    expect(e.zero, 'neighbouring runs differ in kind').not.toBe(lastZero);
    lastZero = e.zero;
    at += e.length;
  }
  expect(at, 'runs cover the range').toBe(offset + length);
}

describe('native seeks and punch', () => {
  it('finds data and holes with lseek and answers -1 past the last data', async () => {
    const file = path.join(tempDir(), 'seek.img');
    makeSparseFile(file, 10 * MiB, [{ offset: 12 * KiB, length: 20 * KiB }]);
    await withFd(file, 'r', async (fd) => {
      expect(nativeFileExtents.seekData(fd, 0)).toBe(12 * KiB);
      expect(nativeFileExtents.seekHole(fd, 12 * KiB)).toBe(32 * KiB);
      expect(nativeFileExtents.seekData(fd, 32 * KiB)).toBe(NO_MORE_DATA);
      expect(nativeFileExtents.seekHole(fd, 32 * KiB)).toBe(32 * KiB);
      // The end of the file is a hole; past it lseek says ENXIO.
      expect(nativeFileExtents.seekHole(fd, 10 * MiB - 1)).toBe(10 * MiB - 1);
      expect(nativeFileExtents.seekData(fd, 20 * MiB)).toBe(NO_MORE_DATA);
      expect(nativeFileExtents.seekHole(fd, 20 * MiB)).toBe(NO_MORE_DATA);
    });
  });

  it('punches a hole that frees space and reads back zeroes, zeroing unaligned edges but not their neighbours', async () => {
    const file = path.join(tempDir(), 'punch.img');
    const content = Buffer.alloc(8 * MiB, 0x5c);
    fs.writeFileSync(file, content);
    const before = fs.statSync(file).blocks;
    await withFd(file, 'r+', async (fd) => {
      expect(await nativeFileExtents.punchHole(fd, 1 * MiB + 100, 4 * MiB)).toBe('punched');
    });
    const after = fs.statSync(file);
    expect(after.size).toBe(8 * MiB);
    expect((before - after.blocks) * 512).toBeGreaterThanOrEqual(4 * MiB - 8 * KiB);
    content.fill(0, 1 * MiB + 100, 5 * MiB + 100);
    expect(fs.readFileSync(file).equals(content)).toBe(true);
  });

  it('probes hole punching past the end of a file without changing it', async () => {
    const file = path.join(tempDir(), 'probe.img');
    fs.writeFileSync(file, Buffer.alloc(10_000, 7));
    await withFd(file, 'r+', async (fd) => expect(await canPunchHoles(fd, 10_000)).toBe(true));
    expect(fs.readFileSync(file).equals(Buffer.alloc(10_000, 7))).toBe(true);
  });

  it('throws errno-coded errors for a bad descriptor and range errors for bad arguments before calling the addon', async () => {
    const notOpen = 2 ** 30;
    expect(() => nativeFileExtents.seekData(notOpen, 0)).toThrow(expect.objectContaining({ code: 'EBADF', syscall: 'lseek(SEEK_DATA)' }));
    await expect(nativeFileExtents.punchHole(notOpen, 0, 4096)).rejects.toMatchObject({ code: 'EBADF' });
    expect(() => nativeFileExtents.seekData(-1, 0)).toThrow(RangeError);
    expect(() => nativeFileExtents.seekHole(0, 0.5)).toThrow(RangeError);
    expect(() => nativeFileExtents.seekHole(0, -4096)).toThrow(RangeError);
    await expect(nativeFileExtents.punchHole(0, 0, 0)).rejects.toThrow(RangeError);
    await expect(nativeFileExtents.punchHole(0, 2 ** 53, 1)).rejects.toThrow(RangeError);
    await expect(collect(fileAllocation(0, 0, 4096, { granularityBytes: 3000 }))).rejects.toThrow(RangeError);
  });

  it('refuses to punch on a descriptor opened read-only', async () => {
    const file = path.join(tempDir(), 'ro.img');
    fs.writeFileSync(file, Buffer.alloc(64 * KiB, 1));
    await withFd(file, 'r', async (fd) => {
      await expect(nativeFileExtents.punchHole(fd, 0, 4096)).rejects.toMatchObject({ code: 'EBADF' });
    });
    expect(fs.readFileSync(file).equals(Buffer.alloc(64 * KiB, 1))).toBe(true);
  });
});

describe('fileAllocation', () => {
  const layouts: Array<{ name: string; sizeBytes: number; writes: Array<{ offset: number; length: number }> }> = [
    { name: 'two data runs, one unaligned', sizeBytes: 10 * MiB, writes: [{ offset: 12 * KiB, length: 20 * KiB }, { offset: 5_000_000, length: 1000 }] },
    { name: 'data at the first and last bytes of an odd-sized file', sizeBytes: 10 * MiB + 1234, writes: [{ offset: 0, length: 512 }, { offset: 10 * MiB + 1000, length: 234 }] },
    { name: 'all hole', sizeBytes: 4 * MiB, writes: [] },
    { name: 'all data', sizeBytes: 2 * MiB, writes: [{ offset: 0, length: 2 * MiB }] },
    {
      name: 'many small fragments',
      sizeBytes: 16 * MiB,
      writes: Array.from({ length: 60 }, (_, i) => ({ offset: ((i * 7919) % 4000) * 4 * KiB + (i % 3) * 700, length: 100 + (i % 5) * 1500 })),
    },
  ];

  for (const layout of layouts) {
    it(`matches qemu-img map for a sparse file: ${layout.name}`, async () => {
      if (!requireTool('qemu-img')) return;
      const file = path.join(tempDir(), 'map.img');
      makeSparseFile(file, layout.sizeBytes, layout.writes);
      const ours = await withFd(file, 'r', (fd) => collect(fileAllocation(fd, 0, layout.sizeBytes)));
      expectCovers(ours, 0, layout.sizeBytes);
      expect(ours).toEqual(qemuMap(file));
    });
  }

  it('covers any sub-range exactly, and its zero runs read as zeroes', async () => {
    const file = path.join(tempDir(), 'sub.img');
    const sizeBytes = 8 * MiB;
    makeSparseFile(file, sizeBytes, [{ offset: 100 * KiB, length: 50 * KiB }, { offset: 3 * MiB, length: 1 }, { offset: 6 * MiB - 10, length: 20 }]);
    const bytes = fs.readFileSync(file);
    await withFd(file, 'r', async (fd) => {
      for (const [offset, length] of [[0, sizeBytes], [1, 1], [99 * KiB, 10 * KiB], [120 * KiB, 3 * MiB], [3 * MiB + 1, 3 * MiB], [sizeBytes - 1, 1], [5, 0]] as const) {
        const runs = await collect(fileAllocation(fd, offset, length));
        expectCovers(runs, offset, length);
        for (const r of runs.filter((x) => x.zero)) expect(bytes.subarray(r.offset, r.offset + r.length).equals(Buffer.alloc(r.length)), `zero run at ${r.offset}`).toBe(true);
      }
    });
  });

  it('reports the part of a range past the end of the file as a hole', async () => {
    const file = path.join(tempDir(), 'short.img');
    makeSparseFile(file, 1 * MiB, [{ offset: 1 * MiB - 4 * KiB, length: 4 * KiB }]);
    const runs = await withFd(file, 'r', (fd) => collect(fileAllocation(fd, 0, 3 * MiB)));
    expect(runs).toEqual([
      { offset: 0, length: 1 * MiB - 4 * KiB, zero: true },
      { offset: 1 * MiB - 4 * KiB, length: 4 * KiB, zero: false },
      { offset: 1 * MiB, length: 2 * MiB, zero: true },
    ]);
  });

  it('widens data runs outward to the granularity and merges runs that then touch', async () => {
    // 512-byte filesystem blocks: runs a 4 KiB walk must widen and join.
    const ops = modelOps(64 * KiB, [[1000, 1500], [5000, 6000], [20_480, 20_992], [40_000, 40_001]]);
    expect(await collect(fileAllocation(0, 0, 64 * KiB, { ops }))).toEqual([
      { offset: 0, length: 8192, zero: false },
      { offset: 8192, length: 12_288, zero: true },
      { offset: 20_480, length: 4096, zero: false },
      { offset: 24_576, length: 12_288, zero: true },
      { offset: 36_864, length: 4096, zero: false },
      { offset: 40_960, length: 24_576, zero: true },
    ]);
    // Widening never reaches outside the asked range.
    expect(await collect(fileAllocation(0, 1200, 5000, { ops }))).toEqual([{ offset: 1200, length: 5000, zero: false }]);
    expect(await collect(fileAllocation(0, 9000, 12_000, { ops }))).toEqual([
      { offset: 9000, length: 11_480, zero: true },
      { offset: 20_480, length: 520, zero: false },
    ]);
  });

  it('holds its rules on random file maps at random granularities', async () => {
    let seed = 0x5eed;
    const rand = (): number => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed / 4294967296;
    };
    for (let round = 0; round < 300; round++) {
      const sizeBytes = 1 + Math.floor(rand() * 200_000);
      const data: Array<[number, number]> = [];
      for (let at = Math.floor(rand() * 5000); at < sizeBytes; ) {
        const end = Math.min(sizeBytes, at + 1 + Math.floor(rand() * 9000));
        data.push([at, end]);
        at = end + 1 + Math.floor(rand() * 20_000);
      }
      const granularity = 2 ** Math.floor(rand() * 14);
      const offset = Math.floor(rand() * sizeBytes);
      const length = Math.floor(rand() * (sizeBytes - offset + 1));
      const runs = await collect(fileAllocation(0, offset, length, { granularityBytes: granularity, ops: modelOps(sizeBytes, data) }));
      expectCovers(runs, offset, length);
      for (const r of runs) {
        const touchesData = data.some(([s, e]) => s < r.offset + r.length && e > r.offset);
        if (r.zero) expect(touchesData, `zero run at ${r.offset} in round ${round}`).toBe(false);
        else {
          expect(touchesData, `data run at ${r.offset} in round ${round} holds data`).toBe(true);
          // Inner edges of data runs lie on the granularity.
          if (r.offset !== offset) expect(r.offset % granularity).toBe(0);
          if (r.offset + r.length !== offset + length) expect((r.offset + r.length) % granularity).toBe(0);
        }
      }
      for (const [s, e] of data) {
        const lo = Math.max(s, offset);
        const hi = Math.min(e, offset + length);
        if (lo < hi) expect(runs.some((r) => !r.zero && r.offset <= lo && r.offset + r.length >= hi), `data [${lo}, ${hi}) inside one data run`).toBe(true);
      }
    }
  });

  it('reports one data run where the filesystem cannot seek holes', async () => {
    const unsupported: FileExtentOps = {
      seekData: () => 'unsupported',
      seekHole: () => 'unsupported',
      punchHole: async () => 'unsupported',
    };
    expect(await collect(fileAllocation(3, 4096, MiB, { ops: unsupported }))).toEqual([{ offset: 4096, length: MiB, zero: false }]);
  });

  it('lets the event loop run during a long walk of a fragmented file', async () => {
    const data: Array<[number, number]> = [];
    for (let i = 0; i < 2000; i++) data.push([i * 8192, i * 8192 + 4096]);
    const ops = modelOps(2000 * 8192, data);
    // Queued before the walk starts: it runs before the walk ends only if the walk gives the event loop a turn.
    let ranDuringWalk = false;
    setImmediate(() => (ranDuringWalk = true));
    const runs = await collect(fileAllocation(0, 0, 2000 * 8192, { ops }));
    expect(ranDuringWalk).toBe(true);
    expect(runs.length).toBe(4000);
    expect(ops.seeks).toBeGreaterThan(2 * SEEKS_PER_EVENT_LOOP_TURN);
  });
});
