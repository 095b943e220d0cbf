import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { HttpResyncChannel } from '../../src/resync/http-resync-channel';
import { ResyncPeer } from '../../src/resync/resync-peer';
import { encodeInfoRequest, encodeWriteRequest } from '../../src/resync/resync-wire';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { FaultProxy } from '../helpers/fault-proxy';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, MT_SECRET, prng, quiet, SECRET } from './transport-fixture';

const SESSION_A = 'a'.repeat(32);
const SESSION_B = 'b'.repeat(32);

/** A master target and a process server forwarding to it, with a short resync idle timeout. */
async function startHops(dir: string, idleMs: number) {
  const extra = { ...quiet(), retryPolicy: FAST_RETRY, resyncIdleTimeoutMs: idleMs };
  const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] }), hrlLogOps, extra);
  await mt.start();
  const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: mt.url, secret: MT_SECRET } }), hrlLogOps, extra);
  await ps.start();
  return { mt, ps };
}

function channel(url: string, sessionId: string, options: { secret?: string; attempt?: number; afterSeq?: number; diskId?: string } = {}): HttpResyncChannel {
  return new HttpResyncChannel({ peer: { url, secret: options.secret ?? SECRET }, diskId: options.diskId ?? 'disk0', sessionId, attempt: options.attempt ?? 1, diskSizeBytes: DISK_SIZE, ...(options.afterSeq === undefined ? {} : { afterSeq: options.afterSeq }) });
}

describe('POST /v1/disks/:disk/resync on the process server and master target', () => {
  const tmp = useTempDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const h of running.splice(0).reverse()) await h.stop();
  });

  async function setup(idleMs = 60_000) {
    const dir = tmp();
    const hops = await startHops(dir, idleMs);
    running.push(hops.mt, hops.ps);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(3);
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand);
    await sendLog({ url: hops.ps.url, secret: SECRET }, first.envelope, first.file);
    await hops.ps.drain();
    await hops.mt.drain();
    return { dir, ...hops, model, rand, targetFile: path.join(dir, 'target.img') };
  }

  it('refuses a wrong secret with 401 and changes nothing: no session, no write, the applier not held', async () => {
    const { ps, mt, targetFile } = await setup();
    const before = fs.readFileSync(targetFile);
    const write = encodeWriteRequest([{ offset: 0, data: Buffer.alloc(4096, 0xab) }]);
    await expect(channel(ps.url, SESSION_A, { secret: 'wrong-secret-0123456789' }).exchange(write)).rejects.toMatchObject({ code: 'BR_AUTH_FAILED' });
    const res = await fetch(`${ps.url}/v1/disks/disk0/resync`, { method: 'POST', body: write, headers: { 'x-blockrelay-resync-session': SESSION_A, 'x-blockrelay-resync-attempt': '1', 'x-blockrelay-disk-size-bytes': String(DISK_SIZE) } });
    expect(res.status).toBe(401);
    expect(ps.resyncSessions.active('disk0')).toBeUndefined();
    expect(mt.resyncSessions.active('disk0')).toBeUndefined();
    expect(fs.readFileSync(targetFile).equals(before)).toBe(true);
  });

  it('refuses a bad disk id and a malformed session id with coded 400s', async () => {
    const { ps } = await setup();
    const res = await fetch(`${ps.url}/v1/disks/..%2Fetc/resync`, { method: 'POST', body: encodeInfoRequest(), headers: { authorization: `Bearer ${SECRET}`, 'x-blockrelay-resync-session': SESSION_A, 'x-blockrelay-resync-attempt': '1', 'x-blockrelay-disk-size-bytes': String(DISK_SIZE) } });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('BR_DISK_ID_INVALID');
    const bad = await fetch(`${ps.url}/v1/disks/disk0/resync`, { method: 'POST', body: encodeInfoRequest(), headers: { authorization: `Bearer ${SECRET}`, 'x-blockrelay-resync-session': '../x', 'x-blockrelay-resync-attempt': '1', 'x-blockrelay-disk-size-bytes': String(DISK_SIZE) } });
    expect(bad.status).toBe(400);
    expect(ps.resyncSessions.active('disk0')).toBeUndefined();
  });

  it('answers a second concurrent session with a coded 409 and lets it in once the first ends', async () => {
    const { ps, mt } = await setup();
    const a = new ResyncPeer(channel(ps.url, SESSION_A));
    expect((await a.info()).sizeBytes).toBe(DISK_SIZE);
    expect(ps.resyncSessions.active('disk0')?.sessionId).toBe(SESSION_A);
    expect(mt.resyncSessions.active('disk0')?.sessionId).toBe(SESSION_A);
    // Operators see the session and the held-back points in /v1/status.
    expect(mt.diskStatus()[0]!.resync).toMatchObject({ session: { sessionId: SESSION_A }, inProgress: true });
    expect(ps.diskStatus().find((d) => d.diskId === 'disk0')!.resync).toMatchObject({ session: { sessionId: SESSION_A } });

    await expect(channel(ps.url, SESSION_B).exchange(encodeInfoRequest())).rejects.toMatchObject({ code: 'BR_RESYNC_SESSION_BUSY' });
    const res = await fetch(`${ps.url}/v1/disks/disk0/resync`, { method: 'POST', body: encodeInfoRequest(), headers: { authorization: `Bearer ${SECRET}`, 'x-blockrelay-resync-session': SESSION_B, 'x-blockrelay-resync-attempt': '1', 'x-blockrelay-disk-size-bytes': String(DISK_SIZE) } });
    expect(res.status).toBe(409);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('BR_RESYNC_SESSION_BUSY');

    await channel(ps.url, SESSION_A).end();
    expect(ps.resyncSessions.active('disk0')).toBeUndefined();
    expect(mt.resyncSessions.active('disk0')).toBeUndefined();
    // An ended session is not served again: its late requests are refused, coded.
    await expect(channel(ps.url, SESSION_A).exchange(encodeInfoRequest())).rejects.toMatchObject({ code: 'BR_RESYNC_SESSION_EXPIRED' });
    expect((await new ResyncPeer(channel(ps.url, SESSION_B)).info()).sizeBytes).toBe(DISK_SIZE);
  });

  it('holds the logs after the anchor during a session and applies them after it, in order', async () => {
    const { dir, ps, mt, model, rand, targetFile } = await setup();
    const peer = new ResyncPeer(channel(ps.url, SESSION_A, { afterSeq: 1 }));
    await peer.info();
    // The resync writes a block; then logs 2 and 3 (written after it at the source) arrive.
    const block = Buffer.alloc(4096, 0x5a);
    block.copy(model, 0);
    await peer.writeRuns([{ offset: 0, data: block }]);
    await peer.flush();
    for (const seq of [2, 3]) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
      await sendLog({ url: ps.url, secret: SECRET }, log.envelope, log.file);
    }
    await new Promise((r) => setTimeout(r, 200));
    // Held: the process server did not forward them, the master target applied nothing after 1.
    expect(ps.diskStatus().find((d) => d.diskId === 'disk0')?.pendingLogs).toBe(2);
    expect(mt.ledger.get('disk0').appliedSeq).toBe(1);
    await channel(ps.url, SESSION_A, { afterSeq: 1 }).end();
    await ps.drain();
    await mt.drain();
    expect(mt.ledger.get('disk0').appliedSeq).toBe(3);
    expect(fs.readFileSync(targetFile).equals(model)).toBe(true);
  });

  it('refuses a session anchored after a log this hop has not received (recoverable, nothing held)', async () => {
    const { ps } = await setup();
    await expect(channel(ps.url, SESSION_A, { afterSeq: 9 }).exchange(encodeInfoRequest())).rejects.toMatchObject({ code: 'BR_RESYNC_NOT_READY' });
    expect(ps.resyncSessions.active('disk0')).toBeUndefined();
  });

  it('expires an abandoned session: the appliers resume and the late request is refused', async () => {
    // Long enough that a loaded CI machine still sees the session hold log 2 first.
    const { dir, ps, mt, model, rand, targetFile } = await setup(2000);
    await new ResyncPeer(channel(ps.url, SESSION_A, { afterSeq: 1 })).info();
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand);
    await sendLog({ url: ps.url, secret: SECRET }, log.envelope, log.file);
    await new Promise((r) => setTimeout(r, 100));
    expect(mt.ledger.get('disk0').appliedSeq).toBe(1);
    // Then nobody comes back: both hops end the session on their own.
    for (let waited = 0; waited < 15_000 && (ps.resyncSessions.active('disk0') !== undefined || mt.resyncSessions.active('disk0') !== undefined); waited += 100) {
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(ps.resyncSessions.active('disk0')).toBeUndefined();
    expect(mt.resyncSessions.active('disk0')).toBeUndefined();
    await ps.drain();
    await mt.drain();
    expect(mt.ledger.get('disk0').appliedSeq).toBe(2);
    expect(fs.readFileSync(targetFile).equals(model)).toBe(true);
    await expect(channel(ps.url, SESSION_A, { afterSeq: 1 }).exchange(encodeInfoRequest())).rejects.toMatchObject({ code: 'BR_RESYNC_SESSION_EXPIRED' });
  });

  it('lets a newer attempt of the same resync take over its stale session', async () => {
    const { ps, mt } = await setup();
    await new ResyncPeer(channel(ps.url, SESSION_A, { attempt: 5 })).info();
    await new ResyncPeer(channel(ps.url, SESSION_A, { attempt: 6 })).info();
    expect(ps.resyncSessions.active('disk0')?.attempt).toBe(6);
    expect(mt.resyncSessions.active('disk0')?.attempt).toBe(6);
    await expect(channel(ps.url, SESSION_A, { attempt: 5 }).exchange(encodeInfoRequest())).rejects.toMatchObject({ code: 'BR_RESYNC_SESSION_EXPIRED' });
  });

  it('opens a relayed session only once its own spool is forwarded up to the anchor; until then a coded not-ready, nothing held', async () => {
    const dir = tmp();
    const extra = { ...quiet(), retryPolicy: FAST_RETRY, resyncReadyTimeoutMs: 500 };
    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] }), hrlLogOps, extra);
    await mt.start();
    running.push(mt);
    const proxy = new FaultProxy(Number(new URL(mt.url).port));
    await proxy.listen();
    const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: proxy.url, secret: MT_SECRET } }), hrlLogOps, extra);
    await ps.start();
    running.push(ps);
    try {
      // The link to the master target is down: logs 1 and 2 stay in the process server's spool.
      proxy.mode = { kind: 'drop' };
      const model = Buffer.alloc(DISK_SIZE);
      const rand = prng(8);
      for (const seq of [1, 2]) {
        const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
        await sendLog({ url: ps.url, secret: SECRET }, log.envelope, log.file);
      }
      await expect(channel(ps.url, SESSION_A, { afterSeq: 2 }).exchange(encodeInfoRequest())).rejects.toMatchObject({ code: 'BR_RESYNC_NOT_READY' });
      expect(ps.resyncSessions.active('disk0')).toBeUndefined();
      // The link is back: the spool drains (nothing was left held), and the next attempt opens.
      proxy.mode = { kind: 'pass' };
      await ps.drain();
      await mt.drain();
      expect(mt.ledger.get('disk0').appliedSeq).toBe(2);
      expect((await new ResyncPeer(channel(ps.url, SESSION_A, { afterSeq: 2, attempt: 2 })).info()).sizeBytes).toBe(DISK_SIZE);
      expect(mt.resyncSessions.active('disk0')?.afterSeq).toBe(2);
      await channel(ps.url, SESSION_A, { afterSeq: 2, attempt: 2 }).end();
    } finally {
      await proxy.close();
    }
  });
});
