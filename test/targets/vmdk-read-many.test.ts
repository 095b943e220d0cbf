import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { AllocationExtent, DiskTarget } from '../../src/targets/disk-target';
import { openDisk } from '../../src/targets/disk-spec';
import { VmdkSparseTarget } from '../../src/targets/vmdk/vmdk-sparse-target';
import { prng, randomData } from '../helpers/prng';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const MiB = 1024 * 1024;
const KiB = 1024;
const GRAIN = 64 * KiB;

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

describe('vmdk monolithicSparse readMany and background syncs', () => {
  const haveQemu = requireTool('qemu-img');

  it('keeps every byte when syncs start in the background between flushes', async () => {
    // More than 32 MiB between flushes: the target starts syncs of its own while writing.
    const diskBytes = 96 * MiB;
    const rand = prng(0x3b);
    const model = Buffer.alloc(diskBytes);
    const dir = tempDir();
    const file = path.join(dir, 'w.vmdk');
    const t = await openDisk(`vmdk:${file}`, { create: { sizeBytes: diskBytes } });
    try {
      for (let i = 0; i < 1200; i++) {
        const offset = Math.floor(rand() * (diskBytes / GRAIN)) * GRAIN;
        const data = randomData(rand, GRAIN);
        data.copy(model, offset);
        await t.write(offset, data);
      }
      await t.flush();
      await expectEqual(t, model);
    } finally {
      await t.close();
    }
    if (haveQemu) {
      const raw = path.join(dir, 'model.raw');
      fs.writeFileSync(raw, model);
      expect(spawnSync('qemu-img', ['check', '-f', 'vmdk', file], { encoding: 'utf8' }).status).toBe(0);
      execFileSync('qemu-img', ['compare', '-f', 'vmdk', '-F', 'raw', file, raw]);
    }
  });

  it('points no grain table entry at new grains before a flush, background syncs or not', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'c.vmdk');
    const t = await openDisk(`vmdk:${file}`, { create: { sizeBytes: 64 * MiB } });
    await t.write(0, Buffer.alloc(GRAIN, 0xaa));
    await t.flush();
    // 40 MiB of new grains: a background sync has started, but no flush ran.
    for (let i = 1; i <= 640; i++) await t.write(i * GRAIN, Buffer.alloc(GRAIN, 0xbb));
    const crashed = path.join(dir, 'crashed.vmdk');
    fs.copyFileSync(file, crashed); // as a power cut before the flush could leave it
    await t.close();
    const c = await openDisk(`vmdk:${crashed}`, { readOnly: true });
    expect((await c.read(0, GRAIN)).equals(Buffer.alloc(GRAIN, 0xaa))).toBe(true);
    expect((await collect(c.extents(GRAIN, 640 * GRAIN))).every((e) => e.zero)).toBe(true);
    await c.close();
    if (haveQemu) expect(spawnSync('qemu-img', ['check', '-f', 'vmdk', crashed]).status).toBe(0);
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
  it('starts no background sync while a flush runs, so a write error cannot miss the flush', async () => {
    // The kernel reports a writeback error once per file: a background sync
    // beside the flush's own could take it, and the flush would answer
    // success for grain tables that never reached the disk.
    const saved = VmdkSparseTarget.writebackBytes;
    VmdkSparseTarget.writebackBytes = 4 * KiB;
    const probe = await fsp.open(path.join(tempDir(), 'probe'), 'w');
    const proto = Object.getPrototypeOf(probe) as { datasync(this: fsp.FileHandle): Promise<void> };
    await probe.close();
    const datasync = proto.datasync;
    const target = await openDisk(`vmdk:${path.join(tempDir(), 'flush.vmdk')}`, { create: { sizeBytes: 256 * MiB } });
    let inFlush = false;
    const backgroundInFlush: string[] = [];
    try {
      // One new grain under each of 8 grain tables: the flush writes 8 tables (and their copies).
      for (let i = 0; i < 8; i++) await target.write(i * 32 * MiB, Buffer.alloc(GRAIN, i + 1));
      proto.datasync = function (this: fsp.FileHandle): Promise<void> {
        if (inFlush && (new Error().stack ?? '').includes('kickWriteback')) {
          backgroundInFlush.push('background sync during flush');
          return Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }));
        }
        return datasync.call(this);
      };
      inFlush = true;
      await target.flush();
      inFlush = false;
      expect(backgroundInFlush).toEqual([]);
    } finally {
      proto.datasync = datasync;
      VmdkSparseTarget.writebackBytes = saved;
      await target.close();
    }
  });
});

