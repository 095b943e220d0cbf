import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET } from './transport-fixture';

/**
 * Session 6, C1's note: the master target's apply let a resync log pass a
 * gap without looking at `follows`; only the ledger's admission kept the
 * spool in order. The apply now checks it too.
 */
describe('the master target applying a resync log', () => {
  const tmp = useTempDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const m of running.splice(0)) await m.stop();
  });

  it('does not apply it while the log it follows is not applied, even when the ledger admitted it', async () => {
    const dir = tmp();
    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 't.img')}` }] }), hrlLogOps, { ...quiet(), retryPolicy: { ...FAST_RETRY, maxRetries: 1_000_000 } });
    await mt.start();
    running.push(mt);
    const peer = { url: mt.url, secret: SECRET };
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(51);
    const src = path.join(dir, 'src');
    const log1 = await makeLog(src, 'disk0', 1, model, rand);
    await sendLog(peer, log1.envelope, log1.file);
    await mt.drain();
    const afterLog1 = Buffer.from(model);
    // The ledger went ahead of the spool: it counts log 2 as accepted, but no spool holds it.
    mt.ledger.get('disk0').nextSeq = 3;
    await makeLog(src, 'disk0', 2, model, rand);
    const log3 = await makeLog(src, 'disk0', 3, model, rand);
    expect(await sendLog(peer, { ...log3.envelope, resync: true, follows: 2 }, log3.file)).toMatchObject({ status: 201, duplicate: false });
    let status = mt.diskStatus()[0]!;
    for (let i = 0; i < 400 && !status.recentErrors.some((e) => e.code === 'BR_SEQ_GAP'); i++) {
      await new Promise((r) => setTimeout(r, 10));
      status = mt.diskStatus()[0]!;
    }
    expect(status.recentErrors.find((e) => e.code === 'BR_SEQ_GAP')?.message).toMatch(/resync log 3 follows log 2, but only logs up to 1 are applied/);
    expect(status).toMatchObject({ appliedSeq: 1, pendingLogs: 1 });
    expect(fs.readFileSync(path.join(dir, 't.img')).equals(afterLog1), 'the target still holds log 1 only').toBe(true);
  });
});
