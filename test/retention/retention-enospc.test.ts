import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { commitFailover, failover, loadPoints } from '../../src/retention/failover';
import { retentionUsage } from '../../src/retention/retention-pruner';
import { PointCatalog, type CatalogRecord } from '../../src/retention/recovery-points';
import { systemVolumeProbe } from '../../src/retention/retention-volume';
import { resyncJournalFor } from '../../src/retention/resync-journal';
import { openDisk } from '../../src/targets/disk-spec';
import type { ApplyHooks } from '../../src/transport/master-target';
import type { ApplyingHop } from '../../src/transport/master-target';
import { useTempDirs } from '../helpers/tmp';
import { canMountTmpfs, useSmallVolumes } from '../helpers/tmpfs';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, startMasterTarget, useRetentionDirs } from './retention-fixture';

describe.skipIf(!canMountTmpfs())('a retention volume that really fills (ENOSPC on a small tmpfs)', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  // Registered first, so (hooks run as a stack) the master targets stop before their volumes go.
  const smallVolume = useSmallVolumes();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
  });

  it('prunes oldest first when a pre-image write fails with ENOSPC, keeps applying, and never leaves a torn segment', async () => {
    const dir = tmp();
    const retentionDir = smallVolume('2m');
    const setup = retentionSetup(dir, retentionDir);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(99);
    const images = new Map<number, Buffer>();
    const logs = [];
    // Pre-images of never-written ranges are holes taking no space, so the
    // logs overwrite enough earlier data for real pre-images to fill 2 MiB.
    for (let seq = 1; seq <= 12; seq++) {
      logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: Date.now() - (60 - seq) * 60_000, writes: 100 }, model, rand));
      images.set(seq, Buffer.from(model));
    }
    // The probe overstates free space, so the hooks' own estimate never
    // prunes ahead and every shortage shows up as a real ENOSPC mid-write.
    const lying = { ...systemVolumeProbe, capacity: () => ({ totalBytes: 2 ** 40, availableBytes: 2 ** 40 }) };
    const { mt } = await startMasterTarget(setup, { probe: lying, reserveBytes: 0 });
    running.push(mt);
    await sendAll(mt, logs);
    await mt.drain();

    const status = mt.diskStatus()[0]!;
    expect(status.appliedSeq).toBe(12);
    expect(status.reasons.join('\n')).toContain('BR_RETENTION_VOLUME_FULL');
    expect(fs.readFileSync(setup.targetSpec('disk0').slice(4)).equals(model)).toBe(true);
    const journalDir = path.join(retentionDir, 'disk0', 'journal');
    expect(fs.readdirSync(journalDir).filter((n) => n.endsWith('.tmp'))).toEqual([]);
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.length).toBeGreaterThanOrEqual(2);
    expect(points.length).toBeLessThan(12);
    expect(points.at(-1)!.seq).toBe(12);
    for (const p of points) {
      const out = path.join(dir, `p${p.seq}.img`);
      await failover({ retentionDir, diskId: 'disk0', point: p.id, out: `raw:${out}` });
      expect(fs.readFileSync(out).equals(images.get(p.seq)!), p.id).toBe(true);
    }
  });
  it('takes a catalog append that the full volume takes short as failed, and leaves no half line behind', async () => {
    const dir = smallVolume('64k');
    const catalog = new PointCatalog(path.join(dir, 'points.log'), 'disk0');
    const point = (seq: number): CatalogRecord => ({ v: 1, t: 'point', seq, timeMs: 1_700_000_000_000 + seq * 60_000, kind: 'crash', cutId: `c${seq}` });
    // Lines up to just short of a page: the next one needs a new block.
    let seq = 1;
    while (fs.existsSync(catalog.file) ? fs.statSync(catalog.file).size < 4096 - 160 : true) await catalog.append([point(seq++)]);
    const before = fs.readFileSync(catalog.file);
    expect(before.length).toBeLessThan(4096);
    // Fill the volume to the last byte.
    const filler = fs.openSync(path.join(dir, 'filler'), 'w');
    try {
      for (;;) fs.writeSync(filler, Buffer.alloc(4096));
    } catch (err) {
      expect((err as NodeJS.ErrnoException).code).toBe('ENOSPC');
    } finally {
      fs.closeSync(filler);
    }
    const wide: CatalogRecord = { v: 1, t: 'point', seq, timeMs: 1_700_000_000_000 + seq * 60_000, kind: 'app', name: 'x'.repeat(300), cutId: `c${seq}` };
    await expect(catalog.append([wide])).rejects.toMatchObject({ code: 'BR_DISK_FULL' });
    expect(fs.readFileSync(catalog.file).equals(before)).toBe(true);
    // Room again: the next append follows the last whole line, and every point reads back.
    fs.rmSync(path.join(dir, 'filler'));
    await catalog.append([wide]);
    const read = await catalog.read();
    expect(read.pending?.seq).toBe(seq);
    expect(read.fileBytes).toBe(read.validBytes);
  });
  it('records a failover whose output filled up as unfinished, and commit refuses it', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(7);
    const logs = [];
    for (let seq = 1; seq <= 3; seq++) logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: Date.now() - (10 - seq) * 60_000, writes: 200 }, model, rand));
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    await sendAll(mt, logs);
    await mt.drain();
    // The output's volume holds far less than the disk's data.
    const small = smallVolume('256k');
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-2', out: `vmdk:${path.join(small, 'restore.vmdk')}` })).rejects.toMatchObject({ code: 'BR_DISK_FULL' });
    expect((await retentionUsage(retentionDir)).disks[0]).toMatchObject({ failedOver: false, failoverIncomplete: true });
    await expect(commitFailover(retentionDir, 'disk0')).rejects.toMatchObject({ code: 'BR_POINT_NOT_FAILED_OVER', message: expect.stringContaining('did not finish') });
    expect((await loadPoints(retentionDir, 'disk0')).points.map((p) => p.seq)).toEqual([1, 2, 3]);
    // A failover that finishes makes commit possible again.
    const whole = path.join(dir, 'restore.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-3', out: `raw:${whole}` });
    expect(fs.readFileSync(whole).equals(model)).toBe(true);
    for (const m of running.splice(0)) await m.stop();
    expect(await commitFailover(retentionDir, 'disk0')).toMatchObject({ pointId: 'disk0-3' });
  });
  it('drops the history, saying why, when a resync session\'s pre-images do not fit, and the session\'s writes go on', async () => {
    const dir = tmp();
    const retentionDir = smallVolume('2m');
    const setup = retentionSetup(dir, retentionDir);
    const lying = { ...systemVolumeProbe, capacity: () => ({ totalBytes: 2 ** 40, availableBytes: 2 ** 40 }) };
    const { mt } = await startMasterTarget(setup, { probe: lying, reserveBytes: 0 });
    running.push(mt);
    const rand = prng(77);
    const model = Buffer.alloc(DISK_BYTES);
    const logDir = path.join(dir, 'src');
    for (const seq of [1, 2]) await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq, cutTimeMs: Date.now() - (10 - seq) * 60_000, writes: 300, region: { offset: 0, length: 3 << 20 } }, model, rand)]);
    await mt.drain();
    expect((await loadPoints(retentionDir, 'disk0')).points.length).toBeGreaterThan(0);
    const target = await openDisk(setup.targetSpec('disk0'));
    // The provider is one per hooks: asked again, it is the master target's own.
    const hop = mt as unknown as { options: { hooks: ApplyHooks }; resyncJournal: unknown };
    const provider = resyncJournalFor(hop.options.hooks)!;
    expect(provider).toBe(hop.resyncJournal);
    const session = (await provider.openSession('disk0', target, 2, 'f'.repeat(32)))!;
    // 3 MiB of written data to preserve on a 2 MiB volume.
    for (let at = 0; at < 3 << 20; at += 256 * 1024) {
      await session.preserve(target, at, 256 * 1024);
      await target.write(at, Buffer.alloc(256 * 1024, 0xee));
      Buffer.alloc(256 * 1024, 0xee).copy(model, at);
    }
    await target.flush();
    await session.finish(target);
    await target.close();
    const journalDir = path.join(retentionDir, 'disk0', 'journal');
    expect(fs.readdirSync(journalDir).filter((n) => n.startsWith('resync-'))).toEqual([]);
    expect((await loadPoints(retentionDir, 'disk0')).points).toEqual([]);
    // History starts again with the next log, whose point rebuilds exactly.
    await sendAll(mt, [await makePatternLog(logDir, 'disk0', { seq: 3, cutTimeMs: Date.now() - 60_000, writes: 20 }, model, rand)]);
    await mt.drain();
    expect(fs.readFileSync(setup.targetSpec('disk0').slice(4)).equals(model)).toBe(true);
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => p.seq)).toEqual([3]);
    const out = path.join(dir, 'p3.img');
    await failover({ retentionDir, diskId: 'disk0', point: points[0]!.id, out: `raw:${out}` });
    expect(fs.readFileSync(out).equals(model)).toBe(true);
  }, 60_000);
});
