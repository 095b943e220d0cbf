import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { nativeFileExtents, type FileExtentOps } from '../../src/platform/file-extents';
import { openDisk } from '../../src/targets/disk-spec';
import type { AllocationExtent, DiskTarget } from '../../src/targets/disk-target';
import { RawTarget } from '../../src/targets/raw/raw-target';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { runConformanceSuite } from './conformance';

const tempDir = useTempDirs();
const KiB = 1024;
const MiB = 1024 * KiB;

/** A filesystem that can neither seek holes nor punch them (vfat, old kernels, some FUSE mounts). */
const unsupportedFileExtents: FileExtentOps = {
  seekData: () => 'unsupported',
  seekHole: () => 'unsupported',
  punchHole: async () => 'unsupported',
};

runConformanceSuite('raw file', {
  create: (sizeBytes) => openDisk(`raw:${path.join(tempDir(), 'disk.img')}`, { create: { sizeBytes } }),
  reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
});

runConformanceSuite('raw file on a filesystem without hole support', {
  create: (sizeBytes) => RawTarget.open(path.join(tempDir(), 'disk.img'), { create: { sizeBytes }, fileExtents: unsupportedFileExtents }),
  reopen: (t, { readOnly }) => RawTarget.open(t.spec.slice('raw:'.length), { readOnly, fileExtents: unsupportedFileExtents }),
}, { operations: 150 });

async function collect(it: AsyncIterable<AllocationExtent>): Promise<AllocationExtent[]> {
  const out: AllocationExtent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

/** truncate, then dd writes at byte offsets: a sparse raw disk as an operator would make one. */
function makeSparseFile(file: string, sizeBytes: number, writes: ReadonlyArray<readonly [offset: number, length: number]>): void {
  execFileSync('truncate', ['-s', String(sizeBytes), file]);
  for (const [offset, length] of writes) {
    execFileSync('dd', ['if=/dev/urandom', `of=${file}`, 'bs=64K', `seek=${offset}`, `count=${length}`, 'conv=notrunc', 'status=none', 'iflag=count_bytes,fullblock', 'oflag=seek_bytes']);
  }
}

function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

async function readAll(t: DiskTarget): Promise<Buffer> {
  return t.read(0, t.sizeBytes);
}

describe('raw target', () => {
  it('creates a sparse file and releases the tail on writeZeroes', async () => {
    const file = path.join(tempDir(), 'sparse.img');
    const t = await openDisk(`raw:${file}`, { create: { sizeBytes: 64 * 1024 * 1024 } });
    expect(fs.statSync(file).blocks * 512).toBeLessThan(1024 * 1024);
    await t.write(32 * 1024 * 1024, Buffer.alloc(32 * 1024 * 1024, 1));
    expect(fs.statSync(file).blocks * 512).toBeGreaterThanOrEqual(32 * 1024 * 1024);
    await t.writeZeroes(32 * 1024 * 1024, 32 * 1024 * 1024);
    await t.close();
    expect(fs.statSync(file).size).toBe(64 * 1024 * 1024);
    expect(fs.statSync(file).blocks * 512).toBeLessThan(1024 * 1024);
  });

  it('refuses to create over an existing non-empty file with BR_TARGET_NAME_CONFLICT', async () => {
    const file = path.join(tempDir(), 'theirs.img');
    fs.writeFileSync(file, 'not ours');
    await expect(openDisk(`raw:${file}`, { create: { sizeBytes: 1024 * 1024 } })).rejects.toMatchObject({ code: 'BR_TARGET_NAME_CONFLICT' });
    expect(fs.readFileSync(file, 'utf8')).toBe('not ours');
  });

  it('creates into an empty existing file', async () => {
    const file = path.join(tempDir(), 'empty.img');
    fs.writeFileSync(file, '');
    const t = await openDisk(`raw:${file}`, { create: { sizeBytes: 1024 * 1024 } });
    await t.close();
    expect(fs.statSync(file).size).toBe(1024 * 1024);
  });

  it('refuses to open a missing file with BR_FILE_NOT_FOUND', async () => {
    await expect(openDisk(`raw:${path.join(tempDir(), 'missing.img')}`)).rejects.toMatchObject({ code: 'BR_FILE_NOT_FOUND' });
  });

  it('refuses a directory with BR_TARGET_UNSUPPORTED', async () => {
    await expect(openDisk(`raw:${tempDir()}`)).rejects.toMatchObject({ code: 'BR_TARGET_UNSUPPORTED' });
  });

  it('reports the holes of a sparse file as zero extents, as qemu-img map does', async () => {
    if (!requireTool('qemu-img')) return;
    const file = path.join(tempDir(), 'sparse.img');
    makeSparseFile(file, 32 * MiB, [[0, 4 * KiB], [12 * KiB, 20 * KiB], [5_000_000, 1000], [17 * MiB, 3 * MiB], [32 * MiB - 100, 100]]);
    const qemu = (JSON.parse(execFileSync('qemu-img', ['map', '--output=json', '-f', 'raw', file], { encoding: 'utf8' })) as Array<{ start: number; length: number; data: boolean }>).map((e) => ({
      offset: e.start,
      length: e.length,
      zero: !e.data,
    }));
    const t = await openDisk(`raw:${file}`, { readOnly: true });
    try {
      const ours = await collect(t.extents(0, t.sizeBytes));
      expect(ours).toEqual(qemu);
      expect(ours.filter((e) => e.zero).length).toBe(4);
    } finally {
      await t.close();
    }
  });

  it('discards by punching holes: the space is freed and the range reads back as zeroes', async () => {
    const file = path.join(tempDir(), 'discard.img');
    const t = await openDisk(`raw:${file}`, { create: { sizeBytes: 32 * MiB } });
    expect(t.capabilities).toMatchObject({ sparse: true, discard: true });
    const content = Buffer.alloc(32 * MiB, 0xa5);
    await t.write(0, content);
    await t.flush();
    const before = allocatedBytes(file);
    expect(before).toBeGreaterThanOrEqual(32 * MiB);
    // Unaligned at both ends: the kernel zeroes the partial blocks, the neighbours keep their bytes.
    await t.discard(4 * MiB + 333, 8 * MiB);
    await t.writeZeroes(20 * MiB, 4 * MiB + 1);
    await t.flush();
    content.fill(0, 4 * MiB + 333, 12 * MiB + 333).fill(0, 20 * MiB, 24 * MiB + 1);
    expect(before - allocatedBytes(file)).toBeGreaterThanOrEqual(12 * MiB - 8 * KiB);
    expect((await readAll(t)).equals(content)).toBe(true);
    expect((await collect(t.extents(0, t.sizeBytes))).filter((e) => e.zero)).toEqual([
      { offset: 4 * MiB + 4 * KiB, length: 8 * MiB - 4 * KiB, zero: true },
      { offset: 20 * MiB, length: 4 * MiB, zero: true },
    ]);
    await t.close();
    expect(fs.readFileSync(file).equals(content)).toBe(true);
  });

  it('keeps a hole a hole when zeroes are written over it', async () => {
    const file = path.join(tempDir(), 'hole.img');
    const t = await openDisk(`raw:${file}`, { create: { sizeBytes: 8 * MiB } });
    await t.writeZeroes(1 * MiB + 1, 3 * MiB);
    await t.discard(5 * MiB + 7, 100);
    await t.close();
    expect(allocatedBytes(file)).toBe(0);
  });

  it('says discard is unsupported when opened read-only, and still reports holes', async () => {
    const file = path.join(tempDir(), 'ro.img');
    makeSparseFile(file, 4 * MiB, [[1 * MiB, 4 * KiB]]);
    const t = await openDisk(`raw:${file}`, { readOnly: true });
    expect(t.capabilities).toMatchObject({ sparse: true, discard: false, readOnly: true });
    expect(await collect(t.extents(0, t.sizeBytes))).toEqual([
      { offset: 0, length: 1 * MiB, zero: true },
      { offset: 1 * MiB, length: 4 * KiB, zero: false },
      { offset: 1 * MiB + 4 * KiB, length: 3 * MiB - 4 * KiB, zero: true },
    ]);
    await t.close();
  });

  it('falls back to one data extent and written zeroes on a filesystem without hole support', async () => {
    const file = path.join(tempDir(), 'nosupport.img');
    const t = await RawTarget.open(file, { create: { sizeBytes: 16 * MiB }, fileExtents: unsupportedFileExtents });
    expect(t.capabilities).toMatchObject({ sparse: true, discard: false });
    await t.write(0, Buffer.alloc(16 * MiB, 0x11));
    await t.flush();
    const before = allocatedBytes(file);
    await t.discard(2 * MiB, 4 * MiB);
    await t.writeZeroes(8 * MiB + 1, 1000);
    await t.flush();
    // Zeroes were written, not punched: nothing was freed.
    expect(allocatedBytes(file)).toBe(before);
    const expected = Buffer.alloc(16 * MiB, 0x11).fill(0, 2 * MiB, 6 * MiB).fill(0, 8 * MiB + 1, 8 * MiB + 1001);
    expect((await readAll(t)).equals(expected)).toBe(true);
    expect(await collect(t.extents(0, t.sizeBytes))).toEqual([{ offset: 0, length: 16 * MiB, zero: false }]);
    // The tail is still released by truncating down and up.
    await t.writeZeroes(12 * MiB, 4 * MiB);
    await t.close();
    expect(before - allocatedBytes(file)).toBeGreaterThanOrEqual(4 * MiB);
  });

  it('withdraws discard support when the filesystem refuses a punch after the probe, and writes zeroes instead', async () => {
    const file = path.join(tempDir(), 'refuses.img');
    const punched: Array<[number, number]> = [];
    // Accepts the probe past the end of the file, refuses real punches.
    const refusing: FileExtentOps = {
      seekData: nativeFileExtents.seekData,
      seekHole: nativeFileExtents.seekHole,
      punchHole: async (fd, offset, length) => {
        punched.push([offset, length]);
        return offset >= 4 * MiB ? nativeFileExtents.punchHole(fd, offset, length) : 'unsupported';
      },
    };
    const t = await RawTarget.open(file, { create: { sizeBytes: 4 * MiB }, fileExtents: refusing });
    expect(t.capabilities.discard).toBe(true);
    await t.write(0, Buffer.alloc(4 * MiB, 0x22));
    await t.discard(1 * MiB, 1 * MiB);
    expect(t.capabilities.discard).toBe(false);
    await t.discard(3 * MiB - 4, 4);
    expect(punched.length).toBe(2);
    expect((await readAll(t)).equals(Buffer.alloc(4 * MiB, 0x22).fill(0, 1 * MiB, 2 * MiB).fill(0, 3 * MiB - 4, 3 * MiB))).toBe(true);
    await t.close();
  });

  it('refuses to go on walking extents once closed', async () => {
    const file = path.join(tempDir(), 'walk.img');
    makeSparseFile(file, 4 * MiB, [[0, 4 * KiB], [1 * MiB, 4 * KiB], [2 * MiB, 4 * KiB]]);
    const t = await openDisk(`raw:${file}`, { readOnly: true });
    const walk = t.extents(0, t.sizeBytes)[Symbol.asyncIterator]();
    expect((await walk.next()).value).toEqual({ offset: 0, length: 4 * KiB, zero: false });
    await t.close();
    await expect(walk.next()).rejects.toMatchObject({ code: 'BR_TARGET_CLOSED' });
  });

  it('waits for a punch in flight before closing the file', async () => {
    const file = path.join(tempDir(), 'inflight.img');
    // A punch slow to reach the kernel: close() must not release the descriptor under it.
    const slow: FileExtentOps = {
      ...nativeFileExtents,
      punchHole: async (fd, offset, length) => {
        await new Promise((resolve) => setTimeout(resolve, 100));
        return nativeFileExtents.punchHole(fd, offset, length);
      },
    };
    const t = await RawTarget.open(file, { create: { sizeBytes: 8 * MiB }, fileExtents: slow });
    await t.write(0, Buffer.alloc(8 * MiB, 0x33));
    const discarding = t.discard(0, 8 * MiB);
    await t.close();
    await discarding;
    expect(fs.readFileSync(file).equals(Buffer.alloc(8 * MiB))).toBe(true);
  });
});
