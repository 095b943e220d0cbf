import * as fs from 'node:fs';
import { describe, expect, it, vi } from 'vitest';
import { diskRetentionPaths } from '../../src/retention/retention-format';
import { DiskHistory, PRUNE_BATCH, pruneLagMs } from '../../src/retention/retention-pruner';
import { PointCatalog, type RecoveryPoint } from '../../src/retention/recovery-points';
import { useRetentionDirs } from './retention-fixture';

const T0_MS = Date.UTC(2026, 10, 21);
/** A point every 250 ms: a disk under 200 MB/s with 48 MiB size-triggered cuts. */
const POINT_INTERVAL_MS = 250;

function syntheticPoints(diskId: string, count: number): RecoveryPoint[] {
  const points: RecoveryPoint[] = [];
  for (let seq = 1; seq <= count; seq++) points.push({ id: `${diskId}-${seq}`, seq, timeMs: T0_MS + seq * POINT_INTERVAL_MS, kind: 'crash', cutId: `c${seq}` });
  return points;
}

/** A history whose catalog holds `count` applied points (written in the catalog's format by the real class) and, if asked, an empty segment per point. */
async function fullHistory(retentionDir: string, count: number, withSegments: boolean, points = syntheticPoints('disk0', count)): Promise<DiskHistory> {
  const paths = diskRetentionPaths(retentionDir, 'disk0');
  fs.mkdirSync(paths.journalDir, { recursive: true });
  await new PointCatalog(paths.catalog, 'disk0').rewrite(points, undefined);
  const h = new DiskHistory(retentionDir, 'disk0');
  if (withSegments) for (let seq = 1; seq <= count; seq++) fs.writeFileSync(h.journal.file(seq), '');
  await h.open(count);
  return h;
}

/** Applies log `seq` as the hooks do: its point, its applied record, then the window. */
async function applyLog(h: DiskHistory, seq: number, windowMs: number): Promise<number> {
  const timeMs = T0_MS + seq * POINT_INTERVAL_MS;
  await h.append([{ v: 1, t: 'point', seq, timeMs, kind: 'crash', cutId: `c${seq}` }]);
  await h.append([{ v: 1, t: 'applied', seq }], { sync: false });
  return h.pruneWindow(timeMs, windowMs);
}

describe('retention window pruning in batches', () => {
  const retentionTmp = useRetentionDirs();

  it('rewrites a full 60,000-point catalog at most once per batch of applied logs, and the window still holds', async () => {
    const count = 60_000;
    const windowMs = count * POINT_INTERVAL_MS;
    const h = await fullHistory(retentionTmp(), count, false);
    const rewrite = vi.spyOn(h.catalog, 'rewrite');
    const batchPoints = Math.ceil(count * PRUNE_BATCH.fraction);
    const lagMs = pruneLagMs(windowMs);
    const logs = 2_000;
    let dropped = 0;
    for (let seq = count + 1; seq <= count + logs; seq++) {
      dropped += await applyLog(h, seq, windowMs);
      const cutoff = T0_MS + seq * POINT_INTERVAL_MS - windowMs;
      // The window holds, up to the batch: nothing older than the lag past its start.
      expect(h.points[0]!.timeMs).toBeGreaterThanOrEqual(cutoff - lagMs - POINT_INTERVAL_MS);
      expect(h.points.filter((p) => p.timeMs < cutoff).length).toBeLessThanOrEqual(batchPoints);
    }
    expect(rewrite.mock.calls.length).toBeGreaterThan(0);
    expect(rewrite.mock.calls.length).toBeLessThanOrEqual(Math.ceil(logs / batchPoints));
    expect(dropped).toBeGreaterThanOrEqual(logs - batchPoints);
    // Memory and the file agree: the in-place appends and the batched rewrites kept the catalog's rules.
    const reread = await h.catalog.read(count + logs);
    expect(reread.points.length).toBe(h.points.length);
    expect(reread.points[0]).toEqual(h.points[0]);
    expect(reread.points[reread.points.length - 1]).toEqual(h.points[h.points.length - 1]);
    expect(h.points[h.points.length - 1]!.seq).toBe(count + logs);
  }, 60_000);

  it('prunes at once when the oldest aged point is past the lag, even short of a batch', async () => {
    const count = 1_000;
    // Point 1 was cut ten minutes before the others (the source was idle).
    const points = syntheticPoints('disk0', count).map((p) => (p.seq === 1 ? { ...p, timeMs: T0_MS - 10 * 60_000 } : p));
    const h = await fullHistory(retentionTmp(), count, false, points);
    const windowMs = count * POINT_INTERVAL_MS;
    const lagMs = pruneLagMs(windowMs);
    // Only point 1 aged (short of a batch of 10), not yet the lag past the window's start: kept.
    const cutoffSoon = T0_MS - 10 * 60_000 + lagMs - 1;
    expect(await h.pruneWindow(cutoffSoon + windowMs, windowMs)).toBe(0);
    expect(h.points.length).toBe(count);
    // Now it is more than the lag past: pruned alone, though fewer than a batch aged.
    const cutoffLate = T0_MS - 10 * 60_000 + lagMs + 1;
    expect(cutoffLate).toBeLessThan(T0_MS + POINT_INTERVAL_MS);
    expect(await h.pruneWindow(cutoffLate + windowMs, windowMs)).toBe(1);
    expect(h.points[0]!.seq).toBe(2);
    expect((await h.catalog.read(count)).points[0]!.seq).toBe(2);
  });

  it('lists the journal directory once, then removes later batches\' segments by name', async () => {
    const count = 500;
    const windowMs = count * POINT_INTERVAL_MS;
    const h = await fullHistory(retentionTmp(), count, true);
    const list = vi.spyOn(h.journal, 'list');
    for (let seq = count + 1; seq <= count + 60; seq++) {
      // Each log's own pre-image, as the hooks write it before its point.
      fs.writeFileSync(h.journal.file(seq), '');
      await applyLog(h, seq, windowMs);
    }
    expect(list.mock.calls.length).toBe(1);
    const oldest = h.points[0]!.seq;
    expect(oldest).toBeGreaterThan(50);
    // Exactly the segments above the oldest point are left: none leaked, none needed lost.
    const left = fs.readdirSync(h.journal.dir).length;
    expect(left).toBe(count + 60 - oldest);
    expect(h.journal.has(oldest)).toBe(false);
    expect(h.journal.has(oldest + 1)).toBe(true);
  });

  it('still drops one point at once under volume pressure, segments first', async () => {
    const h = await fullHistory(retentionTmp(), 500, true);
    const freedOrder: string[] = [];
    const remove = vi.spyOn(h.journal, 'remove').mockImplementation(async function (this: unknown, seq: number) {
      freedOrder.push(`segment ${seq}`);
      fs.rmSync(h.journal.file(seq), { force: true });
    });
    const rewrite = vi.spyOn(h.catalog, 'rewrite');
    rewrite.mockImplementation(async function (points, pending) {
      freedOrder.push('catalog');
      return PointCatalog.prototype.rewrite.call(h.catalog, points, pending);
    });
    await h.dropOldestUnderPressure(1);
    expect(h.points[0]!.seq).toBe(2);
    // The new oldest point's own pre-image is not needed to rebuild it either.
    expect(freedOrder.slice(0, 3)).toEqual(['segment 1', 'segment 2', 'catalog']);
    expect(fs.existsSync(h.journal.file(1))).toBe(false);
    remove.mockRestore();
  });

  it('a crash between the batched catalog rewrite and the segment removal leaves only unreferenced segments, removed by the next prune', async () => {
    const retentionDir = retentionTmp();
    const count = 500;
    const windowMs = count * POINT_INTERVAL_MS;
    const h = await fullHistory(retentionDir, count, true);
    // The "crash": the first segment removal fails after the catalog was replaced.
    vi.spyOn(h.journal, 'remove').mockRejectedValueOnce(Object.assign(new Error('killed'), { code: 'EIO' }));
    const nowMs = T0_MS + (count + 20) * POINT_INTERVAL_MS;
    await expect(h.pruneWindow(nowMs, windowMs)).rejects.toThrow('killed');
    // Restart: the catalog lists only kept points, every one of which still has its segment.
    const again = new DiskHistory(retentionDir, 'disk0');
    await again.open(count);
    const oldest = again.points[0]!.seq;
    expect(oldest).toBe(20);
    for (const p of again.points) expect(again.journal.has(p.seq) || p.seq === count).toBe(true);
    expect((await again.journal.list())[0]).toBeLessThan(oldest);
    // The dropped points' segments are unreferenced; the next prune deletes them, keeping the oldest point's.
    await again.removeUnneeded();
    const left = await again.journal.list();
    expect(left[0]).toBe(oldest + 1);
    expect(left.length).toBe(count - oldest);
  });
});
