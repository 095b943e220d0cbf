import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { SimulatedClock } from '../../src/platform/clock';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { DiskHealth, HEALTH_DEFAULTS } from '../../src/retry/health';
import type { DiskTarget } from '../../src/targets/disk-target';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import type { LogOps } from '../../src/transport/log-ops';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, MT_SECRET, prng, quiet, SECRET } from './transport-fixture';

/** [MS-HRL] log ops whose apply of chosen logs waits for `release()`, as a target that stopped answering. */
function gatedOps(hungSeqs: Set<number>) {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => {
    release = resolve;
  });
  let started!: () => void;
  const hung = new Promise<void>((resolve) => {
    started = resolve;
  });
  const ops: LogOps = {
    ...hrlLogOps,
    async apply(file: string, target: DiskTarget) {
      const seq = Number(/(\d{20})\.hrl/.exec(file)?.[1]);
      if (hungSeqs.has(seq)) {
        started();
        await gate;
      }
      return hrlLogOps.apply(file, target);
    },
  };
  return { ops, hung, release };
}

/** The in-hand gauge of `disk` at `stage`, after a status read refreshed it (as GET /metrics does). */
async function gauge(hop: ApplyingHop, metrics: ReturnType<typeof quiet>['metrics'], disk: string, stage: string): Promise<number | undefined> {
  hop.diskStatus();
  const values = (await metrics.inHandSeconds.get()).values;
  return values.find((v) => v.labels.disk === disk && v.labels.stage === stage)?.value;
}

describe('DiskHealth.reportInHand', () => {
  it('warns APPLY_STALLED with the seconds once one log runs past the bound, never Critical, and clears when it ends', () => {
    const health = new DiskHealth('disk0', HEALTH_DEFAULTS.rpoThresholdMs, 60_000);
    health.reportInHand('apply', 'log 7', 60_000, 1000);
    expect(health.state).toBe('OK');
    health.reportInHand('apply', 'log 7', 61_400, 2000);
    expect(health.state).toBe('Warning');
    expect(health.reasons).toEqual([{ code: 'APPLY_STALLED', message: 'apply of log 7 running for 61 s, over the 60 s bound', sinceMs: 2000, critical: false }]);
    health.reportInHand('apply', 'log 7', 90_000, 3000);
    expect(health.reasons[0]).toMatchObject({ message: 'apply of log 7 running for 90 s, over the 60 s bound', sinceMs: 2000 });
    health.reportInHand('apply', undefined, undefined, 4000);
    expect(health.state).toBe('OK');
  });
});

describe('a stalled apply or forward', () => {
  const tmp = useTempDirs();
  const running: Array<{ stop(): Promise<void> }> = [];
  afterEach(async () => {
    for (const r of running.splice(0).reverse()) await r.stop();
  });

  it('shows at the master target as APPLY_STALLED in /v1/status and the in-hand gauge after applyStallSeconds, and clears once the apply ends', async () => {
    const dir = tmp();
    const clock = new SimulatedClock(Date.now());
    const { ops, hung, release } = gatedOps(new Set([2]));
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, applyStallSeconds: 30, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
    expect(config.applyStallSeconds).toBe(30);
    const q = quiet();
    const mt = masterTargetFromConfig(config, ops, { ...q, retryPolicy: FAST_RETRY, clock });
    await mt.start();
    running.push(mt);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(61);
    const peer = { url: mt.url, secret: SECRET };
    const log1 = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand);
    expect((await sendLog(peer, log1.envelope, log1.file)).status).toBe(201);
    const log2 = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand);
    const answer = sendLog(peer, log2.envelope, log2.file);
    await hung;

    await clock.advance(30_000);
    let disk = mt.diskStatus()[0]!;
    expect(disk).toMatchObject({ health: 'OK', state: 'busy', appliedSeq: 1 });
    expect(await gauge(mt, q.metrics, 'disk0', 'apply')).toBe(30);

    await clock.advance(1_000);
    disk = mt.diskStatus()[0]!;
    expect(disk.health).toBe('Warning');
    expect(disk.reasons).toEqual(['APPLY_STALLED: apply of log 2 running for 31 s, over the 30 s bound']);
    expect(await gauge(mt, q.metrics, 'disk0', 'apply')).toBe(31);
    const res = await fetch(`${mt.url}/v1/status`);
    expect(JSON.stringify(await res.json())).toContain('APPLY_STALLED');

    release();
    expect((await answer).status).toBe(201);
    disk = mt.diskStatus()[0]!;
    expect(disk).toMatchObject({ health: 'OK', appliedSeq: 2, reasons: [] });
    expect(await gauge(mt, q.metrics, 'disk0', 'apply')).toBe(0);
  });

  it('shows at the process server as APPLY_STALLED on the forward while the master target does not answer', async () => {
    const dir = tmp();
    const { ops, hung, release } = gatedOps(new Set([2]));
    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] }), ops, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    running.push(mt);
    const clock = new SimulatedClock(Date.now());
    const q = quiet();
    const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: mt.url, secret: MT_SECRET, timeoutSeconds: 60 } }), hrlLogOps, { ...q, retryPolicy: FAST_RETRY, clock });
    await ps.start();
    running.push(ps);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(62);
    const peer = { url: ps.url, secret: SECRET };
    for (let seq = 1; seq <= 2; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
      expect((await sendLog(peer, log.envelope, log.file)).status).toBe(201);
    }
    await hung;
    await clock.advance(HEALTH_DEFAULTS.applyStallMs + 5_000);
    const disk = ps.diskStatus().find((d) => d.diskId === 'disk0')!;
    expect(disk.health).toBe('Warning');
    expect(disk.reasons).toEqual(['APPLY_STALLED: forward of log 2 running for 65 s, over the 60 s bound']);
    expect(await gauge(ps, q.metrics, 'disk0', 'forward')).toBe(65);
    release();
    await ps.drain();
    expect(ps.diskStatus().find((d) => d.diskId === 'disk0')).toMatchObject({ health: 'OK', reasons: [] });
  });

  it('refuses an applyStallSeconds below 1 when the config is validated', () => {
    expect(() => validateConfig({ stateDir: '/x', secret: SECRET, applyStallSeconds: 0 })).toThrow(BlockrelayError);
    expect(validateConfig({ stateDir: '/x', secret: SECRET }).applyStallSeconds).toBe(60);
  });
});
