import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET, type WrittenLog } from './transport-fixture';

/**
 * The receiver's half of review s5's R15: a resync log names the sequence
 * it follows, and a master target admits it past a gap only once it has
 * everything up to that one. Before, a resync log was admitted past any
 * gap, and the log it overtook was then answered "200 duplicate" and lost.
 */
describe('a resync log at the master target, with the sequence it follows', () => {
  const tmp = useTempDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const m of running.splice(0)) await m.stop();
  });

  async function startMt(dir: string): Promise<ApplyingHop> {
    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 't.img')}` }] }), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    running.push(mt);
    return mt;
  }
  const send = (mt: ApplyingHop, l: WrittenLog) => sendLog({ url: mt.url, secret: SECRET }, l.envelope, l.file);
  const asResync = (l: WrittenLog, follows: number): WrittenLog => ({ ...l, envelope: { ...l.envelope, resync: true, follows } });

  it('refuses a resync log that overtakes the log it follows as a gap, then applies both in order', async () => {
    const dir = tmp();
    const mt = await startMt(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(21);
    for (const seq of [1, 2]) await send(mt, await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand));
    const log3 = await makeLog(path.join(dir, 'src'), 'disk0', 3, model, rand);
    const log4 = asResync(await makeLog(path.join(dir, 'src'), 'disk0', 4, model, rand), 3);
    await expect(send(mt, log4)).rejects.toMatchObject({ code: 'BR_SEQ_GAP', details: { expectedSeq: 3 } });
    expect(await send(mt, log3)).toEqual({ status: 201, duplicate: false });
    expect(await send(mt, log4)).toEqual({ status: 201, duplicate: false });
    await mt.drain();
    expect(mt.ledger.get('disk0').appliedSeq).toBe(4);
    expect(fs.readFileSync(path.join(dir, 't.img')).equals(model), 'target equals the model after logs 1-4').toBe(true);
  });

  it('admits a resync log past the logs the source folded, across a restart of the master target', async () => {
    const dir = tmp();
    let mt = await startMt(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(22);
    await send(mt, await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand));
    // Logs 2 and 3 were folded at the source: their writes are part of log 4's resync data, so
    // the model takes them and log 4 (written after) overwrites where it overlaps.
    const folded2 = await makeLog(path.join(dir, 'src'), 'disk0', 2, Buffer.from(model), rand);
    const folded3 = await makeLog(path.join(dir, 'src'), 'disk0', 3, Buffer.from(model), rand);
    expect(await send(mt, asResync(await makeLog(path.join(dir, 'src'), 'disk0', 4, model, rand), 1))).toEqual({ status: 201, duplicate: false });
    await mt.drain();
    await mt.stop();
    running.splice(0);
    mt = await startMt(dir);
    // The ledger kept the skipped range: a folded log sent late is a duplicate, not applied.
    expect(await send(mt, folded3)).toEqual({ status: 200, duplicate: true });
    expect(await send(mt, folded2)).toEqual({ status: 200, duplicate: true });
    await send(mt, await makeLog(path.join(dir, 'src'), 'disk0', 5, model, rand));
    await mt.drain();
    expect(mt.ledger.get('disk0')).toMatchObject({ appliedSeq: 5, skipped: [[2, 3]] });
    expect(fs.readFileSync(path.join(dir, 't.img')).equals(model), 'target equals the model after 1, 4, 5').toBe(true);
  });

  it('keeps refusing an overtaking resync log across a restart, and answers an unknown older log with BR_SEQ_UNKNOWN', async () => {
    const dir = tmp();
    let mt = await startMt(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(23);
    for (const seq of [1, 2]) await send(mt, await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand));
    const log3 = await makeLog(path.join(dir, 'src'), 'disk0', 3, model, rand);
    const log5 = asResync(await makeLog(path.join(dir, 'src'), 'disk0', 5, Buffer.from(model), rand), 4);
    await expect(send(mt, log5)).rejects.toMatchObject({ code: 'BR_SEQ_GAP', details: { expectedSeq: 3 } });
    await mt.stop();
    running.splice(0);
    mt = await startMt(dir);
    await expect(send(mt, log5)).rejects.toMatchObject({ code: 'BR_SEQ_GAP', details: { expectedSeq: 3 } });
    await send(mt, log3);
    await mt.drain();
    // A log 4 never accepted nor skipped, below nextSeq, is refused rather than called a duplicate.
    mt.ledger.get('disk0').nextSeq = 6;
    const log4 = await makeLog(path.join(dir, 'src'), 'disk0', 4, Buffer.from(model), rand);
    await expect(send(mt, log4)).rejects.toMatchObject({ code: 'BR_SEQ_UNKNOWN' });
    expect(fs.readFileSync(path.join(dir, 't.img')).equals(model), 'target equals the model after logs 1-3').toBe(true);
  });
});
