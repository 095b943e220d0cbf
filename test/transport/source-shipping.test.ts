import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { systemClock } from '../../src/platform/clock';
import { DiskHealth } from '../../src/retry/health';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { LogShipper } from '../../src/transport/log-shipper';
import { masterTargetFromConfig } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { trackerShippingSource } from '../../src/transport/tracker-shipping';
import { useTempDirs } from '../helpers/tmp';
import { FAST_RETRY, prng, quiet, SECRET } from './transport-fixture';

const MT_SECRET = 'master-target-secret-123';
const SIZE = 16 * 1024 * 1024;

describe('source -> process server -> master target', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it('ships tracked writes cut by cut; the target equals the source and acknowledged logs are deleted', async () => {
    const dir = tmp();
    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] }), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    cleanup.push(() => mt.stop());
    const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: mt.url, secret: MT_SECRET } }), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await ps.start();
    cleanup.push(() => ps.stop());

    const tracker = await ChangeTracker.open({ dir: path.join(dir, 'logs'), diskId: 'disk0', diskSizeBytes: SIZE, persistIntervalMs: 0 });
    cleanup.push(() => tracker.close());
    const shipper = new LogShipper(trackerShippingSource(tracker), { peer: { url: ps.url, secret: SECRET }, clock: systemClock, ...quiet(), health: new DiskHealth('disk0'), retryPolicy: FAST_RETRY });
    shipper.start();
    cleanup.push(() => shipper.stop());

    const model = Buffer.alloc(SIZE);
    const rand = prng(42);
    for (let cut = 0; cut < 5; cut++) {
      for (let i = 0; i < 40; i++) {
        const len = (1 + Math.floor(rand() * 16)) * 512;
        const off = Math.floor(rand() * ((SIZE - len) / 512)) * 512;
        const data = Buffer.alloc(len, Math.floor(rand() * 256));
        await tracker.recordWrite(off, data);
        data.copy(model, off);
      }
      await ChangeTracker.cut([tracker]);
      shipper.wake();
    }
    await shipper.whenIdle();
    await ps.drain();
    await mt.drain();
    expect(tracker.sealedLogs()).toEqual([]);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    expect(mt.diskStatus()[0]).toMatchObject({ health: 'OK', pendingLogs: 0 });
  });
});
