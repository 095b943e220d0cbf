import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockrelayError, wrapError } from '../../src/retry/blockrelay-error';
import { openDisk } from '../../src/targets/disk-spec';
import { readAt, writeAt, type PositionedIoError } from '../../src/targets/vmdk/positioned-writes';
import { VmdkSparseTarget } from '../../src/targets/vmdk/vmdk-sparse-target';
import { prng, randomData } from '../helpers/prng';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const MiB = 1024 * 1024;
const KiB = 1024;
const GRAIN = 64 * KiB;

describe('vmdk monolithicSparse writeMany', () => {
  const haveQemu = requireTool('qemu-img');

  it('ends as the same writes one by one would: overlaps in a batch, partial grains, zeroes, grains the batch allocated', async () => {
    const diskBytes = 48 * MiB;
    const rand = prng(0x5e);
    const model = Buffer.alloc(diskBytes);
    const dir = tempDir();
    const file = path.join(dir, 'many.vmdk');
    const t = await openDisk(`vmdk:${file}`, { create: { sizeBytes: diskBytes } });
    expect(t).toBeInstanceOf(VmdkSparseTarget);
    const many = t as VmdkSparseTarget;
    try {
      for (let batch = 0; batch < 60; batch++) {
        const requests: Array<{ offset: number; data: Buffer }> = [];
        const n = 1 + Math.floor(rand() * 40);
        for (let i = 0; i < n; i++) {
          // Sector-aligned pieces of any size up to three grains, often
          // over a grain an earlier request of this batch allocated.
          const sectors = 1 + Math.floor(rand() * ((3 * GRAIN) / 512));
          const near = requests.length > 0 && rand() < 0.4 ? requests[Math.floor(rand() * requests.length)]!.offset : Math.floor(rand() * (diskBytes / 512 - sectors)) * 512;
          const offset = Math.min(near + Math.floor(rand() * 64) * 512, diskBytes - sectors * 512);
          const data = rand() < 0.15 ? Buffer.alloc(sectors * 512) : randomData(rand, sectors * 512);
          requests.push({ offset, data });
          data.copy(model, offset);
        }
        await many.writeMany(requests);
        if (batch % 20 === 19) await many.flush();
      }
      for (let at = 0; at < diskBytes; at += 4 * MiB) {
        const got = await t.read(at, 4 * MiB);
        if (!got.equals(model.subarray(at, at + 4 * MiB))) {
          let first = 0;
          while (got[first] === model[at + first]) first++;
          expect.fail(`disk differs from the model at byte ${at + first}`);
        }
      }
    } finally {
      await t.close();
    }
    if (haveQemu) {
      execFileSync('qemu-img', ['check', '-f', 'vmdk', file]);
      const raw = path.join(dir, 'model.raw');
      fs.writeFileSync(raw, model);
      execFileSync('qemu-img', ['compare', '-f', 'vmdk', '-F', 'raw', file, raw]);
    }
  });

  it('writes pieces in order, joins neighbours, and names the offset of a write that fails', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'plain.bin');
    const fd = fs.openSync(file, 'w+');
    try {
      const a = Buffer.alloc(4096, 1);
      const b = Buffer.alloc(4096, 2);
      const c = Buffer.alloc(100, 3);
      // b lands right after a (one pwritev); c then overwrites part of a.
      await writeAt(fd, [{ position: 8192, buffer: a }, { position: 12288, buffer: b }, { position: 8192, buffer: c }]);
      const got = fs.readFileSync(file);
      expect(got.length).toBe(16384);
      expect(got.subarray(0, 8192).every((x) => x === 0)).toBe(true);
      expect(got.subarray(8192, 8292).every((x) => x === 3)).toBe(true);
      expect(got.subarray(8292, 12288).every((x) => x === 1)).toBe(true);
      expect(got.subarray(12288).every((x) => x === 2)).toBe(true);
    } finally {
      fs.closeSync(fd);
    }
    const ro = fs.openSync(file, 'r');
    try {
      const err = await writeAt(ro, [{ position: 512, buffer: Buffer.alloc(512) }]).then(() => undefined, (e: unknown) => e as NodeJS.ErrnoException);
      expect(err?.code).toBe('EBADF');
      expect(err?.message).toContain('offset 512');
    } finally {
      fs.closeSync(ro);
    }
    await expect(writeAt(-1, [{ position: 0, buffer: Buffer.alloc(1) }])).rejects.toThrow(RangeError);
    await expect(writeAt(1, [{ position: 0, buffer: Buffer.alloc(0) }])).rejects.toThrow(RangeError);
  });

  it('readAt fills every buffer whole, neighbours or not, and names the offset where the file ends', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'r.bin');
    const content = randomData(prng(0x71), 64 * KiB);
    fs.writeFileSync(file, content);
    const fd = fs.openSync(file, 'r');
    try {
      const spots = [40960, 0, 4096, 8192, 61440];
      const bufs = spots.map(() => Buffer.alloc(4096));
      await readAt(fd, spots.map((position, i) => ({ position, buffer: bufs[i]! })));
      spots.forEach((at, i) => expect(bufs[i]!.equals(content.subarray(at, at + 4096))).toBe(true));
      const err = await readAt(fd, [{ position: 0, buffer: Buffer.alloc(512) }, { position: 63 * KiB, buffer: Buffer.alloc(4096) }]).then(() => undefined, (e: unknown) => e as PositionedIoError);
      expect(err?.code).toBe('EOF');
      expect(err?.position).toBe(63 * KiB);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('readMany of a VMDK whose grain data the file no longer holds is BR_TARGET_CORRUPT', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'cut.vmdk');
    const back = (await openDisk(`vmdk:${file}`, { create: { sizeBytes: 16 * MiB } })) as VmdkSparseTarget;
    await back.write(0, randomData(prng(3), GRAIN));
    await back.write(5 * GRAIN, randomData(prng(4), GRAIN));
    await back.flush();
    // Open checks every GTE against the file's end; cut the file under an
    // open target instead: the last grain written lies at its end.
    fs.truncateSync(file, fs.statSync(file).size - GRAIN / 2);
    try {
      const err = await back.readMany([{ offset: 0, buffer: Buffer.alloc(GRAIN) }, { offset: 5 * GRAIN, buffer: Buffer.alloc(GRAIN) }]).then(() => undefined, (e: unknown) => e as BlockrelayError);
      expect(err).toBeInstanceOf(BlockrelayError);
      expect(err?.code).toBe('BR_TARGET_CORRUPT');
      expect(err?.message).toContain('cut off by the end of the file');
    } finally {
      await back.close();
    }
  });

  it('reports a full volume as BR_DISK_FULL', async () => {
    if (!fs.existsSync('/dev/full')) return;
    const fd = fs.openSync('/dev/full', 'w');
    try {
      const err = await writeAt(fd, [{ position: 0, buffer: Buffer.alloc(4096) }]).then(() => undefined, (e: unknown) => e as NodeJS.ErrnoException);
      expect(err?.code).toBe('ENOSPC');
      const coded = wrapError(err, 'BR_IO', 'write');
      expect(coded).toBeInstanceOf(BlockrelayError);
      expect(coded.code).toBe('BR_DISK_FULL');
    } finally {
      fs.closeSync(fd);
    }
  });
});
