import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET, type WrittenLog } from './transport-fixture';

const MT_SECRET = 'master-target-secret-123';

/**
 * The process server turns a master target's BR_SEQ_GAP on a forward into
 * Critical (process-server.ts forwardOne). A resync log that names the log
 * it follows never gets there while the master target keeps its state: the
 * forward sends it alone, after everything before it was answered. Only a
 * master target whose state went back refuses it, and then nothing can
 * send what it lost.
 */
describe('a process server forwarding a resync log that follows folded logs', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  async function startMt(dir: string, listen = '127.0.0.1:0'): Promise<ApplyingHop> {
    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen, secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] }), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    return mt;
  }

  async function startPs(dir: string, mtUrl: string) {
    const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: mtUrl, secret: MT_SECRET } }), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await ps.start();
    cleanup.push(() => ps.stop());
    return ps;
  }

  const asResync = (l: WrittenLog, follows: number): WrittenLog => ({ ...l, envelope: { ...l.envelope, resync: true, follows } });

  it('goes on to the master target and is applied, the disk staying OK', async () => {
    const dir = tmp();
    const mt = await startMt(dir);
    cleanup.push(() => mt.stop());
    const ps = await startPs(dir, mt.url);
    const peer = { url: ps.url, secret: SECRET };
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(41);
    const src = path.join(dir, 'src');
    for (const seq of [1, 2]) {
      const log = await makeLog(src, 'disk0', seq, model, rand);
      await sendLog(peer, log.envelope, log.file);
    }
    // Logs 3 and 4 were folded at the source (their writes are part of resync log 5's data): never sent.
    await makeLog(src, 'disk0', 3, Buffer.from(model), rand);
    await makeLog(src, 'disk0', 4, Buffer.from(model), rand);
    const resync = asResync(await makeLog(src, 'disk0', 5, model, rand), 2);
    expect(await sendLog(peer, resync.envelope, resync.file)).toMatchObject({ status: 201 });
    const last = await makeLog(src, 'disk0', 6, model, rand);
    await sendLog(peer, last.envelope, last.file);
    await ps.drain();
    await mt.drain();
    expect(ps.diskStatus()[0]).toMatchObject({ health: 'OK', pendingLogs: 0 });
    expect(mt.ledger.get('disk0')).toMatchObject({ appliedSeq: 6, skipped: [[3, 4]] });
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model), 'target equals the model after 1, 2, 5, 6').toBe(true);
  });

  it('makes the disk Critical when the master target lost the log it follows, which the process server no longer holds', async () => {
    const dir = tmp();
    let mt = await startMt(dir);
    const listen = `127.0.0.1:${new URL(mt.url).port}`;
    const ps = await startPs(dir, mt.url);
    cleanup.push(() => mt.stop());
    const peer = { url: ps.url, secret: SECRET };
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(42);
    const src = path.join(dir, 'src');
    const log1 = await makeLog(src, 'disk0', 1, model, rand);
    await sendLog(peer, log1.envelope, log1.file);
    await ps.drain();
    await mt.drain();
    await mt.stop();
    // The master target's state as it was after log 1, restored after log 2 went through.
    fs.cpSync(path.join(dir, 'mt'), path.join(dir, 'mt-after-1'), { recursive: true });
    mt = await startMt(dir, listen);
    const log2 = await makeLog(src, 'disk0', 2, model, rand);
    await sendLog(peer, log2.envelope, log2.file);
    await ps.drain();
    await mt.drain();
    await mt.stop();
    fs.rmSync(path.join(dir, 'mt'), { recursive: true });
    fs.renameSync(path.join(dir, 'mt-after-1'), path.join(dir, 'mt'));
    mt = await startMt(dir, listen);
    const resync = asResync(await makeLog(src, 'disk0', 3, model, rand), 2);
    await sendLog(peer, resync.envelope, resync.file);
    for (let i = 0; i < 400 && ps.diskStatus()[0]?.health !== 'Critical'; i++) await new Promise((r) => setTimeout(r, 10));
    const status = ps.diskStatus()[0]!;
    expect(status.health).toBe('Critical');
    expect(status.reasons.join('\n')).toMatch(/BR_DISK_CRITICAL: master target expects log 2 of disk disk0/);
    expect(mt.ledger.get('disk0').nextSeq).toBe(2);
  });
});
