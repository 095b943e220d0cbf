import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import { pickBlocks, seededRandom } from './seeded-random';

const CHUNK_BYTES = 8 * 1024 * 1024;

/**
 * Writes a raw source image of random data and a target copy in which
 * `changedBlocks` 4 KiB blocks, chosen at random, differ in one byte each.
 * Returns the changed block indexes. Data comes from the OS generator (fast),
 * the choice of blocks from a seeded PRNG (same blocks every run).
 */
export function writeImagePair(sourcePath: string, targetPath: string, sizeBytes: number, changedBlocks: number, seed: number): number[] {
  const fd = fs.openSync(sourcePath, 'w');
  try {
    const chunk = Buffer.alloc(CHUNK_BYTES);
    for (let pos = 0; pos < sizeBytes; pos += CHUNK_BYTES) {
      const n = Math.min(CHUNK_BYTES, sizeBytes - pos);
      randomFillSync(chunk, 0, n);
      fs.writeSync(fd, chunk, 0, n, pos);
    }
  } finally {
    fs.closeSync(fd);
  }
  fs.copyFileSync(sourcePath, targetPath);
  const random = seededRandom(seed);
  const blocks = pickBlocks(Math.floor(sizeBytes / 4096), changedBlocks, random);
  const tfd = fs.openSync(targetPath, 'r+');
  try {
    const one = Buffer.alloc(1);
    for (const b of blocks) {
      const at = b * 4096 + Math.floor(random() * 4096);
      fs.readSync(tfd, one, 0, 1, at);
      one[0] ^= 1 + Math.floor(random() * 255);
      fs.writeSync(tfd, one, 0, 1, at);
    }
  } finally {
    fs.closeSync(tfd);
  }
  return blocks;
}
