import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { systemClock } from '../../src/platform/clock';
import { DiskHealth } from '../../src/retry/health';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { LogShipper, type ShippableLog } from '../../src/transport/log-shipper';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET } from './transport-fixture';

/**
 * A source's resync log carries the sequence it follows on the wire
 * (review s6's V6: the shipper built the envelope field by field and left
 * it out, so receivers kept admitting resync logs past any gap).
 */
describe('the log shipper sends a resync log with the sequence it follows', () => {
  const tmp = useTempDirs();
  const stops: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const stop of stops.splice(0).reverse()) await stop();
  });

  it('so a resync log that overtakes its predecessor waits for it instead of being applied first', async () => {
    const dir = tmp();
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 't.img')}` }] });
    const mt: ApplyingHop = masterTargetFromConfig(config, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    stops.push(() => mt.stop());
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(31);
    const src = path.join(dir, 'src');
    const log1 = await makeLog(src, 'disk0', 1, model, rand);
    const log2 = await makeLog(src, 'disk0', 2, model, rand);
    const log3 = await makeLog(src, 'disk0', 3, model, rand);
    await sendLog({ url: mt.url, secret: SECRET }, log1.envelope, log1.file);
    // The source's list holds only resync log 3, which follows log 2: log 2
    // is still on its way by another path (a retry, another connection).
    const remaining = new Map<number, ShippableLog>([[3, { seq: 3, file: log3.file, cutTimeMs: log3.envelope.cutTimeMs, cutId: log3.envelope.cutId, resync: true, follows: 2 }]]);
    const acknowledged: number[] = [];
    const shipper = new LogShipper(
      {
        diskId: 'disk0',
        diskSizeBytes: DISK_SIZE,
        sealedLogs: async () => [...remaining.values()],
        acknowledge: async (seq) => {
          acknowledged.push(seq);
          remaining.delete(seq);
        },
      },
      { peer: { url: mt.url, secret: SECRET }, clock: systemClock, ...quiet(), health: new DiskHealth('disk0'), retryPolicy: FAST_RETRY },
    );
    shipper.start();
    stops.push(() => shipper.stop());
    // Refused as a gap while log 2 is missing (retried, not Critical).
    await new Promise((r) => setTimeout(r, 300));
    expect(acknowledged).toEqual([]);
    expect(mt.ledger.get('disk0').nextSeq).toBe(2);
    await sendLog({ url: mt.url, secret: SECRET }, log2.envelope, log2.file);
    await shipper.whenIdle();
    expect(acknowledged).toEqual([3]);
    await mt.drain();
    expect(mt.ledger.get('disk0').appliedSeq).toBe(3);
    expect(fs.readFileSync(path.join(dir, 't.img')).equals(model), 'target equals the model after logs 1-3 in order').toBe(true);
  });
});
