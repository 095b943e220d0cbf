import { execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { nativeFileExtents } from '../../src/platform/file-extents';
import { DurablePageDropper } from '../../src/platform/page-cache';
import { PoolJobLimit } from '../../src/platform/pool-job-limit';
import { openDisk } from '../../src/targets/disk-spec';
import { FileSpan } from '../../src/targets/file-span';
import type { DiskTarget, PageCachePolicy } from '../../src/targets/disk-target';
import { VmdkSparseTarget } from '../../src/targets/vmdk/vmdk-sparse-target';
import { openOrCreateTarget } from '../../src/transport/target-opener';
import { pageCacheDroppable, residentBytes } from '../helpers/page-cache';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const MiB = 1024 * 1024;
const DISK_BYTES = 64 * MiB;
const WRITTEN_BYTES = 16 * MiB;

/** The file holding a spec's data (a flat VMDK's data sits beside its descriptor). */
function dataFile(spec: string): string {
  const file = spec.slice(spec.indexOf(':') + 1);
  return spec.startsWith('vmdk-flat:') ? file.replace(/\.vmdk$/, '-flat.vmdk') : file;
}

/** Waits (bounded) for the background drop to bring `file`'s resident bytes under `limit`; returns the last count. */
async function residentAfterDrop(file: string, limit: number): Promise<number> {
  let resident = residentBytes(file);
  for (let i = 0; i < 100 && resident >= limit; i++) {
    await new Promise((r) => setTimeout(r, 20));
    resident = residentBytes(file);
  }
  return resident;
}

/** Writes WRITTEN_BYTES of random data in 1 MiB pieces spread over the disk; returns what was written where. */
async function writeSpread(target: DiskTarget): Promise<Map<number, Buffer>> {
  const written = new Map<number, Buffer>();
  for (let i = 0; i < WRITTEN_BYTES / MiB; i++) {
    const offset = (i * 3 * MiB) % DISK_BYTES;
    const data = crypto.randomBytes(MiB);
    await target.write(offset, data);
    written.set(offset, data);
  }
  return written;
}

const KINDS = ['vmdk', 'vmdk-flat', 'raw', 'vhd'] as const;

describe('pageCache drop-durable', () => {
  const savedWriteback = VmdkSparseTarget.writebackBytes;
  afterEach(() => {
    VmdkSparseTarget.writebackBytes = savedWriteback;
  });

  for (const kind of KINDS) {
    it(`${kind}: a flush leaves the written data out of the page cache, and it reads back unchanged`, async () => {
      if (!requireTool('fincore')) return;
      const spec = `${kind}:${path.join(tempDir(), kind === 'raw' ? 'disk.img' : kind === 'vhd' ? 'disk.vhd' : 'disk.vmdk')}`;
      const target = await openDisk(spec, { create: { sizeBytes: DISK_BYTES }, pageCache: 'drop-durable' });
      let written: Map<number, Buffer>;
      try {
        written = await writeSpread(target);
        await target.flush();
        if (pageCacheDroppable(tempDir())) expect(await residentAfterDrop(dataFile(spec), WRITTEN_BYTES / 16)).toBeLessThan(WRITTEN_BYTES / 16);
        for (const [offset, data] of written) expect((await target.read(offset, data.length)).equals(data)).toBe(true);
      } finally {
        await target.close();
      }
      const reopened = await openDisk(spec, { readOnly: true });
      try {
        for (const [offset, data] of written) expect((await reopened.read(offset, data.length)).equals(data)).toBe(true);
      } finally {
        await reopened.close();
      }
      if (kind === 'vmdk' && requireTool('qemu-img')) execFileSync('qemu-img', ['check', '-f', 'vmdk', dataFile(spec)]);
    });
  }

  it("'keep' (the default) leaves the written data cached: the drop is what empties it", async () => {
    if (!requireTool('fincore') || !pageCacheDroppable(tempDir())) return;
    for (const pageCache of [undefined, 'keep'] as Array<PageCachePolicy | undefined>) {
      const spec = `vmdk:${path.join(tempDir(), `keep-${pageCache ?? 'default'}.vmdk`)}`;
      const target = await openDisk(spec, { create: { sizeBytes: DISK_BYTES }, pageCache });
      try {
        await writeSpread(target);
        await target.flush();
        await new Promise((r) => setTimeout(r, 100));
        expect(residentBytes(dataFile(spec))).toBeGreaterThan(WRITTEN_BYTES / 2);
      } finally {
        await target.close();
      }
    }
  });

  it('a sparse VMDK drops what its background syncs made durable, before any flush', async () => {
    if (!requireTool('fincore') || !pageCacheDroppable(tempDir())) return;
    VmdkSparseTarget.writebackBytes = MiB;
    const spec = `vmdk:${path.join(tempDir(), 'background.vmdk')}`;
    const target = await openDisk(spec, { create: { sizeBytes: DISK_BYTES }, pageCache: 'drop-durable' });
    try {
      await writeSpread(target);
      // No flush: only background syncs run, one at a time, each started by
      // a write once a MiB was written since the last; the data written
      // while one ran is synced (and dropped) only by the next. So keep
      // writing (one MiB region over and over: no new grain) until the
      // spread's data has been synced and dropped, bounded; without the drop
      // all of it stays resident however long this goes on.
      const again = crypto.randomBytes(MiB);
      let resident = residentBytes(dataFile(spec));
      for (let i = 0; i < 300 && resident >= WRITTEN_BYTES / 2; i++) {
        await target.write(0, again);
        await new Promise((r) => setTimeout(r, 10));
        resident = residentBytes(dataFile(spec));
      }
      expect(resident).toBeLessThan(WRITTEN_BYTES / 2);
    } finally {
      await target.close();
    }
  });

  // Whether close waits for a running drop before the descriptor goes is not
  // observable from here (a drop on a reused descriptor changes no data); this
  // shows only that closing at once after a flush, drop running, loses nothing.
  it('closing right after a flush, its drop still running, loses nothing', async () => {
    const spec = `vmdk:${path.join(tempDir(), 'close.vmdk')}`;
    for (let round = 0; round < 5; round++) {
      const target = round === 0 ? await openDisk(spec, { create: { sizeBytes: DISK_BYTES }, pageCache: 'drop-durable' }) : await openDisk(spec, { pageCache: 'drop-durable' });
      const data = crypto.randomBytes(MiB);
      await target.write(round * MiB, data);
      await target.flush();
      await target.close();
      const check = await openDisk(spec, { readOnly: true });
      expect((await check.read(round * MiB, MiB)).equals(data)).toBe(true);
      await check.close();
    }
  });

  it("the master target's opener asks for drop-durable: its VMDK leaves the cache after a flush", async () => {
    if (!requireTool('fincore') || !pageCacheDroppable(tempDir())) return;
    const spec = `vmdk:${path.join(tempDir(), 'applied.vmdk')}`;
    const target = await openOrCreateTarget(spec, DISK_BYTES);
    try {
      await writeSpread(target);
      await target.flush();
      expect(await residentAfterDrop(dataFile(spec), WRITTEN_BYTES / 16)).toBeLessThan(WRITTEN_BYTES / 16);
    } finally {
      await target.close();
    }
  });
});

describe('FileSpan with drop-durable', () => {
  it("runs its drop as one of the file's bounded pool jobs", async () => {
    const file = path.join(tempDir(), 'span');
    fs.writeFileSync(file, crypto.randomBytes(MiB));
    const handle = await fs.promises.open(file, 'r+');
    const jobs = new PoolJobLimit(1);
    const span = new FileSpan({ path: file, handle, fileOffsetBytes: 0, sizeBytes: MiB, regularFile: true, punchHoles: false, ownsFileTail: true, ops: nativeFileExtents, poolJobs: jobs, pageCache: 'drop-durable' });
    try {
      await span.datasync();
      // The sync gave its slot back; the drop it started holds it now (its
      // pool job cannot have answered before this continuation runs), so a
      // hung file's drop counts against the same bound as its writes.
      expect(jobs.inFlight).toBe(1);
    } finally {
      await span.close();
    }
    expect(jobs.inFlight).toBe(0);
  });
});

describe('DurablePageDropper', () => {
  it('keeps one drop running and one asked for, however often syncs end', async () => {
    const file = path.join(tempDir(), 'f');
    fs.writeFileSync(file, crypto.randomBytes(MiB));
    const fd = fs.openSync(file, 'r');
    let reads = 0;
    const dropper = new DurablePageDropper(() => {
      reads++;
      return fd;
    });
    try {
      for (let i = 0; i < 1000; i++) dropper.synced();
      await dropper.close();
      // The first call ran one drop; the 999 while it ran asked for one more, at most.
      expect(reads).toBeGreaterThanOrEqual(1);
      expect(reads).toBeLessThanOrEqual(2);
      expect(dropper.lastRefusal).toBeUndefined();
    } finally {
      fs.closeSync(fd);
    }
  });

  it('a refused drop is kept as lastRefusal, never thrown', async () => {
    const file = path.join(tempDir(), 'f');
    fs.writeFileSync(file, 'x');
    const fd = fs.openSync(file, 'r');
    fs.closeSync(fd);
    const closedFd = new DurablePageDropper(() => fd);
    closedFd.synced();
    await closedFd.close();
    expect(closedFd.lastRefusal).toBe('EBADF');
    const noFd = new DurablePageDropper(() => -1);
    noFd.synced();
    await noFd.close();
    expect(noFd.lastRefusal).toBeDefined();
  });

  it('starts no drop after close', async () => {
    let reads = 0;
    const dropper = new DurablePageDropper(() => {
      reads++;
      return 0;
    });
    await dropper.close();
    dropper.synced();
    await dropper.close();
    expect(reads).toBe(0);
  });
});
