import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { BlockHasher } from '../../src/resync/block-hasher';
import { passGroups, runResync, type ResyncOptions } from '../../src/resync/resync-engine';
import { ResyncJob } from '../../src/resync/resync-job';
import { inProcessChannel, ResyncPeer, ResyncTargetService } from '../../src/resync/resync-peer';
import { useTempDirs } from '../helpers/tmp';
import { MemoryDisk } from './memory-disk';
import { fillRandom, pickBlocks, seededRandom } from './seeded-random';

const MiB = 1024 * 1024;
const tempDir = useTempDirs();

/** A source with random data and a target that equals it except in `changed` 4 KiB blocks. */
function pair(sizeBytes: number, changed: number, seed = 1): { source: MemoryDisk; target: MemoryDisk; changedBlocks: number[] } {
  const random = seededRandom(seed);
  const source = MemoryDisk.from('mem:source', fillRandom(Buffer.alloc(sizeBytes), random));
  const target = MemoryDisk.from('mem:target', source.data);
  const changedBlocks = pickBlocks(Math.floor(sizeBytes / 4096), changed, random);
  for (const b of changedBlocks) target.data[b * 4096 + Math.floor(random() * 4096)] ^= 1 + Math.floor(random() * 255);
  return { source, target, changedBlocks };
}

/** Runs a resync over the in-process seam; a job given is closed (lock released) afterwards. */
async function resync(source: MemoryDisk, target: MemoryDisk, extra: Partial<ResyncOptions> = {}) {
  const hasher = await BlockHasher.create();
  const peer = new ResyncPeer(inProcessChannel(new ResyncTargetService(target, hasher)));
  try {
    return await runResync({ source, peer, hasher, ...extra });
  } finally {
    await extra.job?.close();
  }
}

/** The progress saved in a state file, read the way a restarted resync reads it. */
async function savedState(statePath: string) {
  const job = await ResyncJob.open(statePath, await BlockHasher.create());
  await job.close();
  return job.savedState;
}

describe('runResync', () => {
  it('sends nothing but requests when source and target are equal', async () => {
    const { source, target } = pair(8 * MiB, 0);
    const result = await resync(source, target);
    expect(result.blocksCompared).toBe(2048);
    expect(result.blocksSent).toBe(0);
    expect(result.bytesDiffering).toBe(0);
    // Only the coarsest hashes (8 × 1 MiB) cross, plus framing.
    expect(result.hashBytes).toBe(8 * 8);
    expect(result.bytesSent + result.bytesReceived).toBeLessThan(1024);
  });

  it('sends exactly the scattered 4 KiB blocks that differ and leaves the target equal to the source', async () => {
    const { source, target, changedBlocks } = pair(32 * MiB, 80, 2);
    expect(target.data.equals(source.data)).toBe(false);
    const result = await resync(source, target);
    expect(target.data.equals(source.data)).toBe(true);
    expect(result.blocksSent).toBe(changedBlocks.length);
    expect(result.bytesDiffering).toBe(changedBlocks.length * 4096);
    expect(result.bytesSent + result.bytesReceived).toBeLessThanOrEqual(1.05 * result.bytesDiffering + result.hashBytes);
  });

  it('derives coarse passes from the block size and drops sizes that do not nest', () => {
    expect(passGroups(4096, [1 * MiB, 64 * 1024], 4 * MiB)).toEqual([256, 16, 1]);
    expect(passGroups(65536, [1 * MiB, 64 * 1024], 4 * MiB)).toEqual([16, 1]);
    expect(passGroups(4096, [3 * 4096], 4 * MiB)).toEqual([3, 1]);
    expect(passGroups(4096, [], 4 * MiB)).toEqual([1]);
  });

  it('honours a larger block size, sending whole blocks of that size', async () => {
    const { source, target, changedBlocks } = pair(16 * MiB, 10, 3);
    const result = await resync(source, target, { blockSizeBytes: 65536 });
    expect(target.data.equals(source.data)).toBe(true);
    const coarse = new Set(changedBlocks.map((b) => Math.floor((b * 4096) / 65536)));
    expect(result.blocksSent).toBe(coarse.size);
    expect(result.bytesDiffering).toBe(coarse.size * 65536);
  });

  it('sends a run of differing blocks that spans two read pieces, and blocks larger than a piece', async () => {
    const { source, target } = pair(4 * MiB, 0, 14);
    target.data.fill(1, 512 * 1024 - 8192, 512 * 1024 + 8192); // four blocks across the 512 KiB piece boundary
    const small = await resync(source, target);
    expect(small.blocksSent).toBe(4);
    expect(target.data.equals(source.data)).toBe(true);
    target.data.fill(2, 3 * MiB - 10, 3 * MiB + 10);
    const large = await resync(source, target, { blockSizeBytes: 1 * MiB });
    expect(large.blocksSent).toBe(2);
    expect(large.bytesDiffering).toBe(2 * MiB);
    expect(target.data.equals(source.data)).toBe(true);
  });

  it('handles a disk whose size is not a multiple of the block size', async () => {
    const size = 3 * MiB + 1536;
    const random = seededRandom(4);
    const source = MemoryDisk.from('mem:source', fillRandom(Buffer.alloc(size), random));
    const target = MemoryDisk.from('mem:target', source.data);
    target.data[size - 1] ^= 0xff;
    target.data[5] ^= 0xff;
    const result = await resync(source, target);
    expect(target.data.equals(source.data)).toBe(true);
    expect(result.blocksSent).toBe(2);
    expect(result.bytesDiffering).toBe(4096 + 1536);
  });

  it('compares only the given extents when a dirty map is known', async () => {
    const { source, target } = pair(16 * MiB, 0, 5);
    target.data[1 * MiB + 10] ^= 1; // inside the extents
    target.data[9 * MiB + 10] ^= 1; // outside: not looked at
    const result = await resync(source, target, { extents: [{ offset: 1 * MiB, length: 64 * 1024 }, { offset: 2 * MiB + 100, length: 10 }] });
    expect(result.blocksCompared).toBe(16 + 1);
    expect(result.blocksSent).toBe(1);
    // Extents no longer than 64 KiB skip the 1 MiB pass: 2 hashes at 64 KiB, then 16 at 4 KiB.
    expect(result.hashBytes).toBe((2 + 16) * 8);
    expect(target.data[1 * MiB + 10]).toBe(source.data[1 * MiB + 10]);
    expect(target.data[9 * MiB + 10]).not.toBe(source.data[9 * MiB + 10]);
  });

  it('copies only non-zero blocks onto a new disk in a full copy', async () => {
    const source = new MemoryDisk('mem:source', 8 * MiB);
    fillRandom(source.data.subarray(1 * MiB, 1 * MiB + 12288), seededRandom(6));
    source.data[7 * MiB] = 1;
    const target = new MemoryDisk('mem:target', 8 * MiB);
    const result = await resync(source, target, { fullCopy: true });
    expect(target.data.equals(source.data)).toBe(true);
    expect(result.blocksSent).toBe(4);
    expect(result.hashBytes).toBe(0);
  });

  it('does not read what the allocation maps of either side call holes', async () => {
    const source = new MemoryDisk('mem:source', 32 * MiB);
    const target = new MemoryDisk('mem:target', 32 * MiB);
    fillRandom(source.data.subarray(3 * MiB, 4 * MiB), seededRandom(13));
    target.data.fill(9, 20 * MiB, 20 * MiB + 4096); // stale data where the source has a hole
    source.zeroExtentBytes = 65536;
    target.zeroExtentBytes = 65536;
    const result = await resync(source, target);
    expect(target.data.equals(source.data)).toBe(true);
    expect(result.blocksSent).toBe(256 + 1);
    expect(source.readBytes).toBe(1 * MiB);
    expect(target.readBytes).toBe(65536); // only the stale 64 KiB; the 1 MiB the source holds reads as a hole there
  });

  it('refuses disks of different sizes before touching the target', async () => {
    const source = new MemoryDisk('mem:source', 2 * MiB);
    const target = new MemoryDisk('mem:target', 4 * MiB);
    await expect(resync(source, target)).rejects.toMatchObject({ code: 'BR_RESYNC_SIZE_MISMATCH' });
    expect(target.writeCount).toBe(0);
  });

  it('refuses a block size that is not a power of two', async () => {
    const { source, target } = pair(1 * MiB, 0);
    await expect(resync(source, target, { blockSizeBytes: 3000 })).rejects.toMatchObject({ code: 'BR_USAGE' });
  });

  it('resumes from saved progress after a failure instead of starting over, and converges', async () => {
    const { source, target, changedBlocks } = pair(32 * MiB, 200, 7);
    const statePath = path.join(tempDir(), 'resync.state');
    const hasher = await BlockHasher.create();
    target.failWritesAfter = 60; // fails somewhere in the middle
    const first = resync(source, target, { job: await ResyncJob.open(statePath, hasher), checkpointIntervalMs: 0, concurrency: 2 });
    await expect(first).rejects.toThrow(/injected write failure/);
    const saved = await savedState(statePath);
    expect(saved?.cursorBytes).toBeGreaterThan(0);
    expect(saved!.cursorBytes).toBeLessThan(32 * MiB);

    target.failWritesAfter = Number.POSITIVE_INFINITY;
    const second = await resync(source, target, { job: await ResyncJob.open(statePath, hasher) });
    expect(second.resumedFromBytes).toBe(saved!.cursorBytes);
    expect(second.blocksCompared).toBe((32 * MiB - saved!.cursorBytes) / 4096);
    expect(second.blocksCompared).toBeLessThan(8192);
    expect(target.data.equals(source.data)).toBe(true);
    expect(second.totals.blocksSent).toBeGreaterThanOrEqual(changedBlocks.length);
    expect(fs.existsSync(statePath)).toBe(false);
  });

  it('stops on an abort signal with BR_RESYNC_ABORTED and saved progress', async () => {
    const { source, target } = pair(16 * MiB, 50, 8);
    const statePath = path.join(tempDir(), 'resync.state');
    const hasher = await BlockHasher.create();
    const controller = new AbortController();
    const run = resync(source, target, {
      job: await ResyncJob.open(statePath, hasher),
      checkpointIntervalMs: 0,
      concurrency: 1,
      progressIntervalMs: 0,
      onProgress: (p) => { if (p.bytesDone >= 8 * MiB) controller.abort(); },
      signal: controller.signal,
    });
    await expect(run).rejects.toMatchObject({ code: 'BR_RESYNC_ABORTED', recoverable: true });
    const saved = await savedState(statePath);
    expect(saved?.cursorBytes).toBe(8 * MiB);
    const rest = await resync(source, target, { job: await ResyncJob.open(statePath, hasher) });
    expect(rest.blocksCompared).toBe(2048);
    expect(target.data.equals(source.data)).toBe(true);
  });

  it('saves progress every checkpointIntervalBytes of disk even when the clock stands still', async () => {
    const { source, target } = pair(16 * MiB, 10, 15);
    const statePath = path.join(tempDir(), 'resync.state');
    const hasher = await BlockHasher.create();
    const counted = async (bytes: number | undefined): Promise<number[]> => {
      const job = await ResyncJob.open(statePath, hasher);
      const cursors: number[] = [];
      const save = job.checkpoint.bind(job);
      job.checkpoint = async (cursor, totals, nowMs) => {
        cursors.push(cursor);
        await save(cursor, totals, nowMs);
      };
      await resync(source, target, { job, clock: new SimulatedClock(), concurrency: 1, windowBytes: 2 * MiB, checkpointIntervalMs: 3_600_000, ...(bytes === undefined ? {} : { checkpointIntervalBytes: bytes }) });
      return cursors;
    };
    expect(await counted(4 * MiB)).toEqual([4 * MiB, 8 * MiB, 12 * MiB, 16 * MiB, 16 * MiB]);
    expect(await counted(undefined)).toEqual([16 * MiB]);
  });

  it('starts over when the saved progress was for another block size', async () => {
    const { source, target } = pair(8 * MiB, 20, 9);
    const statePath = path.join(tempDir(), 'resync.state');
    const hasher = await BlockHasher.create();
    const controller = new AbortController();
    await expect(resync(source, target, {
      job: await ResyncJob.open(statePath, hasher), checkpointIntervalMs: 0, concurrency: 1, progressIntervalMs: 0,
      onProgress: (p) => { if (p.bytesDone >= 4 * MiB) controller.abort(); }, signal: controller.signal,
    })).rejects.toMatchObject({ code: 'BR_RESYNC_ABORTED' });
    const again = await resync(source, target, { job: await ResyncJob.open(statePath, hasher), blockSizeBytes: 8192 });
    expect(again.resumedFromBytes).toBe(0);
    expect(again.restartReason).toMatch(/block size/);
    expect(target.data.equals(source.data)).toBe(true);
  });

  it('re-compares writes noted during the resync in settle rounds', async () => {
    const { source, target } = pair(16 * MiB, 0, 10);
    const hasher = await BlockHasher.create();
    const job = await ResyncJob.open(undefined, hasher);
    let wrote = false;
    const result = await resync(source, target, {
      job, concurrency: 1, progressIntervalMs: 0, settleRounds: 2,
      onProgress: (p) => {
        // A guest write lands behind the resync's cursor: only a settle round sees it.
        if (!wrote && p.bytesDone >= 12 * MiB) {
          wrote = true;
          source.data.fill(7, 4096, 8192);
          job.noteWrite(4096, 4096);
        }
      },
    });
    expect(wrote).toBe(true);
    expect(result.settleRoundsRun).toBe(1);
    expect(target.data.equals(source.data)).toBe(true);
    expect(result.writesDuringResync).toEqual([]);
  });

  it('reports writes noted during the resync for the delta logs when not settling them', async () => {
    const { source, target } = pair(4 * MiB, 0, 11);
    const hasher = await BlockHasher.create();
    const job = await ResyncJob.open(undefined, hasher);
    job.noteWrite(100, 10);
    job.noteWrite(4096, 4096);
    const result = await resync(source, target, { job });
    expect(result.writesDuringResync).toEqual([{ offset: 0, length: 8192 }]);
  });

  it('refuses a second resync on a state file in use, and takes over a lock left by a dead process', async () => {
    const statePath = path.join(tempDir(), 'resync.state');
    const hasher = await BlockHasher.create();
    const first = await ResyncJob.open(statePath, hasher);
    await expect(ResyncJob.open(statePath, hasher)).rejects.toMatchObject({ code: 'BR_LOCKED' });
    await first.close();
    // A killed process leaves its lock behind; a pid that cannot be running stands for it.
    fs.writeFileSync(`${statePath}.lock`, '2147483646\n');
    const second = await ResyncJob.open(statePath, hasher);
    await second.close();
    expect(fs.existsSync(`${statePath}.lock`)).toBe(false);
  });
});

describe('runResync guided by the tracker', () => {
  it('compares only the extents of a native DirtyMap', async () => {
    const { DirtyMap } = await import('../../src/tracking/dirty-map');
    const { source, target } = pair(16 * MiB, 0, 12);
    const map = new DirtyMap(16 * MiB, 4096);
    // The guest wrote three places; the target missed them (logs overflowed).
    for (const at of [4096, 5 * MiB, 5 * MiB + 4096, 15 * MiB]) {
      source.data.fill(0xee, at, at + 4096);
      map.mark(at, 4096);
    }
    const result = await resync(source, target, { extents: map.extents() });
    expect(result.blocksCompared).toBe(4);
    expect(result.blocksSent).toBe(4);
    expect(result.workBytes).toBe(4 * 4096);
    expect(target.data.equals(source.data)).toBe(true);
  });
});
