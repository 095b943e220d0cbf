import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { commitFailover, failover, loadPoints, resolveGroupPoint } from '../../src/retention/failover';
import { diskRetentionPaths, undoFileName } from '../../src/retention/retention-format';
import { writeManifest } from '../../src/retention/retention-manifest';
import { DiskHistory } from '../../src/retention/retention-pruner';
import { LogSpool } from '../../src/transport/log-spool';
import type { ApplyingHop } from '../../src/transport/master-target';
import { openDisk } from '../../src/targets/disk-spec';
import { runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, startMasterTarget, useRetentionDirs, type LogSpec } from './retention-fixture';

const MINUTE_MS = 60_000;

describe('failover to recovery points', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
  });

  /** Six logs through a real master target: points 2 and 5 app-consistent. Returns the image after each. */
  async function replicate(dir: string, retentionDir: string) {
    const setup = retentionSetup(dir, retentionDir);
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(42);
    const baseMs = Date.now() - 3 * 60 * MINUTE_MS;
    const specs: LogSpec[] = [1, 2, 3, 4, 5, 6].map((seq) => ({ seq, cutTimeMs: baseMs + seq * 10 * MINUTE_MS, ...(seq === 2 ? { appTag: 'nightly' } : seq === 5 ? { appTag: '' } : {}) }));
    const images = new Map<number, Buffer>();
    const logs = [];
    for (const spec of specs) {
      logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', spec, model, rand));
      images.set(spec.seq, Buffer.from(model));
    }
    await sendAll(mt, logs);
    await mt.drain();
    return { setup, mt, model, rand, baseMs, images, specs };
  }

  function readRaw(spec: string): Buffer {
    return fs.readFileSync(spec.replace(/^raw:/, ''));
  }

  it('rebuilds every point, latest-processed, latest-app and a time between points byte for byte', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const { images, baseMs, setup } = await replicate(dir, retentionDir);
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => [p.id, p.kind, p.name])).toEqual([
      ['disk0-1', 'crash', undefined],
      ['disk0-2', 'app', 'nightly'],
      ['disk0-3', 'crash', undefined],
      ['disk0-4', 'crash', undefined],
      ['disk0-5', 'app', undefined],
      ['disk0-6', 'crash', undefined],
    ]);
    // The target holds the newest point.
    expect(readRaw(setup.targetSpec('disk0')).equals(images.get(6)!)).toBe(true);
    for (const p of points) {
      const out = `raw:${path.join(dir, `out-${p.seq}.img`)}`;
      const result = await failover({ retentionDir, diskId: 'disk0', point: p.id, out });
      expect(result.point.seq).toBe(p.seq);
      expect(result.journalSegments).toBe(6 - p.seq);
      expect(readRaw(out).equals(images.get(p.seq)!), `point ${p.id}`).toBe(true);
    }
    const named: Array<[string, number]> = [
      ['latest-processed', 6],
      ['latest-app', 5],
      [new Date(baseMs + 35 * MINUTE_MS).toISOString(), 3],
      [new Date(baseMs + 20 * MINUTE_MS).toISOString(), 2],
      ['cut-4', 4],
    ];
    for (const [spec, seq] of named) {
      const out = `raw:${path.join(dir, `named-${seq}-${named.findIndex((n) => n[0] === spec)}.img`)}`;
      const result = await failover({ retentionDir, diskId: 'disk0', point: spec, out });
      expect(result.point.seq, spec).toBe(seq);
      expect(readRaw(out).equals(images.get(seq)!), spec).toBe(true);
    }
  });

  it('drains pending inbox logs before failing over to latest', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const { setup, mt, model, rand, baseMs } = await replicate(dir, retentionDir);
    await mt.stop();
    running.splice(running.indexOf(mt), 1);
    // Two logs reach the inbox but are not applied (the master target is down).
    const spool = new LogSpool(path.join(setup.config.stateDir, 'inbox'), 1 << 30);
    await spool.open();
    for (const seq of [7, 8]) {
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: baseMs + seq * 10 * MINUTE_MS }, model, rand);
      await spool.receive(log.envelope, fs.createReadStream(log.file), { lz4: false, verify: async () => undefined });
    }
    const before = await loadPoints(retentionDir, 'disk0');
    expect(before.points.at(-1)!.seq).toBe(6);
    const out = `raw:${path.join(dir, 'latest.img')}`;
    const result = await failover({ retentionDir, diskId: 'disk0', point: 'latest', out });
    expect(result.drainedLogs).toBe(2);
    expect(result.point.id).toBe('disk0-8');
    expect(readRaw(out).equals(model)).toBe(true);
    // The drained logs were journaled: point 6 still rebuilds.
    const back = `raw:${path.join(dir, 'back6.img')}`;
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-6', out: back });
    expect((await loadPoints(retentionDir, 'disk0')).points.map((p) => p.seq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
  });

  it('waits for a running master target to apply what it received before failing over to latest', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const { mt, model, rand, baseMs } = await replicate(dir, retentionDir);
    const more = [];
    for (const seq of [7, 8, 9]) more.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: baseMs + seq * 10 * MINUTE_MS, writes: 200 }, model, rand));
    await sendAll(mt, more);
    // The master target holds the state lock, so failover waits for its inbox instead of applying.
    const out = `raw:${path.join(dir, 'latest-live.img')}`;
    const result = await failover({ retentionDir, diskId: 'disk0', point: 'latest', out });
    expect(result.point.id).toBe('disk0-9');
    expect(readRaw(out).equals(model)).toBe(true);
  });

  it('switches a failed-over disk to another point, refuses a foreign output, and commit (once the master target stopped) deletes the points', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const { images } = await replicate(dir, retentionDir);
    const out = `raw:${path.join(dir, 'failed-over.img')}`;
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-2', out });
    expect(readRaw(out).equals(images.get(2)!)).toBe(true);
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-4', out });
    expect(readRaw(out).equals(images.get(4)!)).toBe(true);
    const foreign = path.join(dir, 'foreign.img');
    fs.writeFileSync(foreign, Buffer.alloc(DISK_BYTES, 7));
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-3', out: `raw:${foreign}` })).rejects.toMatchObject({ code: 'BR_POINT_OUT_EXISTS' });
    expect(fs.readFileSync(foreign).every((b) => b === 7)).toBe(true);

    // Not while the master target runs: it holds the history in memory.
    await expect(commitFailover(retentionDir, 'disk0')).rejects.toMatchObject({ code: 'BR_LOCKED' });
    expect((await loadPoints(retentionDir, 'disk0')).points).toHaveLength(6);
    for (const mt of running.splice(0)) await mt.stop();
    const committed = await commitFailover(retentionDir, 'disk0');
    expect(committed).toMatchObject({ pointId: 'disk0-4', pointsDeleted: 6 });
    expect(fs.existsSync(diskRetentionPaths(retentionDir, 'disk0').journalDir)).toBe(false);
    expect((await loadPoints(retentionDir, 'disk0')).points).toEqual([]);
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'latest-processed', out: `raw:${path.join(dir, 'x.img')}` })).rejects.toMatchObject({ code: 'BR_POINT_NONE' });
    await expect(commitFailover(retentionDir, 'disk0')).rejects.toMatchObject({ code: 'BR_POINT_NOT_FAILED_OVER' });
  });

  it('refuses an unknown point, a time before the window and an unknown disk; a corrupt segment is named and newer points still rebuild', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const { images } = await replicate(dir, retentionDir);
    const out = (n: string): string => `raw:${path.join(dir, `${n}.img`)}`;
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-99', out: out('a') })).rejects.toMatchObject({ code: 'BR_POINT_UNKNOWN' });
    await expect(failover({ retentionDir, diskId: 'disk0', point: new Date(Date.now() - 48 * 60 * MINUTE_MS).toISOString(), out: out('b') })).rejects.toMatchObject({ code: 'BR_POINT_BEFORE_WINDOW' });
    await expect(failover({ retentionDir, diskId: 'disk9', point: 'latest-processed', out: out('c') })).rejects.toMatchObject({ code: 'BR_RETENTION_DISK_UNKNOWN' });
    expect(fs.existsSync(path.join(dir, 'a.img'))).toBe(false);

    const segment = path.join(diskRetentionPaths(retentionDir, 'disk0').journalDir, undoFileName(4));
    const bytes = fs.readFileSync(segment);
    bytes[bytes.length - 4096 - 10] ^= 0x5a; // in the last payload before the last metadata block
    fs.writeFileSync(segment, bytes);
    const err = await failover({ retentionDir, diskId: 'disk0', point: 'disk0-2', out: out('d') }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'BR_RETENTION_JOURNAL_CORRUPT', details: { file: segment, seq: 4 } });
    expect((err as Error).message).toContain(segment);
    expect(fs.existsSync(path.join(dir, 'd.img'))).toBe(false);
    for (const seq of [4, 5, 6]) {
      await failover({ retentionDir, diskId: 'disk0', point: `disk0-${seq}`, out: out(`ok${seq}`) });
      expect(readRaw(out(`ok${seq}`)).equals(images.get(seq)!)).toBe(true);
    }
  });

  it('lists points in the DESIGN.md form and fails over to a new VMDK by default through the CLI', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const { images, specs } = await replicate(dir, retentionDir);
    const listed = await runCli(['points', 'list', '--retention', retentionDir, '--disk', 'disk0', '--json']);
    expect(listed.status, listed.stderr).toBe(0);
    const doc = JSON.parse(listed.stdout) as unknown[];
    expect(doc).toEqual(
      specs.map((s) => ({
        id: `disk0-${s.seq}`,
        time: new Date(s.cutTimeMs).toISOString(),
        kind: s.appTag === undefined ? 'crash' : 'app',
        ...(s.appTag ? { name: s.appTag } : {}),
      })),
    );
    const vmdk = path.join(dir, 'restored.vmdk');
    const run = await runCli(['failover', '--retention', retentionDir, '--disk', 'disk0', '--point', 'latest-app', '--out', vmdk]);
    expect(run.status, run.stderr).toBe(0);
    const restored = await openDisk(`vmdk:${vmdk}`, { readOnly: true });
    try {
      expect((await restored.read(0, DISK_BYTES)).equals(images.get(5)!)).toBe(true);
    } finally {
      await restored.close();
    }
    if (requireTool('qemu-img')) {
      const expected = path.join(dir, 'expected5.img');
      fs.writeFileSync(expected, images.get(5)!);
      execFileSync('qemu-img', ['compare', '-f', 'vmdk', '-F', 'raw', vmdk, expected]);
    }
    // Switch the failed-over VMDK to point 2: the same output is overwritten whole.
    const again = await runCli(['failover', '--retention', retentionDir, '--disk', 'disk0', '--point', 'disk0-2', '--out', vmdk, '--json']);
    expect(again.status, again.stderr).toBe(0);
    expect(JSON.parse(again.stdout)).toMatchObject([{ disk: 'disk0', out: `vmdk:${vmdk}`, point: { id: 'disk0-2', kind: 'app', name: 'nightly' } }]);
    const switched = await openDisk(`vmdk:${vmdk}`, { readOnly: true });
    try {
      expect((await switched.read(0, DISK_BYTES)).equals(images.get(2)!)).toBe(true);
    } finally {
      await switched.close();
    }
    const bad = await runCli(['failover', '--retention', retentionDir, '--disk', 'disk0', '--point', 'nope', '--out', path.join(dir, 'n.vmdk')]);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/^BR_POINT_UNKNOWN: /);
  });

  it('refuses to rebuild a point from a target whose size changed', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const { setup } = await replicate(dir, retentionDir);
    for (const mt of running.splice(0)) await mt.stop();
    fs.truncateSync(setup.targetSpec('disk0').slice('raw:'.length), DISK_BYTES - 65536);
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-2', out: `raw:${path.join(dir, 'short.img')}` })).rejects.toMatchObject({ code: 'BR_TARGET_SIZE_MISMATCH' });
    expect(fs.existsSync(path.join(dir, 'short.img'))).toBe(false);
  });

  it('never resolves a group to a cut that is a resync point on one member', async () => {
    const retentionDir = retentionTmp();
    const now = Date.now();
    for (const disk of ['d1', 'd2']) {
      await writeManifest(retentionDir, { version: 1, diskId: disk, targetSpec: `raw:/nonexistent/${disk}.img`, diskSizeBytes: 1 << 20, stateDir: path.join(retentionDir, 'mt'), inboxDir: path.join(retentionDir, 'mt', 'inbox', disk), windowHours: 24, group: 'g' });
      const h = new DiskHistory(retentionDir, disk);
      await h.open(null);
      await h.append([{ v: 1, t: 'point', seq: 1, timeMs: now - 60_000, kind: 'crash', cutId: 'cut-a', group: 'g', applied: true }]);
      // cut-b: d2 is resyncing, so its log of that cut is tainted; d1's is a normal point.
      await h.append([{ v: 1, t: 'point', seq: 2, timeMs: now - 30_000, kind: 'crash', cutId: 'cut-b', group: 'g', applied: true, ...(disk === 'd2' ? { resync: true as const } : {}) }]);
    }
    const latest = await resolveGroupPoint(retentionDir, 'g', 'latest-processed');
    expect(latest.cutId).toBe('cut-a');
    expect([...latest.members.values()].map((p) => p.id)).toEqual(['d1-1', 'd2-1']);
    await expect(resolveGroupPoint(retentionDir, 'g', 'cut-b')).rejects.toMatchObject({ code: 'BR_POINT_NOT_COMMON' });
  });

  it('resolves a group only to a cut common to all members', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir, ['a', 'b']);
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    const models = { a: Buffer.alloc(DISK_BYTES), b: Buffer.alloc(DISK_BYTES) };
    const rand = prng(9);
    const t0 = Date.now() - 60 * MINUTE_MS;
    const logs = [];
    // Cuts 1 and 2 are common; disk a has an extra cut 3 that b lacks.
    for (const [disk, seq, cut] of [['a', 1, 'g1'], ['b', 1, 'g1'], ['a', 2, 'g2'], ['b', 2, 'g2'], ['a', 3, 'g3']] as const) {
      logs.push(await makePatternLog(path.join(dir, 'src'), disk, { seq, cutTimeMs: t0 + seq * MINUTE_MS, cutId: cut, group: 'G' }, models[disk], rand));
    }
    await sendAll(mt, logs);
    await mt.drain();
    const latest = await resolveGroupPoint(retentionDir, 'G', 'latest-processed');
    expect(latest.cutId).toBe('g2');
    expect([...latest.members.entries()].map(([d, p]) => [d, p.id])).toEqual([['a', 'a-2'], ['b', 'b-2']]);
    expect((await resolveGroupPoint(retentionDir, 'G', 'a-1')).cutId).toBe('g1');
    await expect(resolveGroupPoint(retentionDir, 'G', 'a-3')).rejects.toMatchObject({ code: 'BR_POINT_NOT_COMMON' });
    const run = await runCli(['failover', '--retention', retentionDir, '--group', 'G', '--point', 'g1', '--out', `raw:${path.join(dir, 'grp-{disk}.img')}`, '--json']);
    expect(run.status, run.stderr).toBe(0);
    expect((JSON.parse(run.stdout) as Array<{ disk: string }>).map((r) => r.disk)).toEqual(['a', 'b']);
  });
});
