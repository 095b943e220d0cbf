import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { failover, loadPoints } from '../../src/retention/failover';
import type { ApplyingHop } from '../../src/transport/master-target';
import { runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, startMasterTarget, useRetentionDirs } from './retention-fixture';

const MINUTE_MS = 60_000;

describe('resync logs and recovery points', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
  });

  it('journals a resync log but never lists or resolves its end as a point; older points still rebuild', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(5);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const images = new Map<number, Buffer>();
    const logs = [];
    // 1 and 2 ordinary; 3 and 4 folded at the source (never sent); 5 the resync log; 6 ordinary.
    for (const [seq, minutes, resync] of [[1, 0, false], [2, 10, false], [5, 20, true], [6, 30, false]] as const) {
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: baseMs + minutes * MINUTE_MS }, model, rand);
      logs.push(resync ? { ...log, envelope: { ...log.envelope, resync: true } } : log);
      images.set(seq, Buffer.from(model));
    }
    await sendAll(mt, logs);
    await mt.drain();

    // The status page's summary counts the same points and knows the newest.
    expect(mt.diskStatus()[0]!.points).toEqual({ newestCrash: new Date(baseMs + 30 * MINUTE_MS).toISOString(), newestApp: null, count: 3 });
    const listed = JSON.parse((await runCli(['points', 'list', '--retention', retentionDir, '--disk', 'disk0', '--json'])).stdout) as Array<{ id: string }>;
    expect(listed.map((p) => p.id)).toEqual(['disk0-1', 'disk0-2', 'disk0-6']);
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.find((p) => p.seq === 5)?.resync).toBe(true);

    for (const seq of [1, 2, 6]) {
      const out = path.join(dir, `out-${seq}.img`);
      await failover({ retentionDir, diskId: 'disk0', point: `disk0-${seq}`, out: `raw:${out}` });
      expect(fs.readFileSync(out).equals(images.get(seq)!), `point ${seq}`).toBe(true);
    }
    // A time just after the resync log's cut resolves to the point before it.
    const between = path.join(dir, 'between.img');
    const r = await failover({ retentionDir, diskId: 'disk0', point: new Date(baseMs + 25 * MINUTE_MS).toISOString(), out: `raw:${between}` });
    expect(r.point.seq).toBe(2);
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-5', out: `raw:${path.join(dir, 'no.img')}` })).rejects.toMatchObject({ code: 'BR_POINT_UNKNOWN' });
  });
  it('lists no point for a log the source sealed while a resync was owed (tainted), so no failover picks a mixed image', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const { mt } = await startMasterTarget(retentionSetup(dir, retentionDir));
    running.push(mt);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(6);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const images = new Map<number, Buffer>();
    const log = async (seq: number, minutes: number, mark: { resync?: true; tainted?: true; follows?: number } = {}) => {
      const l = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: baseMs + minutes * MINUTE_MS }, model, rand);
      images.set(seq, Buffer.from(model));
      return { ...l, envelope: { ...l.envelope, ...mark } };
    };
    // 1 consistent; 2 and 3 sealed between resync rounds; 4 the last round; 5 after it.
    await sendAll(mt, [await log(1, 0), await log(2, 10, { tainted: true }), await log(3, 20, { tainted: true }), await log(4, 25, { resync: true, follows: 3 })]);
    await mt.drain();
    const listed = async (): Promise<string[]> => (JSON.parse((await runCli(['points', 'list', '--retention', retentionDir, '--disk', 'disk0', '--json'])).stdout) as Array<{ id: string }>).map((p) => p.id);
    expect(await listed()).toEqual(['disk0-1']);
    const latest = await failover({ retentionDir, diskId: 'disk0', point: 'latest-processed', out: `raw:${path.join(dir, 'latest.img')}` });
    expect(latest.point.seq).toBe(1);
    expect(fs.readFileSync(path.join(dir, 'latest.img')).equals(images.get(1)!)).toBe(true);
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-3', out: `raw:${path.join(dir, 'no.img')}` })).rejects.toMatchObject({ code: 'BR_POINT_UNKNOWN' });
    await sendAll(mt, [await log(5, 30)]);
    await mt.drain();
    expect(await listed()).toEqual(['disk0-1', 'disk0-5']);
    const out = path.join(dir, 'p5.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-5', out: `raw:${out}` });
    expect(fs.readFileSync(out).equals(images.get(5)!)).toBe(true);
  });
});
