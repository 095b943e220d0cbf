import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import type { AllocationExtent, DiskTarget, DiskWriteRequest } from '../../src/targets/disk-target';
import { openDisk } from '../../src/targets/disk-spec';
import { prng } from '../helpers/prng';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const MiB = 1024 * 1024;
const KiB = 1024;
const GRAIN = 64 * KiB;

function randomData(rand: () => number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i + 4 <= length; i += 4) out.writeUInt32LE((rand() * 4294967296) >>> 0, i);
  return out;
}

/**
 * A batch like a log's: mostly whole 64 KiB grains at random, some writes
 * inside one grain, some across grain and grain-table (32 MiB) boundaries,
 * all-zero writes, and writes over earlier writes of the same batch.
 */
function randomBatch(rand: () => number, diskBytes: number, count: number): DiskWriteRequest[] {
  const out: DiskWriteRequest[] = [];
  for (let i = 0; i < count; i++) {
    const kind = rand();
    let offset: number;
    let length: number;
    if (kind < 0.5) {
      offset = Math.floor(rand() * (diskBytes / GRAIN)) * GRAIN;
      length = GRAIN;
    } else if (kind < 0.7) {
      offset = Math.floor(rand() * (diskBytes / 512 - 16)) * 512;
      length = (1 + Math.floor(rand() * 16)) * 512;
    } else if (kind < 0.8) {
      offset = 32 * MiB - (1 + Math.floor(rand() * 200)) * 512;
      length = (1 + Math.floor(rand() * 400)) * 512;
    } else if (kind < 0.9 && out.length > 0) {
      const earlier = out[Math.floor(rand() * out.length)]!;
      offset = earlier.offset + Math.floor(rand() * (earlier.data.length / 512)) * 512;
      length = Math.min(diskBytes - offset, (1 + Math.floor(rand() * 200)) * 512);
    } else {
      offset = Math.floor(rand() * (diskBytes / GRAIN - 2)) * GRAIN;
      out.push({ offset, data: Buffer.alloc(GRAIN + 4096) });
      continue;
    }
    out.push({ offset, data: randomData(rand, length) });
  }
  return out;
}

async function collect(it: AsyncIterable<AllocationExtent>): Promise<AllocationExtent[]> {
  const out: AllocationExtent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

async function expectEqual(target: DiskTarget, model: Buffer): Promise<void> {
  for (let at = 0; at < model.length; at += 4 * MiB) {
    const got = await target.read(at, Math.min(4 * MiB, model.length - at));
    const want = model.subarray(at, at + got.length);
    if (!got.equals(want)) {
      let first = 0;
      while (got[first] === want[first]) first++;
      expect.fail(`disk differs from the model at byte ${at + first}`);
    }
  }
}

describe('vmdk monolithicSparse writeMany / readMany', () => {
  const haveQemu = requireTool('qemu-img');

  it('leaves the disk as writing each request in order would, over several batches', async () => {
    const diskBytes = 72 * MiB;
    const rand = prng(0xba7c4);
    const model = Buffer.alloc(diskBytes);
    const dir = tempDir();
    const file = path.join(dir, 'b.vmdk');
    const t = await openDisk(`vmdk:${file}`, { create: { sizeBytes: diskBytes } });
    try {
      for (let round = 0; round < 6; round++) {
        const batch = randomBatch(rand, diskBytes, 120);
        for (const w of batch) w.data.copy(model, w.offset);
        await t.writeMany!(batch);
        if (round % 2 === 1) await t.flush();
      }
      await expectEqual(t, model);
    } finally {
      await t.close();
    }
    // A fresh open (grain tables from the file) and qemu see the same disk.
    const r = await openDisk(`vmdk:${file}`, { readOnly: true });
    await expectEqual(r, model);
    await r.close();
    if (haveQemu) {
      const raw = path.join(dir, 'model.raw');
      fs.writeFileSync(raw, model);
      expect(spawnSync('qemu-img', ['check', '-f', 'vmdk', file], { encoding: 'utf8' }).status).toBe(0);
      execFileSync('qemu-img', ['compare', '-f', 'vmdk', '-F', 'raw', file, raw]);
    }
  });

  it('reads into the callers buffers and reports which ranges hold no data', async () => {
    const diskBytes = 40 * MiB;
    const t = await openDisk(`vmdk:${path.join(tempDir(), 'r.vmdk')}`, { create: { sizeBytes: diskBytes } });
    try {
      const rand = prng(7);
      const written = randomData(rand, 3 * GRAIN);
      await t.write(10 * GRAIN, written);
      await t.write(33 * MiB, written.subarray(0, 4096));
      await t.flush();
      const requests = [
        { offset: 11 * GRAIN + 512, buffer: Buffer.alloc(GRAIN, 0xee) },
        { offset: 20 * GRAIN, buffer: Buffer.alloc(2 * GRAIN, 0xee) },
        { offset: 9 * GRAIN, buffer: Buffer.alloc(2 * GRAIN, 0xee) },
        { offset: 33 * MiB - GRAIN, buffer: Buffer.alloc(GRAIN + 8192, 0xee) },
        { offset: 13 * GRAIN, buffer: Buffer.alloc(4096, 0xee) },
      ];
      const zero = await t.readMany!(requests);
      for (const [i, r] of requests.entries()) {
        expect(r.buffer.equals(await t.read(r.offset, r.buffer.length)), `request ${i} holds what read() returns`).toBe(true);
        const extents = await collect(t.extents(r.offset, r.buffer.length));
        expect(zero[i], `request ${i} zero flag`).toBe(extents.every((e) => e.zero));
      }
      expect(zero).toEqual([false, true, false, false, true]);
    } finally {
      await t.close();
    }
  });

  it('refuses a batch with one request out of range before writing any of it', async () => {
    const t = await openDisk(`vmdk:${path.join(tempDir(), 'o.vmdk')}`, { create: { sizeBytes: 4 * MiB } });
    try {
      let caught: unknown;
      try {
        await t.writeMany!([{ offset: 0, data: Buffer.alloc(GRAIN, 1) }, { offset: 4 * MiB - 512, data: Buffer.alloc(1024, 2) }]);
      } catch (err) {
        caught = err;
      }
      expect((caught as BlockrelayError).code).toBe('BR_TARGET_OUT_OF_RANGE');
      expect((await t.read(0, GRAIN)).equals(Buffer.alloc(GRAIN))).toBe(true);
      expect((await collect(t.extents(0, 4 * MiB))).every((e) => e.zero)).toBe(true);
    } finally {
      await t.close();
    }
  });

  it('points no grain table entry at batch data before a flush made it durable', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'c.vmdk');
    const t = await openDisk(`vmdk:${file}`, { create: { sizeBytes: 8 * MiB } });
    await t.writeMany!([{ offset: 0, data: Buffer.alloc(GRAIN, 0xaa) }]);
    await t.flush();
    await t.writeMany!([{ offset: MiB, data: Buffer.alloc(GRAIN, 0xbb) }, { offset: 0, data: Buffer.alloc(4096, 0xcc) }]);
    const crashed = path.join(dir, 'crashed.vmdk');
    fs.copyFileSync(file, crashed); // as a power cut before the flush could leave it
    await t.close();
    const c = await openDisk(`vmdk:${crashed}`, { readOnly: true });
    // The new grain is not mapped; the overwrite of an allocated grain may or may not have landed.
    expect((await c.read(MiB, GRAIN)).equals(Buffer.alloc(GRAIN))).toBe(true);
    expect((await c.read(4096, GRAIN - 4096)).equals(Buffer.alloc(GRAIN - 4096, 0xaa))).toBe(true);
    await c.close();
    if (haveQemu) expect(spawnSync('qemu-img', ['check', '-f', 'vmdk', crashed]).status).toBe(0);
  });
});
