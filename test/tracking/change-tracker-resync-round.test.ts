import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { pattern } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';

const SIZE = 4 * 1024 * 1024;

describe('ChangeTracker resync rounds', () => {
  const tmp = useTempDirs();

  it('carries the extents of an overflow in a resync log placed before the writes that follow it', async () => {
    const dir = tmp();
    const disk = Buffer.alloc(SIZE);
    const tracker = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: SIZE, overflowRatio: 0.25, persistIntervalMs: 0 });
    const write = async (offset: number, data: Buffer): Promise<void> => {
      data.copy(disk, offset);
      await tracker.recordWrite(offset, data);
    };
    await write(0, pattern(1, 64 * 1024));
    await ChangeTracker.cut([tracker]);
    // More than a quarter of the disk unshipped: the tracker folds everything.
    for (let i = 0; i < 20; i++) await write(128 * 1024 + i * 64 * 1024, pattern(i + 2, 64 * 1024));
    expect(tracker.status()).toMatchObject({ mode: 'dirty-only', resyncRequired: true });
    expect(tracker.sealedLogs()).toEqual([]);

    // A write lands while the round reads the disk: it must be logged after the round's log.
    let heldBack: number[] = [];
    const round = await tracker.resyncRound(async (offset, length) => {
      if (offset === 128 * 1024) {
        await write(128 * 1024, pattern(99, 4096));
        await ChangeTracker.cut([tracker]);
        heldBack = tracker.sealedLogs().map((l) => l.sequence);
      }
      return Buffer.from(disk.subarray(offset, offset + length));
    }, SIZE);
    expect(heldBack).toEqual([]);
    expect(round).toMatchObject({ remainingBytes: 0 });
    expect(round!.log.resync).toBe(true);
    await ChangeTracker.cut([tracker]);
    const logs = tracker.sealedLogs();
    const seqs = logs.map((l) => l.sequence);
    expect(seqs).toEqual([...seqs].sort((a, b) => a - b));
    expect(logs[0]!.resync).toBe(true);
    expect(tracker.status().resyncRequired).toBe(false);

    // A replica that had the first (shipped) log, then gets every log in order, equals the disk.
    const replicaFile = path.join(dir, 'replica.img');
    fs.writeFileSync(replicaFile, Buffer.alloc(SIZE));
    fs.writeFileSync(replicaFile, pattern(1, 64 * 1024), { flag: 'r+' });
    const replica = await openDisk(`raw:${replicaFile}`);
    await applyHrlLogs(replica, logs.map((l) => l.path));
    await replica.close();
    expect(fs.readFileSync(replicaFile).equals(disk)).toBe(true);
    await tracker.close();
  });

  it('fills a sequence held by a round cut short by a crash with an empty resync log', async () => {
    const dir = tmp();
    const tracker = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: SIZE, overflowRatio: 0.25, persistIntervalMs: 0 });
    for (let i = 0; i < 20; i++) await tracker.recordWrite(i * 64 * 1024, pattern(i, 64 * 1024));
    expect(tracker.status().resyncRequired).toBe(true);
    // The round dies while reading: simulate the crash by never letting it finish.
    const never = new Promise<Buffer>(() => undefined);
    void tracker.resyncRound(() => never, SIZE);
    await new Promise((r) => setTimeout(r, 100));
    const state = JSON.parse(fs.readFileSync(path.join(dir, 'disk0.tracker.json'), 'utf8')) as { reservations?: Array<{ sequence: number }> };
    expect(state.reservations?.length).toBe(1);
    const held = state.reservations![0]!.sequence;

    const reopened = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: SIZE, overflowRatio: 0.25, persistIntervalMs: 0 });
    const logs = reopened.sealedLogs();
    expect(logs.map((l) => l.sequence)).toContain(held);
    const filler = logs.find((l) => l.sequence === held)!;
    expect(filler).toMatchObject({ resync: true, entryCount: 0 });
    // The extents still need a resync.
    expect(reopened.status().resyncRequired).toBe(true);
    await reopened.close();
  });
});
