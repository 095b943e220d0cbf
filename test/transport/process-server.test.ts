import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { SimulatedClock, systemClock } from '../../src/platform/clock';
import { BandwidthLimiter } from '../../src/transport/bandwidth-limiter';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { withRetry } from '../../src/retry/retry-policy';
import { FaultProxy } from '../helpers/fault-proxy';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET } from './transport-fixture';

const MT_SECRET = 'master-target-secret-123';

describe('process server', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  async function pipelineOf(dir: string, options: { proxy?: boolean; spoolMaxBytes?: number; bandwidth?: number } = {}) {
    const mtConfig = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
    const mt = masterTargetFromConfig(mtConfig, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    cleanup.push(() => mt.stop());
    let forwardUrl = mt.url;
    let proxy: FaultProxy | undefined;
    if (options.proxy) {
      proxy = new FaultProxy(Number(new URL(mt.url).port));
      await proxy.listen();
      cleanup.push(() => proxy!.close());
      forwardUrl = proxy.url;
    }
    const psConfig = validateConfig({
      stateDir: path.join(dir, 'ps'),
      listen: '127.0.0.1:0',
      secret: SECRET,
      cache: { dir: path.join(dir, 'cache'), maxBytes: options.spoolMaxBytes ?? 1024 ** 3 },
      forward: { url: forwardUrl, secret: MT_SECRET, bandwidthBytesPerSecond: options.bandwidth ?? 0, timeoutSeconds: 1 },
    });
    // Retries never run out here: a link kept down while a test fills the
    // spool (seconds on a loaded machine) must not exhaust FAST_RETRY's 50
    // retries and stop the disk in Critical.
    const ps = processServerFromConfig(psConfig, hrlLogOps, { ...quiet(), retryPolicy: { ...FAST_RETRY, maxRetries: 1_000_000 } });
    await ps.start();
    cleanup.push(() => ps.stop());
    return { mt, ps, proxy };
  }

  it('forwards logs in order, lz4-compressed, and the target converges', async () => {
    const dir = tmp();
    const { mt, ps } = await pipelineOf(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(7);
    for (let seq = 1; seq <= 5; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
      expect((await sendLog({ url: ps.url, secret: SECRET }, log.envelope, log.file)).status).toBe(201);
    }
    await ps.drain();
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    expect(ps.spool.bytesUsed).toBe(0);
  });

  it('converges through a link that resets, stalls and drops connections, losing and duplicating nothing', async () => {
    const dir = tmp();
    const { mt, ps, proxy } = await pipelineOf(dir, { proxy: true });
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(11);
    const modes = [{ kind: 'reset-after', bytes: 5000 }, { kind: 'drop' }, { kind: 'stall' }, { kind: 'pass' }] as const;
    for (let seq = 1; seq <= 8; seq++) {
      proxy!.mode = modes[seq % modes.length]!;
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand, 30);
      // The source side uses the same retry policy against the process server.
      const { result } = withRetry(() => sendLog({ url: ps.url, secret: SECRET }, log.envelope, log.file), { clock: systemClock, policy: FAST_RETRY });
      await result;
      await new Promise((r) => setTimeout(r, 30));
      if (proxy!.mode.kind === 'stall') {
        // Stalled connections time out on their own in production (60 s);
        // here the link heals and the forwarder's retry goes through.
        await new Promise((r) => setTimeout(r, 1200));
      }
      proxy!.mode = { kind: 'pass' };
    }
    proxy!.mode = { kind: 'pass' };
    await ps.drain();
    await mt.drain();
    expect(ps.diskStatus().map((d) => d.health)).toEqual(['OK']);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    const mtStatus = mt.diskStatus()[0]!;
    expect(mtStatus.appliedSeq).toBe(8);
    // The faults really happened: the forwarder saw network errors and retried.
    const seen = ps.diskStatus()[0]!.recentErrors.map((e) => e.code);
    expect(seen.length).toBeGreaterThan(2);
    expect(seen.every((c) => c === 'BR_NET_UNREACHABLE' || c === 'BR_NET_TIMEOUT' || c === 'BR_UPLOAD_INCOMPLETE')).toBe(true);
  }, 120_000);

  it('refuses uploads with BR_SPOOL_FULL when the spool reaches its bound, and accepts again once drained', async () => {
    const dir = tmp();
    const { ps, proxy } = await pipelineOf(dir, { proxy: true, spoolMaxBytes: 64 * 1024 * 1024 });
    proxy!.mode = { kind: 'drop' };
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(5);
    let seq = 1;
    let refused: unknown;
    for (; seq < 200; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand, 100);
      try {
        await sendLog({ url: ps.url, secret: SECRET }, log.envelope, log.file);
      } catch (err) {
        refused = err;
        break;
      }
    }
    expect(refused).toMatchObject({ code: 'BR_SPOOL_FULL', recoverable: true });
    expect(ps.spool.bytesUsed).toBeLessThanOrEqual(64 * 1024 * 1024);
    proxy!.mode = { kind: 'pass' };
    await ps.drain();
    expect(ps.spool.bytesUsed).toBe(0);
  }, 120_000);

  it('paces a link to its bandwidth limit (simulated clock)', async () => {
    const clock = new SimulatedClock(0);
    const limiter = new BandwidthLimiter(1_000_000, clock);
    let done = false;
    const p = (async () => {
      for (let i = 0; i < 10; i++) await limiter.take(500_000);
      done = true;
    })();
    // One second of burst is available at once, then 1 MB per second.
    await clock.advance(3_900);
    expect(done).toBe(false);
    await clock.advance(200);
    await p;
    expect(done).toBe(true);
  });
});
