import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { failover, loadPoints } from '../../src/retention/failover';
import { diskRetentionPaths } from '../../src/retention/retention-format';
import { DiskHistory, retentionUsage } from '../../src/retention/retention-pruner';
import { selectablePoints } from '../../src/retention/recovery-points';
import { seqOfUndoFile } from '../../src/retention/retention-format';
import type { ApplyingHop } from '../../src/transport/master-target';
import { runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, startMasterTarget, useRetentionDirs } from './retention-fixture';

const MINUTE_MS = 60_000;

function journalSeqs(retentionDir: string): number[] {
  const dir = diskRetentionPaths(retentionDir, 'disk0').journalDir;
  return fs.readdirSync(dir).map(seqOfUndoFile).filter((s): s is number => s !== undefined).sort((a, b) => a - b);
}

describe('retention policy', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
  });

  /**
   * Eight logs of 40 writes, each over an eighth of the zeroed disk no
   * earlier log wrote (so every pre-image is zeroes: a segment of holes),
   * applied under `capacityBytes`; every point must be kept.
   */
  async function applyOverFreshRegions(seed: number, capacityBytes: number) {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const t0 = Date.now() - 60 * MINUTE_MS;
    const logs = [];
    const images = new Map<number, Buffer>();
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(seed);
    const regionBytes = DISK_BYTES / 8;
    for (let seq = 1; seq <= 8; seq++) {
      logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: t0 + seq * MINUTE_MS, writes: 40, region: { offset: (seq - 1) * regionBytes, length: regionBytes } }, model, rand));
      images.set(seq, Buffer.from(model));
    }
    const { mt } = await startMasterTarget(setup, { capacityBytes });
    running.push(mt);
    await sendAll(mt, logs);
    await mt.drain();
    expect(mt.diskStatus()[0]!.appliedSeq).toBe(8);
    expect(mt.diskStatus()[0]!.reasons.join('\n')).not.toContain('BR_RETENTION_VOLUME_FULL');
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => p.seq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    return { dir, retentionDir, images, points, usage: await retentionUsage(retentionDir) };
  }

  it('keeps the newest selectable point past the window while only resync points follow it', async () => {
    const h = new DiskHistory(retentionTmp(), 'disk0');
    await h.open(null);
    const HOUR_MS = 60 * MINUTE_MS;
    const now = Date.UTC(2026, 10, 21, 12);
    // The last consistent point, cut 30 h ago (the source was cut off for a
    // day), then a networked resync's slot point and a tainted log.
    await h.append([{ v: 1, t: 'point', seq: 9, timeMs: now - 31 * HOUR_MS, kind: 'crash', cutId: 'c9', applied: true }]);
    await h.append([{ v: 1, t: 'point', seq: 10, timeMs: now - 30 * HOUR_MS, kind: 'crash', cutId: 'c10', applied: true }]);
    await h.append([{ v: 1, t: 'point', seq: 11, timeMs: now - 2 * HOUR_MS, kind: 'crash', cutId: 'resync-x', resync: true, applied: true }]);
    await h.append([{ v: 1, t: 'point', seq: 12, timeMs: now - HOUR_MS, kind: 'crash', cutId: 'c12', resync: true }]);
    await h.append([{ v: 1, t: 'applied', seq: 12 }]);
    expect(await h.pruneWindow(now, 24 * HOUR_MS)).toBe(1);
    expect(selectablePoints(h.points).map((p) => p.seq)).toEqual([10]);
    // Once a consistent point follows, the old one goes as the window says.
    await h.append([{ v: 1, t: 'point', seq: 13, timeMs: now, kind: 'crash', cutId: 'c13' }]);
    await h.append([{ v: 1, t: 'applied', seq: 13 }]);
    expect(await h.pruneWindow(now, 24 * HOUR_MS)).toBe(1);
    expect(h.points.map((p) => p.seq)).toEqual([11, 12, 13]);
  });

  it('prunes journal and points older than the window on a simulated clock, keeping the rest rebuildable', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir, ['disk0'], 'raw', 1);
    const t0 = Date.now() - 3 * 60 * MINUTE_MS;
    const clock = new SimulatedClock(t0);
    const { mt } = await startMasterTarget(setup, { clock });
    running.push(mt);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(11);
    const images = new Map<number, Buffer>();
    // One log every 20 minutes; each is applied a minute after its cut.
    for (let seq = 1; seq <= 7; seq++) {
      const cutTimeMs = t0 + (seq - 1) * 20 * MINUTE_MS;
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs }, model, rand);
      images.set(seq, Buffer.from(model));
      await clock.advance(cutTimeMs + MINUTE_MS - clock.now());
      await sendAll(mt, [log]);
      await mt.drain();
    }
    // Now = t0 + 121 min: the window starts at t0 + 61 min, so points 1-4 (t0 .. t0 + 60 min) are gone.
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => p.seq)).toEqual([5, 6, 7]);
    expect(journalSeqs(retentionDir)).toEqual([6, 7]);
    for (const p of points) {
      const out = `raw:${path.join(dir, `w${p.seq}.img`)}`;
      await failover({ retentionDir, diskId: 'disk0', point: p.id, out, clock });
      expect(fs.readFileSync(out.slice(4)).equals(images.get(p.seq)!)).toBe(true);
    }
    await expect(failover({ retentionDir, diskId: 'disk0', point: new Date(t0 + 30 * MINUTE_MS).toISOString(), out: `raw:${path.join(dir, 'old.img')}`, clock })).rejects.toMatchObject({ code: 'BR_POINT_BEFORE_WINDOW' });
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-2', out: `raw:${path.join(dir, 'old2.img')}`, clock })).rejects.toMatchObject({ code: 'BR_POINT_UNKNOWN' });

    const usage = await retentionUsage(retentionDir);
    expect(usage.disks).toHaveLength(1);
    expect(usage.disks[0]).toMatchObject({ diskId: 'disk0', points: 3, journalSegments: 2, failedOver: true, oldestPointTime: new Date(t0 + 80 * MINUTE_MS).toISOString() });
    const segments = journalSeqs(retentionDir).map((s) => fs.statSync(path.join(diskRetentionPaths(retentionDir, 'disk0').journalDir, `${String(s).padStart(20, '0')}.undo.hrl`)));
    const journalBytes = segments.reduce((n, st) => n + st.blocks * 512, 0);
    expect(usage.disks[0]!.journalBytes).toBe(journalBytes);
    expect(usage.disks[0]!.journalApparentBytes).toBe(segments.reduce((n, st) => n + st.size, 0));
    expect(usage.usedBytes).toBeGreaterThan(journalBytes);
    expect(usage.volumeTotalBytes).toBeGreaterThan(0);
    const cli = await runCli(['retention', 'status', '--retention', retentionDir, '--json']);
    expect(cli.status, cli.stderr).toBe(0);
    expect(JSON.parse(cli.stdout)).toMatchObject({ dir: retentionDir, usedBytes: usage.usedBytes, disks: [{ diskId: 'disk0', points: 3, journalBytes }] });
  });

  it('keeps applying when the volume fills: prunes oldest first, warns on the disk health, and the kept points rebuild', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(12);
    const images = new Map<number, Buffer>();
    const logs = [];
    const t0 = Date.now() - 60 * MINUTE_MS;
    for (let seq = 1; seq <= 10; seq++) {
      logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: t0 + seq * MINUTE_MS, writes: 40 }, model, rand));
      images.set(seq, Buffer.from(model));
    }
    // Room for roughly three pre-images of these logs (each ~350 KiB).
    const capacityBytes = 1024 * 1024;
    const { mt } = await startMasterTarget(setup, { capacityBytes });
    running.push(mt);
    await sendAll(mt, logs);
    await mt.drain();
    const status = mt.diskStatus()[0]!;
    expect(status.appliedSeq).toBe(10);
    expect(status.health).toBe('Warning');
    expect(status.reasons.join('\n')).toContain('BR_RETENTION_VOLUME_FULL');
    expect(fs.readFileSync(setup.targetSpec('disk0').slice(4)).equals(model)).toBe(true);

    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.length).toBeGreaterThanOrEqual(2);
    expect(points.length).toBeLessThan(10);
    // The newest history is kept: the points are a suffix ending at the newest log.
    expect(points.map((p) => p.seq)).toEqual(Array.from({ length: points.length }, (_, i) => 11 - points.length + i));
    const usage = await retentionUsage(retentionDir);
    expect(usage.usedBytes).toBeLessThanOrEqual(capacityBytes);
    for (const p of points) {
      const out = `raw:${path.join(dir, `f${p.seq}.img`)}`;
      await failover({ retentionDir, diskId: 'disk0', point: p.id, out });
      expect(fs.readFileSync(out.slice(4)).equals(images.get(p.seq)!)).toBe(true);
    }
  });

  it('counts a segment by the bytes it occupies, not its length: zero pre-images in holes keep every point under a bound their lengths exceed', async () => {
    // Each segment is ~330 KiB long, nearly all holes.
    const capacityBytes = 1024 * 1024;
    const { dir, retentionDir, images, points, usage } = await applyOverFreshRegions(14, capacityBytes);
    // Counted by length, the journal alone would be over the bound and the oldest points pruned.
    expect(usage.disks[0]!.journalApparentBytes).toBeGreaterThan(capacityBytes);
    expect(usage.usedBytes).toBeLessThanOrEqual(capacityBytes);
    expect(usage.disks[0]!.journalBytes).toBeLessThan(usage.disks[0]!.journalApparentBytes / 4);
    for (const p of [points[0]!, points[4]!]) {
      const out = `raw:${path.join(dir, `h${p.seq}.img`)}`;
      await failover({ retentionDir, diskId: 'disk0', point: p.id, out });
      expect(fs.readFileSync(out.slice(4)).equals(images.get(p.seq)!)).toBe(true);
    }
  });

  it('journals a pre-image whose length exceeds the bound when what it will occupy fits, pruning nothing', async () => {
    // Less than one segment's length (~300 KiB each), more than all eight occupy (mostly holes).
    const capacityBytes = 200 * 1024;
    const { dir, retentionDir, images, points, usage } = await applyOverFreshRegions(15, capacityBytes);
    expect(usage.disks[0]!.journalApparentBytes / 7).toBeGreaterThan(capacityBytes);
    expect(usage.usedBytes).toBeLessThanOrEqual(capacityBytes);
    const out = `raw:${path.join(dir, 'h1.img')}`;
    await failover({ retentionDir, diskId: 'disk0', point: points[0]!.id, out });
    expect(fs.readFileSync(out.slice(4)).equals(images.get(1)!)).toBe(true);
  });

  it('drops all history but keeps applying when not even one pre-image fits', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(13);
    const logs = [];
    for (let seq = 1; seq <= 4; seq++) logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: Date.now() - (10 - seq) * MINUTE_MS }, model, rand));
    const { mt } = await startMasterTarget(setup, { capacityBytes: 16 * 1024 });
    running.push(mt);
    await sendAll(mt, logs);
    await mt.drain();
    expect(mt.diskStatus()[0]).toMatchObject({ appliedSeq: 4, health: 'Warning' });
    expect(fs.readFileSync(setup.targetSpec('disk0').slice(4)).equals(model)).toBe(true);
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => p.seq)).toEqual([4]);
    expect(journalSeqs(retentionDir)).toEqual([]);
    const out = `raw:${path.join(dir, 'latest.img')}`;
    await failover({ retentionDir, diskId: 'disk0', point: 'latest-processed', out });
    expect(fs.readFileSync(out.slice(4)).equals(model)).toBe(true);
  });
});
