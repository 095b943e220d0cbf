import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { loadPoints } from '../../src/retention/failover';
import { PointView } from '../../src/retention/point-view';
import { readManifest } from '../../src/retention/retention-manifest';
import { openDisk } from '../../src/targets/disk-spec';
import type { ApplyingHop } from '../../src/transport/master-target';
import type { ResyncJournalProvider } from '../../src/transport/resync-route';
import { useTempDirs } from '../helpers/tmp';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, startMasterTarget, useRetentionDirs } from './retention-fixture';

const MINUTE_MS = 60_000;

/** Sectors of `got` that differ from `want`. */
function sectorsDiffering(got: Buffer, want: Buffer): number {
  let diff = 0;
  for (let i = 0; i < want.length; i += 512) if (!got.subarray(i, i + 512).equals(want.subarray(i, i + 512))) diff++;
  return diff;
}

/**
 * An open point view (an export, or a failover copy while the master target
 * runs) while the history behind it changes: a networked resync session in
 * the slot after it (the slot's pre-image file is written at the session's
 * end and rewritten when the slot's own log arrives, unlike every other
 * segment, which is final once it exists: docs/formats/undo-journal.md,
 * "Resync sessions"), a history dropped for space, and many segments.
 */
describe('a point view while the history changes under it', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
  });

  /** Logs 1 and 2 applied; returns the disk at point 1 and what is needed to go on. */
  async function twoPoints(seed: number) {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    // The master target's own provider, as its resync route uses it: log 3's merge goes through it.
    const journal = (mt as unknown as { resyncJournal: ResyncJournalProvider }).resyncJournal;
    const rand = prng(seed);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const logDir = path.join(dir, 'src');
    await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq: 1, cutTimeMs: baseMs + MINUTE_MS }, source, rand)]);
    const point1 = Buffer.from(source);
    await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq: 2, cutTimeMs: baseMs + 2 * MINUTE_MS }, source, rand)]);
    await mt.drain();
    const openView = async (): Promise<PointView> => {
      const { points } = await loadPoints(retentionDir, 'disk0');
      return PointView.open({ retentionDir, manifest: await readManifest(retentionDir, 'disk0'), point: points.find((p) => p.seq === 1)!, newestSeq: points[points.length - 1]!.seq, verifyPayloads: 'first-read' });
    };
    const sendLog3 = async (): Promise<void> => {
      // Log 3 writes where no session wrote: its own pre-images join slot 3.
      await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq: 3, cutTimeMs: baseMs + 3 * MINUTE_MS, region: { offset: 1 << 20, length: 1 << 20 } }, source, rand)]);
      await mt.drain();
    };
    return { setup, journal, point1, openView, sendLog3 };
  }

  it('reads point 1 exactly after log 3 adds its own pre-images to the slot the view already read', async () => {
    const { setup, journal, point1, openView, sendLog3 } = await twoPoints(7);
    const target = await openDisk(setup.targetSpec('disk0'));
    const session = (await journal.openSession('disk0', target, 2, 'a'.repeat(32)))!;
    await session.preserve(target, 8192, 4096);
    await target.write(8192, Buffer.alloc(4096, 0xdd));
    await target.flush();
    await session.finish(target);
    await target.close();
    const view = await openView();
    try {
      expect(sectorsDiffering(await view.read(0, DISK_BYTES), point1)).toBe(0);
      await sendLog3();
      expect(sectorsDiffering(await view.read(0, DISK_BYTES), point1)).toBe(0);
    } finally {
      await view.close();
    }
  });

  it('refuses reads while a session changes the target in the slot it needs next, and reads exactly after', async () => {
    const { setup, journal, point1, openView, sendLog3 } = await twoPoints(8);
    const view = await openView();
    const target = await openDisk(setup.targetSpec('disk0'));
    try {
      expect(sectorsDiffering(await view.read(0, DISK_BYTES), point1)).toBe(0);
      const session = (await journal.openSession('disk0', target, 2, 'b'.repeat(32)))!;
      await session.preserve(target, 3 << 20, 4096);
      await target.write(3 << 20, Buffer.alloc(4096, 0xdd));
      await expect(view.read(3 << 20, 4096)).rejects.toMatchObject({ code: 'BR_POINT_RESYNC_RUNNING' });
      await session.finish(target);
      expect(sectorsDiffering(await view.read(0, DISK_BYTES), point1)).toBe(0);
      await target.close();
      await sendLog3();
      expect(sectorsDiffering(await view.read(0, DISK_BYTES), point1)).toBe(0);
    } finally {
      await target.close();
      await view.close();
    }
  });

  it('refuses reads while a second session runs in a slot the view holds, and reads exactly after', async () => {
    const { setup, journal, point1, openView } = await twoPoints(9);
    const target = await openDisk(setup.targetSpec('disk0'));
    try {
      const first = (await journal.openSession('disk0', target, 2, 'c'.repeat(32)))!;
      await first.preserve(target, 8192, 4096);
      await target.write(8192, Buffer.alloc(4096, 0xdd));
      await first.finish(target);
      const view = await openView();
      try {
        expect(sectorsDiffering(await view.read(0, DISK_BYTES), point1)).toBe(0);
        // A second session in the same slot (the first one's resync was retried).
        const second = (await journal.openSession('disk0', target, 2, 'd'.repeat(32)))!;
        await second.preserve(target, 2 << 20, 8192);
        await target.write(2 << 20, Buffer.alloc(8192, 0xee));
        await expect(view.read(2 << 20, 8192)).rejects.toMatchObject({ code: 'BR_POINT_RESYNC_RUNNING' });
        await second.finish(target);
        expect(sectorsDiffering(await view.read(0, DISK_BYTES), point1)).toBe(0);
      } finally {
        await view.close();
      }
    } finally {
      await target.close();
    }
  });

  it('fails its reads once a log was applied without a pre-image, instead of serving that log as the point', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    // Room for small pre-images only.
    const { mt } = await startMasterTarget(setup, { capacityBytes: 256 * 1024 });
    running.push(mt);
    const rand = prng(13);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const logDir = path.join(dir, 'src');
    await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq: 1, cutTimeMs: baseMs + MINUTE_MS, writes: 200, region: { offset: 0, length: 1 << 20 } }, source, rand)]);
    const point1 = Buffer.from(source);
    await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq: 2, cutTimeMs: baseMs + 2 * MINUTE_MS, writes: 2, region: { offset: 0, length: 1 << 20 } }, source, rand)]);
    await mt.drain();
    const { points } = await loadPoints(retentionDir, 'disk0');
    const view = await PointView.open({ retentionDir, manifest: await readManifest(retentionDir, 'disk0'), point: points.find((p) => p.seq === 1)!, newestSeq: points[points.length - 1]!.seq, verifyPayloads: 'first-read' });
    try {
      expect(sectorsDiffering(await view.read(0, DISK_BYTES), point1)).toBe(0);
      // A log whose pre-image does not fit even with all history pruned: applied without one.
      await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq: 3, cutTimeMs: baseMs + 3 * MINUTE_MS, writes: 200, region: { offset: 0, length: 1 << 20 } }, source, rand)]);
      await mt.drain();
      expect((await loadPoints(retentionDir, 'disk0')).points.map((p) => p.seq)).toEqual([3]);
      await expect(view.read(0, DISK_BYTES)).rejects.toMatchObject({ code: 'BR_RETENTION_JOURNAL_MISSING' });
    } finally {
      await view.close();
    }
  });

  it('holds no descriptor for a segment whose every byte an older one covers', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    const rand = prng(21);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const logDir = path.join(dir, 'src');
    const hot = { offset: 0, length: 16384 };
    await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq: 1, cutTimeMs: baseMs }, source, rand)]);
    const point1 = Buffer.from(source);
    // Log 2 rewrites the whole hot region; logs 3 to 30 write only inside it (a busy database page).
    await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq: 2, cutTimeMs: baseMs + 1000, writes: 400, region: hot }, source, rand)]);
    for (let seq = 3; seq <= 30; seq++) await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq, cutTimeMs: baseMs + seq * 1000, writes: 4, region: hot }, source, rand)]);
    await mt.drain();
    const { points } = await loadPoints(retentionDir, 'disk0');
    const fds = (): number => fs.readdirSync('/proc/self/fd').length;
    const before = fds();
    const view = await PointView.open({ retentionDir, manifest: await readManifest(retentionDir, 'disk0'), point: points.find((p) => p.seq === 1)!, newestSeq: 30 });
    try {
      expect(view.overlayLogs).toBe(29);
      // The target and log 2's segment (and maybe a descriptor of the runtime's own), not 29 segments.
      expect(fds() - before).toBeLessThanOrEqual(4);
      expect(sectorsDiffering(await view.read(0, DISK_BYTES), point1)).toBe(0);
    } finally {
      await view.close();
    }
  });
});
