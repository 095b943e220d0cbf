import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { openDisk } from '../../src/targets/disk-spec';
import { ChangeTracker, type ResyncReport } from '../../src/tracking/change-tracker';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { verifyHrlLog } from '../../src/tracking/hrl-reader';
import { HrlWriter, type HrlWriterFile } from '../../src/tracking/hrl-writer';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const DISK = 1024 * 1024;

/** Trackers opened by a test; those it leaves open on purpose (a simulated crash) are closed after it, not left to the garbage collector. */
const opened: ChangeTracker[] = [];
afterEach(async () => {
  for (const t of opened.splice(0)) await t.close({ seal: false }).catch(() => undefined);
});

async function open(dir: string, extra: Partial<Parameters<typeof ChangeTracker.open>[0]> = {}): Promise<ChangeTracker> {
  const t = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, metadataSizeBytes: 512, persistIntervalMs: 0, clock: new SimulatedClock(), ...extra });
  opened.push(t);
  return t;
}

const block = (n: number, fillByte: number, length = 4096): [number, Buffer] => [n * 4096, Buffer.alloc(length, fillByte)];

/** Both map slots, for noticing that a persist happened. */
function mapsBytes(dir: string): Buffer {
  return Buffer.concat(['disk0.maps.0', 'disk0.maps.1'].map((n) => (fs.existsSync(path.join(dir, n)) ? fs.readFileSync(path.join(dir, n)) : Buffer.alloc(0))));
}

async function applyTo(files: string[], dir: string): Promise<Buffer> {
  const img = path.join(dir, `img-${Math.random().toString(16).slice(2)}.img`);
  const target = await openDisk(`raw:${img}`, { create: { sizeBytes: DISK } });
  await applyHrlLogs(target, files).finally(() => target.close());
  return fs.readFileSync(img);
}

describe('ChangeTracker', () => {
  it('seals logs whose names sort in apply order, with sidecars, and whose apply reproduces the writes', async () => {
    const dir = tempDir();
    const t = await open(dir);
    const model = Buffer.alloc(DISK);
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 5; i++) {
        const [off, data] = block(i * 3 + round, round * 10 + i + 1);
        await t.recordWrite(off, data);
        data.copy(model, off);
      }
      await t.recordZeroes(4096 * 40, 8192);
      await t.rotate();
    }
    const logs = t.sealedLogs();
    expect(logs.map((l) => l.name)).toEqual(['disk0-000000000001.hrl', 'disk0-000000000002.hrl', 'disk0-000000000003.hrl']);
    expect(logs.map((l) => l.name).slice().sort()).toEqual(logs.map((l) => l.name));
    for (const l of logs) {
      const side = JSON.parse(fs.readFileSync(l.sidecarPath, 'utf8'));
      expect(side).toMatchObject({ sequence: l.sequence, uniqueId: l.uniqueId, entryCount: 6, recovered: false });
      expect((await verifyHrlLog(l.path)).header.uniqueId).toBe(l.uniqueId);
    }
    expect(logs[1]!.previousUniqueId).toBe(logs[0]!.uniqueId);
    expect(await applyTo(logs.map((l) => l.path), dir)).toEqual(model);
    await t.close();
  });

  it('acknowledge deletes a log and keeps dirty what newer logs and the active log still cover', async () => {
    const dir = tempDir();
    const t = await open(dir);
    await t.recordWrite(...block(0, 1));
    await t.recordWrite(...block(5, 1));
    const [first] = [await t.rotate()];
    await t.recordWrite(...block(0, 2));
    await t.recordWrite(...block(9, 2));
    const second = await t.rotate();
    await t.recordWrite(...block(20, 3));
    expect([...t.dirtyExtents()]).toEqual([{ offset: 0, length: 4096 }, { offset: 5 * 4096, length: 4096 }, { offset: 9 * 4096, length: 4096 }, { offset: 20 * 4096, length: 4096 }]);
    expect(await t.acknowledge(first!.name)).toBe(true);
    expect(fs.existsSync(first!.path) || fs.existsSync(first!.sidecarPath)).toBe(false);
    expect([...t.dirtyExtents()]).toEqual([{ offset: 0, length: 4096 }, { offset: 9 * 4096, length: 4096 }, { offset: 20 * 4096, length: 4096 }]);
    expect(await t.acknowledge(second!.name)).toBe(true);
    expect([...t.dirtyExtents()]).toEqual([{ offset: 20 * 4096, length: 4096 }]);
    expect(await t.acknowledge(second!.name)).toBe(false);
    await t.close();
  });

  it('folds logs into the dirty map past the overflow ratio, keeps tracking, and reports the resync extents', async () => {
    const dir = tempDir();
    const reports: ResyncReport[] = [];
    const t = await open(dir, { overflowRatio: 0.25, onResyncRequired: (r) => reports.push(r) });
    for (let i = 0; i < 40; i++) await t.recordWrite(...block(i * 2, 7));
    await t.rotate();
    for (let i = 0; i < 40 && t.status().mode === 'logging'; i++) await t.recordWrite(...block(i * 2 + 1, 8));
    expect(t.status()).toMatchObject({ mode: 'dirty-only', resyncRequired: true, sealedLogs: 0 });
    expect(reports.map((r) => r.reason)).toEqual(['overflow']);
    expect(fs.readdirSync(dir).filter((n) => n.includes('.hrl'))).toEqual([]);
    await t.recordWrite(...block(200, 9));
    const resync = [...t.resyncExtents()];
    expect(resync[resync.length - 1]).toEqual({ offset: 200 * 4096, length: 4096 });
    expect(t.status().resyncBytes).toBeLessThan(DISK / 2);
    // A restart in dirty-only mode stays there and keeps the extents.
    await t.close();
    const again = await open(dir);
    expect(again.status()).toMatchObject({ mode: 'dirty-only', resyncBytes: t.status().resyncBytes });
    const snapshot = await again.beginResync();
    expect(again.status().mode).toBe('logging');
    await again.recordWrite(...block(250, 1));
    await again.completeResync(snapshot);
    expect(again.status()).toMatchObject({ resyncRequired: false, resyncBytes: 0 });
    expect([...again.dirtyExtents()]).toEqual([{ offset: 250 * 4096, length: 4096 }]);
    await again.close();
  });

  it('folds a zero range that would pass the overflow limit without logging its zeroes first', async () => {
    const dir = tempDir();
    const reports: ResyncReport[] = [];
    const t = await open(dir, { onResyncRequired: (r) => reports.push(r) });
    const appendZeroes = vi.spyOn(HrlWriter.prototype, 'appendZeroes');
    try {
      // Small enough: logged as zero entries.
      await t.recordTrim(64 * 1024, 64 * 1024);
      expect(appendZeroes).toHaveBeenCalledTimes(1);
      expect(t.status().mode).toBe('logging');
      // A whole-disk TRIM passes the limit (half the disk) on its own.
      await t.recordTrim(0, DISK);
      expect(appendZeroes).toHaveBeenCalledTimes(1);
      expect(t.status()).toMatchObject({ mode: 'dirty-only', resyncRequired: true });
      expect(reports.map((r) => r.reason)).toEqual(['overflow']);
      expect([...t.resyncExtents()]).toEqual([{ offset: 0, length: DISK }]);
      expect(fs.readdirSync(dir).filter((n) => n.includes('.hrl'))).toEqual([]);
    } finally {
      appendZeroes.mockRestore();
      await t.close();
    }
  });

  it('cuts several disks at one point: shared cut id and time, writes during the cut land in the next logs', async () => {
    const dir = tempDir();
    const clock = new SimulatedClock(Date.UTC(2026, 5, 1));
    const a = await ChangeTracker.open({ dir, diskId: 'a', diskSizeBytes: DISK, persistIntervalMs: 0, clock });
    const b = await ChangeTracker.open({ dir, diskId: 'b', diskSizeBytes: DISK, persistIntervalMs: 0, clock });
    await a.recordWrite(...block(1, 1));
    await b.recordWrite(...block(2, 2));
    // A cut waits for next logs still being made before it holds the writes
    // (those recorded during that wait land before it); here they are ready.
    await Promise.all([a.nextLogReady(), b.nextLogReady()]);
    const cut = ChangeTracker.cut([a, b]);
    const during = [a.recordWrite(...block(3, 3)), b.recordWrite(...block(4, 4))];
    const [sa, sb] = await cut;
    await Promise.all(during);
    expect(sa!.cutId).toBe(sb!.cutId);
    expect(sa!.cutTimeMs).toBe(sb!.cutTimeMs);
    expect(sa!.entryCount + sb!.entryCount).toBe(2);
    const [na, nb] = await ChangeTracker.cut([a, b], { appTag: 'nightly' });
    expect(na!.entryCount).toBe(1);
    expect(nb!.entryCount).toBe(1);
    expect(JSON.parse(fs.readFileSync(na!.sidecarPath, 'utf8'))).toMatchObject({ appTag: 'nightly', cutId: nb!.cutId });
    expect(a.sealedLogs().map((l) => l.appTag)).toEqual([undefined, 'nightly']);
    await a.close();
    await b.close();
  });

  it('continues the UniqueId chain across a clean restart and reports no resync', async () => {
    const dir = tempDir();
    const t = await open(dir);
    await t.recordWrite(...block(1, 1));
    await t.close();
    const t2 = await open(dir);
    await t2.recordWrite(...block(2, 2));
    await t2.rotate();
    const logs = t2.sealedLogs();
    expect(logs).toHaveLength(2);
    expect(logs[1]!.previousUniqueId).toBe(logs[0]!.uniqueId);
    expect(t2.status().resyncRequired).toBe(false);
    await t2.close();
  });

  it('after a crash keeps every flushed write in a recovered log, and resyncs only the last flushed round', async () => {
    const dir = tempDir();
    const t = await open(dir);
    const model = Buffer.alloc(DISK);
    for (let i = 0; i < 10; i++) {
      const [off, data] = block(i, i + 1);
      await t.recordWrite(off, data);
      data.copy(model, off);
    }
    await t.flush();
    // Crash: the process stops without closing anything.
    const t2 = await open(dir);
    const logs = t2.sealedLogs();
    expect(logs).toHaveLength(1);
    expect(logs[0]).toMatchObject({ recovered: true, entryCount: 10 });
    // The round the last flush persisted as pending is resynced although the
    // log holds it: a rewrite in place in it could have been lost whole
    // (tracker-recovery.ts). Nothing before that round is.
    expect(t2.status()).toMatchObject({ resyncRequired: true, lastResyncReason: 'pending-after-crash' });
    expect([...t2.resyncExtents()].reduce((n, e) => n + e.length, 0)).toBeLessThanOrEqual(10 * 4096);
    expect(await applyTo(logs.map((l) => l.path), dir)).toEqual(model);
    await t2.close();
  });

  it('marks the extents of a torn tail for resync when a flush did not reach the log', async () => {
    const dir = tempDir();
    const t = await open(dir);
    await t.recordWrite(...block(1, 1));
    await t.flush();
    const durable = fs.statSync(path.join(dir, 'disk0-000000000001.hrl.open')).size;
    await t.recordWrite(...block(7, 2));
    await t.flush();
    // As if the log fsync had not completed: the second block never reached the disk.
    fs.truncateSync(path.join(dir, 'disk0-000000000001.hrl.open'), durable + 100);
    const reports: ResyncReport[] = [];
    const t2 = await open(dir, { onResyncRequired: (r) => reports.push(r) });
    expect(t2.sealedLogs()[0]).toMatchObject({ entryCount: 1 });
    expect([...t2.resyncExtents()]).toEqual([{ offset: 7 * 4096, length: 4096 }]);
    expect(reports.map((r) => r.reason)).toEqual(['torn-tail']);
    await t2.close();
  });

  it('persists the maps on its timer, so an unflushed write lost with the log tail becomes a resync extent', async () => {
    const dir = tempDir();
    const clock = new SimulatedClock();
    const t = await open(dir, { clock, persistIntervalMs: 1000 });
    const logFile = path.join(dir, 'disk0-000000000001.hrl.open');
    const anchorEnd = fs.statSync(logFile).size;
    const before = mapsBytes(dir);
    await t.recordWrite(...block(12, 5));
    await clock.advance(1000);
    // The timer's persist does real file I/O; wait for it to land.
    for (let i = 0; i < 200 && mapsBytes(dir).equals(before); i++) await new Promise((r) => setTimeout(r, 10));
    expect(mapsBytes(dir).equals(before)).toBe(false);
    // Crash before any flush: none of the log beyond its anchor reached the disk.
    fs.truncateSync(logFile, anchorEnd);
    const t2 = await open(dir);
    expect(t2.sealedLogs()[0]).toMatchObject({ entryCount: 0, recovered: true });
    expect([...t2.resyncExtents()]).toEqual([{ offset: 12 * 4096, length: 4096 }]);
    // `t` stands for the crashed process: it is never used again (its timer runs on the simulated clock only).
    await t2.close();
  });

  it('falls back to the other map slot when the newer one is torn', async () => {
    const dir = tempDir();
    const t = await open(dir);
    await t.recordWrite(...block(3, 1));
    await t.flush();
    await t.recordWrite(...block(4, 1));
    await t.flush();
    await t.close({ seal: false });
    const slots = ['disk0.maps.0', 'disk0.maps.1'].map((n) => path.join(dir, n));
    // The generation is the u64 at byte 48 of a slot (docs/formats/ms-hrl.md).
    const newer = slots.reduce((a, b) => (fs.readFileSync(a).readBigUInt64LE(48) >= fs.readFileSync(b).readBigUInt64LE(48) ? a : b));
    fs.truncateSync(newer, 100);
    const reports: ResyncReport[] = [];
    const t2 = await open(dir, { onResyncRequired: (r) => reports.push(r) });
    expect(reports.map((r) => r.reason)).not.toContain('dirty-map-lost');
    expect(t2.sealedLogs()[0]).toMatchObject({ entryCount: 2 });
    await t2.close();
  });

  it('asks for a whole-disk resync only when the dirty map is lost', async () => {
    const dir = tempDir();
    const t = await open(dir);
    await t.recordWrite(...block(1, 1));
    await t.close();
    fs.rmSync(path.join(dir, 'disk0.maps.0'), { force: true });
    fs.rmSync(path.join(dir, 'disk0.maps.1'), { force: true });
    const reports: ResyncReport[] = [];
    const t2 = await open(dir, { onResyncRequired: (r) => reports.push(r) });
    expect(reports.map((r) => r.reason)).toEqual(['dirty-map-lost']);
    expect(t2.status().resyncBytes).toBe(DISK);
    await t2.close();
  });

  it('cleans up only its own leftovers in a directory shared with disk1 and disk10', async () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'disk10.maps.tmp'), 'x');
    fs.writeFileSync(path.join(dir, 'disk10-000000000003.hrl.json.tmp'), 'x');
    fs.writeFileSync(path.join(dir, 'disk1.maps.tmp'), 'x');
    fs.writeFileSync(path.join(dir, 'disk1-000000000003.hrl.json.tmp'), 'x');
    const t = await ChangeTracker.open({ dir, diskId: 'disk1', diskSizeBytes: DISK, persistIntervalMs: 0 });
    expect(fs.readdirSync(dir).filter((n) => n.endsWith('.tmp')).sort()).toEqual(['disk10-000000000003.hrl.json.tmp', 'disk10.maps.tmp']);
    await t.close();
  });

  it('folds into the resync map when the log volume fails, still honouring the flush, and resumes logging after resync', async () => {
    const dir = tempDir();
    let failSync = false;
    const openLogFile = async (p: string): Promise<HrlWriterFile> => {
      const fh = await fsp.open(p, 'wx+');
      return {
        write: (b, o, l, pos) => fh.write(b, o, l, pos),
        writev: (bs, pos) => fh.writev(bs, pos),
        datasync: async () => {
          if (failSync) throw Object.assign(new Error('no space left on device'), { code: 'ENOSPC' });
          await fh.datasync();
        },
        close: () => fh.close(),
      };
    };
    const reports: ResyncReport[] = [];
    const t = await open(dir, { openLogFile, onResyncRequired: (r) => reports.push(r) });
    await t.recordWrite(...block(1, 1));
    await t.rotate();
    await t.recordWrite(...block(2, 2));
    failSync = true;
    await t.flush();
    expect(reports.map((r) => r.reason)).toEqual(['log-io-error']);
    expect(t.status()).toMatchObject({ mode: 'dirty-only', sealedLogs: 0 });
    expect([...t.resyncExtents()]).toEqual([{ offset: 4096, length: 8192 }]);
    expect(fs.readdirSync(dir).filter((n) => n.includes('.hrl'))).toEqual([]);
    failSync = false;
    const snapshot = await t.beginResync();
    await t.recordWrite(...block(9, 3));
    await t.completeResync(snapshot);
    expect(t.status()).toMatchObject({ mode: 'logging', resyncRequired: false, activeLogEntries: 1 });
    await t.close();
  });

  it('refuses writes outside the disk', async () => {
    const t = await open(tempDir());
    await expect(t.recordWrite(DISK - 100, Buffer.alloc(200))).rejects.toMatchObject({ code: 'BR_TARGET_OUT_OF_RANGE' });
    await t.close();
  });
});
