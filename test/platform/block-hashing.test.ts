import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { preadHashBlocks, xxh64Blocks, xxh64BlocksVectorized } from '../../src/platform/block-hashing';
import { BlockHasher } from '../../src/resync/block-hasher';
import { openDisk } from '../../src/targets/disk-spec';
import { fillRandom, seededRandom } from '../resync/seeded-random';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const KiB = 1024;

/** The reference: xxhash-wasm (written by others) over the same bytes, read by node:fs. */
async function expectedHashes(bytes: Buffer, blockBytes: number): Promise<Buffer> {
  const wasm = await BlockHasher.create('wasm');
  return wasm.hashBlocks(bytes, blockBytes);
}

function randomFile(sizeBytes: number, seed: number): { file: string; bytes: Buffer } {
  const bytes = fillRandom(Buffer.alloc(sizeBytes), seededRandom(seed));
  const file = path.join(tempDir(), `f${seed}.img`);
  fs.writeFileSync(file, bytes);
  return { file, bytes };
}

describe('preadHashBlocks', () => {
  it('gives the hashes xxhash-wasm gives for random ranges, block sizes and short last blocks', async () => {
    const size = 3 * 1024 * KiB + 1234;
    const { file, bytes } = randomFile(size, 7);
    const fd = fs.openSync(file, 'r');
    try {
      const random = seededRandom(11);
      for (let i = 0; i < 60; i++) {
        const blockBytes = [512, 4 * KiB, 64 * KiB, 300 * KiB, 1024 * KiB][i % 5];
        const offset = Math.floor(random() * (size - 1));
        const length = 1 + Math.floor(random() * (size - offset));
        const dest = i % 2 === 0 ? Buffer.alloc(length, 0xee) : undefined;
        const { hashes, bytesHeld } = await preadHashBlocks(fd, offset, length, blockBytes, dest);
        expect(bytesHeld).toBe(length);
        expect(hashes.equals(await expectedHashes(bytes.subarray(offset, offset + length), blockBytes))).toBe(true);
        if (dest !== undefined) expect(dest.equals(bytes.subarray(offset, offset + length))).toBe(true);
      }
    } finally {
      fs.closeSync(fd);
    }
  });

  it('reads past the end of the file as zeroes and says how much the file held', async () => {
    const { file, bytes } = randomFile(10 * KiB, 3);
    const fd = fs.openSync(file, 'r');
    try {
      const dest = Buffer.alloc(16 * KiB, 0xee);
      const { hashes, bytesHeld } = await preadHashBlocks(fd, 4 * KiB, 16 * KiB, 4 * KiB, dest);
      expect(bytesHeld).toBe(6 * KiB);
      const expected = Buffer.concat([bytes.subarray(4 * KiB), Buffer.alloc(10 * KiB)]);
      expect(dest.equals(expected)).toBe(true);
      expect(hashes.equals(await expectedHashes(expected, 4 * KiB))).toBe(true);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('refuses bad arguments before they reach C++ and reports a failed read by errno name', async () => {
    const { file } = randomFile(8 * KiB, 5);
    const fd = fs.openSync(file, 'r');
    try {
      await expect(preadHashBlocks(fd, 0, 0, 4 * KiB)).rejects.toThrow(RangeError);
      await expect(preadHashBlocks(fd, -1, 4 * KiB, 4 * KiB)).rejects.toThrow(RangeError);
      await expect(preadHashBlocks(fd, 0, 4 * KiB, 0)).rejects.toThrow(RangeError);
      await expect(preadHashBlocks(fd, 0, 257 * 1024 * KiB, 4 * KiB)).rejects.toThrow(RangeError);
      await expect(preadHashBlocks(fd, 0, 8 * KiB, 4 * KiB, Buffer.alloc(4 * KiB))).rejects.toThrow(/dest holds/);
    } finally {
      fs.closeSync(fd);
    }
    // A descriptor open for writing only cannot be read.
    const wfd = fs.openSync(file, 'w');
    try {
      await expect(preadHashBlocks(wfd, 0, 4 * KiB, 4 * KiB)).rejects.toMatchObject({ code: 'EBADF', syscall: 'pread' });
    } finally {
      fs.closeSync(wfd);
    }
  });
});

describe('xxh64Blocks', () => {
  it('gives xxhash-wasm\'s hashes on the vector path and the scalar path alike, for every block size and length', async () => {
    // On a CPU with AVX-512 the default path hashes eight blocks side by
    // side: it must agree bit for bit with the scalar code and with a
    // reference written by others, including the blocks it leaves to the
    // scalar code (fewer than eight at the end, a short last block).
    const random = seededRandom(23);
    const data = fillRandom(Buffer.alloc(2 * 1024 * KiB + 77), random);
    const sizes = [1, 7, 31, 32, 33, 64, 96, 512, 4 * KiB, 4 * KiB + 8, 64 * KiB, 1024 * KiB];
    for (let i = 0; i < 120; i++) {
      const blockBytes = sizes[i % sizes.length];
      const start = Math.floor(random() * 64);
      const length = Math.floor(random() * Math.min(data.length - start, blockBytes * 19 + 5));
      const bytes = data.subarray(start, start + length);
      const expected = await expectedHashes(bytes, blockBytes);
      expect(xxh64Blocks(bytes, blockBytes).equals(expected), `${length} bytes in ${blockBytes}-byte blocks`).toBe(true);
      expect(xxh64Blocks(bytes, blockBytes, { scalar: true }).equals(expected)).toBe(true);
    }
  });

  it('says whether this CPU takes the vector path, and refuses a block size of 0', () => {
    expect(typeof xxh64BlocksVectorized()).toBe('boolean');
    expect(() => xxh64Blocks(Buffer.alloc(8), 0)).toThrow(RangeError);
    expect(xxh64Blocks(Buffer.alloc(0), 4096).length).toBe(0);
  });
});

describe('RawTarget.hashBlocks', () => {
  it('equals the hashes of read() over the same range, and leaves the bytes in `into`', async () => {
    const { file, bytes } = randomFile(2 * 1024 * KiB, 9);
    const disk = await openDisk(`raw:${file}`, { readOnly: true });
    try {
      const into = Buffer.alloc(1536 * KiB);
      const hashes = await disk.hashBlocks!(256 * KiB, 1536 * KiB, 4 * KiB, into);
      expect(into.equals(bytes.subarray(256 * KiB, 1792 * KiB))).toBe(true);
      expect(hashes.equals(await expectedHashes(await disk.read(256 * KiB, 1536 * KiB), 4 * KiB))).toBe(true);
      expect((await disk.hashBlocks!(0, 0, 4 * KiB)).length).toBe(0);
    } finally {
      await disk.close();
    }
  });

  it('refuses a range past the end of the disk and a closed target with their codes', async () => {
    const { file } = randomFile(64 * KiB, 4);
    const disk = await openDisk(`raw:${file}`, { readOnly: true });
    await expect(disk.hashBlocks!(60 * KiB, 8 * KiB, 4 * KiB)).rejects.toMatchObject({ code: 'BR_TARGET_OUT_OF_RANGE' });
    await disk.close();
    await expect(disk.hashBlocks!(0, 4 * KiB, 4 * KiB)).rejects.toMatchObject({ code: 'BR_TARGET_CLOSED' });
  });
});
