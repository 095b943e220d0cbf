import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { systemClock } from '../../src/platform/clock';
import { DiskHealth } from '../../src/retry/health';
import { checkBoundedHolds, DiskDrain } from '../../src/transport/disk-drain';
import { HttpResyncChannel } from '../../src/resync/http-resync-channel';
import { attemptPath, networkedResync, pendingEndPath, READ_END_SKEW_ALLOWANCE_MS, sessionIdFor } from '../../src/resync/networked-resync';
import { ResyncPeer } from '../../src/resync/resync-peer';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, MT_SECRET, prng, quiet, SECRET } from './transport-fixture';

const SESSION_A = 'a'.repeat(32);
const SESSION_B = 'b'.repeat(32);

function channel(url: string, sessionId: string, options: { attempt?: number; afterSeq?: number; secret?: string } = {}): HttpResyncChannel {
  return new HttpResyncChannel({ peer: { url, secret: options.secret ?? SECRET }, diskId: 'disk0', sessionId, attempt: options.attempt ?? 1, diskSizeBytes: DISK_SIZE, ...(options.afterSeq === undefined ? {} : { afterSeq: options.afterSeq }) });
}

/**
 * An HTTP proxy in front of a hop: each request goes to `handle`, which
 * passes it on with `forward` (or answers it itself). `close` also ends the
 * connections still open.
 */
abstract class HopProxy {
  private readonly server: http.Server;
  private readonly sockets = new Set<net.Socket>();

  constructor(private readonly target: string) {
    this.server = http.createServer((req, res) => this.handle(req, res));
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
  }

  protected abstract handle(req: http.IncomingMessage, res: http.ServerResponse): void;

  /** Passes the request on; `intercept` may take the hop's answer instead (true: it was handled). */
  protected forward(req: http.IncomingMessage, res: http.ServerResponse, intercept?: (answer: http.IncomingMessage) => boolean): void {
    const upstream = http.request(new URL(req.url!, this.target), { method: req.method, headers: req.headers }, (answer) => {
      if (intercept?.(answer) === true) return;
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(res);
    });
    upstream.on('error', () => req.socket.destroy());
    req.pipe(upstream);
  }

  async listen(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(this.server.address() as net.AddressInfo).port}`;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/**
 * A proxy that passes everything on but can lose the answers to `DELETE`s:
 * the request reaches the hop (which acts on it) and the client's
 * connection is reset before the answer.
 */
class LosingProxy extends HopProxy {
  loseDeleteAnswers = 0;
  deletes = 0;

  protected handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.forward(req, res, (answer) => {
      if (req.method !== 'DELETE') return false;
      this.deletes++;
      if (this.loseDeleteAnswers === 0) return false;
      this.loseDeleteAnswers--;
      answer.resume();
      answer.on('end', () => req.socket.resetAndDestroy());
      return true;
    });
  }
}

/**
 * A proxy that runs `beforeFirstExchange` when the first resync exchange
 * with a body arrives (the session is open, the reads have begun), then
 * passes it on, or answers it 503 when `failFirstExchange`.
 */
class HookProxy extends HopProxy {
  beforeFirstExchange: (() => Promise<void>) | undefined;
  failFirstExchange = false;

  protected handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const hook = req.method === 'POST' && req.headers['content-length'] !== '0' ? this.beforeFirstExchange : undefined;
    if (hook !== undefined) this.beforeFirstExchange = undefined;
    void (hook ?? (async () => undefined))().then(() => {
      if (hook !== undefined && this.failFirstExchange) {
        req.resume();
        res.writeHead(503).end();
        return;
      }
      this.forward(req, res);
    });
  }
}

describe('ending a networked resync session: idempotent and recoverable', () => {
  const tmp = useTempDirs();
  const running: Array<{ stop(): Promise<void> }> = [];
  afterEach(async () => {
    for (const h of running.splice(0).reverse()) await h.stop();
  });

  function mtConfig(dir: string) {
    return validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
  }

  async function startMt(dir: string, idleMs = 60_000): Promise<ApplyingHop> {
    const mt = masterTargetFromConfig(mtConfig(dir), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY, resyncIdleTimeoutMs: idleMs });
    await mt.start();
    running.push(mt);
    return mt;
  }

  async function stopMt(mt: ApplyingHop): Promise<void> {
    running.splice(running.indexOf(mt), 1);
    await mt.stop();
  }

  /** A master target that applied log 1 of `model`. */
  async function setup(idleMs?: number) {
    const dir = tmp();
    const mt = await startMt(dir, idleMs);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(11);
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand);
    await sendLog({ url: mt.url, secret: SECRET }, first.envelope, first.file);
    await mt.drain();
    return { dir, mt, model, rand };
  }

  it('records the completion of the last session after the hop restarted, and answers a repeated completion as recorded', async () => {
    const { dir, mt } = await setup();
    const ch = channel(mt.url, SESSION_A, { afterSeq: 1 });
    await ch.open();
    const peer = new ResyncPeer(ch);
    await peer.writeRuns([{ offset: 0, data: Buffer.alloc(4096, 0x5a) }]);
    await peer.flush();
    ch.close();
    expect(mt.resyncSessions.resyncState('disk0')).toMatchObject({ inProgress: true, lastSession: { sessionId: SESSION_A, attempt: 1, completed: false } });
    // The status says the resync's end has not been recorded.
    expect(mt.diskStatus().find((d) => d.diskId === 'disk0')?.resync).toMatchObject({ inProgress: true, lastSession: { sessionId: SESSION_A, completed: false } });
    // The hop goes away before the source's end arrives; a new process knows nothing of the session in memory.
    await stopMt(mt);
    const again = await startMt(dir);
    const answer = await channel(again.url, SESSION_A, { afterSeq: 1 }).end({ taintedThrough: 1 });
    expect(answer).toMatchObject({ ended: false, completed: true, inProgress: false, taintedThrough: 1 });
    expect(again.resyncSessions.resyncState('disk0')).toMatchObject({ inProgress: false, lastSession: { completed: true } });
    // The source did not see that answer and sends the end again: recorded already, nothing changes.
    expect(await channel(again.url, SESSION_A, { afterSeq: 1 }).end({ taintedThrough: 1 })).toMatchObject({ completed: true, inProgress: false, taintedThrough: 1 });
  });

  it('serialises a late completion with another session opening at once: each answered cleanly, memory and file agree, also after a restart', async () => {
    for (let round = 0; round < 8; round++) {
      const { dir, mt } = await setup();
      const ch = channel(mt.url, SESSION_A, { afterSeq: 1 });
      await ch.open();
      const peer = new ResyncPeer(ch);
      await peer.writeRuns([{ offset: 0, data: Buffer.alloc(4096, 0x5a) }]);
      await peer.flush();
      ch.close();
      // The hop restarts before A's end arrives: A's completion is a late one, and B opens at the same moment.
      await stopMt(mt);
      const again = await startMt(dir);
      const b = channel(again.url, SESSION_B, { afterSeq: 1 });
      const [endA, openB] = await Promise.allSettled([channel(again.url, SESSION_A, { afterSeq: 1 }).end({ taintedThrough: 1 }), b.open()]);
      b.close();
      // B always opens; A is recorded (before B opened) or refused as overtaken, never a rename clash.
      expect(openB.status).toBe('fulfilled');
      if (endA.status === 'rejected') expect(['BR_RESYNC_SESSION_BUSY', 'BR_RESYNC_SESSION_EXPIRED']).toContain((endA.reason as { code?: string }).code);
      const file = path.join(dir, 'mt', 'resync', 'disk0.json');
      const memory = again.resyncSessions.resyncState('disk0');
      expect(JSON.parse(fs.readFileSync(file, 'utf8'))).toEqual(memory);
      // Whatever the order, B is the last session and the disk is in progress until B completes.
      expect(memory).toMatchObject({ inProgress: true, lastSession: { sessionId: SESSION_B, completed: false } });
      expect(fs.readdirSync(path.dirname(file)).filter((n) => n.endsWith('.tmp'))).toEqual([]);
      await stopMt(again);
      const third = await startMt(dir);
      expect(third.resyncSessions.resyncState('disk0')).toEqual(memory);
      await stopMt(third);
    }
  }, 60_000);

  /** A source differing from the target, and a proxy whose first exchange lets the source seal log 2 (cut now) and send it. */
  async function anchoredRun(failFirstExchange: boolean) {
    const { dir, mt, model, rand } = await setup();
    const sourceFile = path.join(dir, 'source.img');
    const source = Buffer.from(model);
    for (let i = 0; i < 16; i++) source.fill(i + 1, i * 256 * 1024, i * 256 * 1024 + 4096);
    fs.writeFileSync(sourceFile, source);
    const proxy = new HookProxy(mt.url);
    const url = await proxy.listen();
    running.push({ stop: () => proxy.close() });
    let log2CutTimeMs = 0;
    proxy.failFirstExchange = failFirstExchange;
    proxy.beforeFirstExchange = async () => {
      const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand);
      log2CutTimeMs = second.envelope.cutTimeMs;
      await sendLog({ url: mt.url, secret: SECRET }, second.envelope, second.file);
    };
    const run = (retryPolicy = FAST_RETRY) => networkedResync(`raw:${sourceFile}`, { peer: { url, secret: SECRET }, diskId: 'disk0', statePath: path.join(dir, 'resync.state'), firstAnchor: 1, retryPolicy, windowBytes: 1024 * 1024 });
    return { dir, mt, run, log2CutTimeMs: () => log2CutTimeMs };
  }

  it('a given anchor (--after-seq) is no cut: a log sealed while the resync read ends no offered point', async () => {
    const { mt, run, log2CutTimeMs } = await anchoredRun(false);
    const pointBefore = mt.diskStatus().find((d) => d.diskId === 'disk0')!.lastPointTimeMs;
    expect(await run()).toMatchObject({ attempts: 1, afterSeq: 1, blocksSent: 16 });
    await mt.drain();
    expect(mt.ledger.get('disk0').appliedSeq).toBe(2);
    // Log 2 was held by the session and applied after it: the target mixes its writes with blocks read after its cut.
    expect(mt.resyncSessions.resyncState('disk0')).toMatchObject({ inProgress: false, taintedThrough: 2 });
    expect(mt.diskStatus().find((d) => d.diskId === 'disk0')!.lastPointTimeMs).toBe(pointBefore);
    expect(log2CutTimeMs()).toBeGreaterThan(0);
  });

  it('a given anchor (--after-seq) anchors the first session only: after an interruption the next one opens at what the hop received', async () => {
    const { dir, mt, run } = await anchoredRun(true);
    // Attempt 1 fails after log 2 arrived; its end lets log 2 be applied. Re-anchoring at 1 would be refused every time.
    const result = await run({ scheduleOffsetsMs: [20], steadyIntervalMs: 20, maxRetries: 3 });
    // (afterSeq null: the hop chose the anchor; log 2 was applied before the reads, so its blocks were sent back too)
    expect(result).toMatchObject({ attempts: 2, afterSeq: null });
    expect(mt.resyncSessions.resyncState('disk0')).toMatchObject({ inProgress: false, taintedThrough: 2, lastSession: { completed: true } });
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(fs.readFileSync(path.join(dir, 'source.img')))).toBe(true);
  });

  it('answers an end that takes longer than the source may wait as still ending, and the source asks again until it is recorded', async () => {
    const { mt } = await setup();
    const ch = channel(mt.url, SESSION_A, { afterSeq: 1 });
    await ch.open();
    ch.close();
    // An exchange still in flight holds the end back for 1.5 s (as a long flush and journal copy would).
    const info = Buffer.from([0x01, 1, 0, 0, 0, 0, 0, 0]);
    const slow = http.request(new URL('/v1/disks/disk0/resync', mt.url), { method: 'POST', headers: { authorization: `Bearer ${SECRET}`, 'content-length': String(info.length), 'x-blockrelay-resync-session': SESSION_A, 'x-blockrelay-resync-attempt': '1', 'x-blockrelay-resync-after-seq': '1', 'x-blockrelay-disk-size-bytes': String(DISK_SIZE) } });
    const slowDone = new Promise<number>((resolve, reject) => {
      slow.on('response', (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      slow.on('error', reject);
    });
    slow.write(info.subarray(0, 4));
    await new Promise((r) => setTimeout(r, 50));
    setTimeout(() => slow.end(info.subarray(4)), 1500);
    // Each request of this end may take 400 ms: the hop answers within 200 ms, 'ending', and is asked again.
    const startedMs = Date.now();
    const answer = await new HttpResyncChannel({ peer: { url: mt.url, secret: SECRET, timeoutMs: 400 }, diskId: 'disk0', sessionId: SESSION_A, attempt: 1, afterSeq: 1, diskSizeBytes: DISK_SIZE }).end({ taintedThrough: 1 });
    expect(answer).toMatchObject({ completed: true, ending: false, inProgress: false, taintedThrough: 1 });
    expect(Date.now() - startedMs).toBeGreaterThan(1000);
    // (the session ended while it was read: refused as expired, but the end waited for it)
    expect(await slowDone).toBe(410);
    expect(mt.resyncSessions.resyncState('disk0')).toMatchObject({ inProgress: false, lastSession: { sessionId: SESSION_A, completed: true } });
  });

  it('numbers attempts from a saved count, not the clock: a stale session of a later-dated attempt is passed at once', async () => {
    const { dir, mt, model } = await setup();
    const sourceFile = path.join(dir, 'source.img');
    model.fill(0x42, 0, 4096);
    fs.writeFileSync(sourceFile, model);
    const statePath = path.join(dir, 'resync.state');
    // This resync's own session, left open by a run whose clock was an hour ahead (the clock stepped back since).
    const staleAttempt = Date.now() + 3_600_000;
    await channel(mt.url, sessionIdFor(statePath, 'disk0'), { afterSeq: 1, attempt: staleAttempt }).open();
    const once = { scheduleOffsetsMs: [20], steadyIntervalMs: 20, maxRetries: 1 };
    const result = await networkedResync(`raw:${sourceFile}`, { peer: { url: mt.url, secret: SECRET }, diskId: 'disk0', statePath, retryPolicy: once });
    expect(result).toMatchObject({ attempts: 1, blocksSent: 1 });
    expect(mt.resyncSessions.resyncState('disk0').lastSession).toMatchObject({ attempt: staleAttempt + 1, completed: true });
    expect(JSON.parse(fs.readFileSync(attemptPath(statePath), 'utf8'))).toMatchObject({ attempt: staleAttempt + 1 });
    // The next run goes on from the saved count, whatever the clock says.
    model.fill(0x43, 0, 4096);
    fs.writeFileSync(sourceFile, model);
    await networkedResync(`raw:${sourceFile}`, { peer: { url: mt.url, secret: SECRET }, diskId: 'disk0', statePath, retryPolicy: once, clock: { now: () => 0, setTimer: (fn, ms) => systemClock.setTimer(fn, ms) } });
    expect(mt.resyncSessions.resyncState('disk0').lastSession).toMatchObject({ attempt: staleAttempt + 2, completed: true });
  });

  it('without a cut, taints the logs cut up to the skew allowance after the last read: a source clock a little ahead offers no mixed point', async () => {
    const { dir, mt, model, rand } = await setup();
    const status = () => mt.diskStatus().find((d) => d.diskId === 'disk0')!;
    const sourceFile = path.join(dir, 'source.img');
    fs.writeFileSync(sourceFile, model);
    const pointBefore = status().lastPointTimeMs;
    await networkedResync(`raw:${sourceFile}`, { peer: { url: mt.url, secret: SECRET }, diskId: 'disk0', statePath: path.join(dir, 'resync.state'), retryPolicy: FAST_RETRY });
    const doneMs = Date.now();
    expect(mt.resyncSessions.resyncState('disk0').taintedUntilMs).toBeGreaterThan(doneMs + READ_END_SKEW_ALLOWANCE_MS - 2000);
    // Log 2 was sealed before the last read ended, by a source whose clock runs 2 s ahead of this host's.
    const sealedEarly = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand);
    await sendLog({ url: mt.url, secret: SECRET }, { ...sealedEarly.envelope, cutTimeMs: doneMs + 2000 }, sealedEarly.file);
    await mt.drain();
    expect(status().lastPointTimeMs).toBe(pointBefore);
    const later = await makeLog(path.join(dir, 'src'), 'disk0', 3, model, rand);
    await sendLog({ url: mt.url, secret: SECRET }, { ...later.envelope, cutTimeMs: doneMs + READ_END_SKEW_ALLOWANCE_MS + 1000 }, later.file);
    await mt.drain();
    expect(status().lastPointTimeMs).toBe(doneMs + READ_END_SKEW_ALLOWANCE_MS + 1000);
  });

  it('ends an expired session that had finished: its completion still counts', async () => {
    const { mt } = await setup(300);
    const ch = channel(mt.url, SESSION_A, { afterSeq: 1 });
    await ch.open();
    ch.close();
    for (let waited = 0; waited < 10_000 && mt.resyncSessions.active('disk0') !== undefined; waited += 50) await new Promise((r) => setTimeout(r, 50));
    expect(mt.resyncSessions.active('disk0')).toBeUndefined();
    expect(await channel(mt.url, SESSION_A, { afterSeq: 1 }).end({ taintedThrough: 1 })).toMatchObject({ completed: true, inProgress: false });
  });

  it('refuses a completion that a later session has overtaken: coded 410 or 409, the disk stays in progress', async () => {
    const { mt } = await setup();
    for (const attempt of [1, 2]) {
      const ch = channel(mt.url, SESSION_A, { afterSeq: 1, attempt });
      await ch.open();
      await ch.end();
    }
    // Attempt 2 wrote after attempt 1: attempt 1's completion says nothing about the target any more.
    await expect(channel(mt.url, SESSION_A, { afterSeq: 1, attempt: 1 }).end({ taintedThrough: 1 })).rejects.toMatchObject({ code: 'BR_RESYNC_SESSION_EXPIRED' });
    expect(mt.resyncSessions.resyncState('disk0').inProgress).toBe(true);
    // Nor is the completion of a resync that is not the one holding the disk.
    const other = channel(mt.url, SESSION_B, { afterSeq: 1 });
    await other.open();
    await expect(channel(mt.url, SESSION_A, { afterSeq: 1, attempt: 2 }).end({ taintedThrough: 1 })).rejects.toMatchObject({ code: 'BR_RESYNC_SESSION_BUSY' });
    expect(await channel(mt.url, SESSION_B, { afterSeq: 1 }).end({ taintedThrough: 1 })).toMatchObject({ ended: true, completed: true, inProgress: false });
  });

  it('offers no point for a log cut before the last read of a completion without a cut, however late it arrives', async () => {
    const { dir, mt, model, rand } = await setup();
    const status = () => mt.diskStatus().find((d) => d.diskId === 'disk0')!;
    const readEndMs = Date.now();
    const ch = channel(mt.url, SESSION_A, { afterSeq: 1 });
    await ch.open();
    // The resync knew no log sequence (no cut): the hop received log 1 only, but the source had sealed log 2 before the last read.
    expect(await ch.end({ taintedThrough: undefined, readEndMs })).toMatchObject({ completed: true, taintedThrough: 1 });
    expect(mt.resyncSessions.resyncState('disk0').taintedUntilMs).toBe(readEndMs);
    const pointBefore = status().lastPointTimeMs;
    const late = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand);
    await sendLog({ url: mt.url, secret: SECRET }, { ...late.envelope, cutTimeMs: readEndMs - 500 }, late.file);
    await mt.drain();
    expect(mt.ledger.get('disk0').appliedSeq).toBe(2);
    expect(status().lastPointTimeMs).toBe(pointBefore);
    // The first log cut after the last read ends a point again.
    const next = await makeLog(path.join(dir, 'src'), 'disk0', 3, model, rand);
    await sendLog({ url: mt.url, secret: SECRET }, { ...next.envelope, cutTimeMs: readEndMs + 500 }, next.file);
    await mt.drain();
    expect(status().lastPointTimeMs).toBe(readEndMs + 500);
  });

  it('refuses to open a session at an anchor the hop has applied past (recoverable, nothing held)', async () => {
    const { dir, mt, model, rand } = await setup();
    const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand);
    await sendLog({ url: mt.url, secret: SECRET }, second.envelope, second.file);
    await mt.drain();
    // A resync that cut after log 1 and read the source since: log 2 may hold writes made after its reads.
    await expect(channel(mt.url, SESSION_A, { afterSeq: 1 }).open()).rejects.toMatchObject({ code: 'BR_RESYNC_ANCHOR_PASSED' });
    expect(mt.resyncSessions.active('disk0')).toBeUndefined();
    await channel(mt.url, SESSION_A, { afterSeq: 2, attempt: 2 }).open();
    expect(mt.resyncSessions.active('disk0')).toMatchObject({ attempt: 2, afterSeq: 2 });
  });

  it('cuts again at once, within the attempt, when a log after its cut was applied before its session opened', async () => {
    const { dir, mt, model, rand } = await setup();
    const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand);
    await sendLog({ url: mt.url, secret: SECRET }, second.envelope, second.file);
    await mt.drain();
    const sourceFile = path.join(dir, 'source.img');
    fs.writeFileSync(sourceFile, model);
    // The first cut sealed log 1, and log 2 (written after it) was applied before the session held the disk.
    const cuts = [1, 2, 2];
    const result = await networkedResync(`raw:${sourceFile}`, { peer: { url: mt.url, secret: SECRET }, diskId: 'disk0', statePath: path.join(dir, 'resync.state'), retryPolicy: { scheduleOffsetsMs: [60_000], steadyIntervalMs: 60_000, maxRetries: 1 }, cut: async () => cuts.shift() });
    expect(result).toMatchObject({ attempts: 1, afterSeq: 2, blocksSent: 0 });
    expect(mt.resyncSessions.resyncState('disk0')).toMatchObject({ inProgress: false, lastSession: { completed: true } });
  });

  it('retries an end whose answer was lost under the retry policy; a run stopped before its end confirmed only confirms it next time', async () => {
    const { dir, mt, model } = await setup();
    const proxy = new LosingProxy(mt.url);
    const url = await proxy.listen();
    running.push({ stop: () => proxy.close() });
    const sourceFile = path.join(dir, 'source.img');
    for (let i = 0; i < 30; i++) model.fill(i + 1, i * 128 * 1024, i * 128 * 1024 + 4096);
    fs.writeFileSync(sourceFile, model);
    const statePath = path.join(dir, 'resync.state');

    // The first end's answer is lost: the attempt fails, the next one only sends the end again.
    proxy.loseDeleteAnswers = 1;
    const first = await networkedResync(`raw:${sourceFile}`, { peer: { url, secret: SECRET }, diskId: 'disk0', statePath, retryPolicy: FAST_RETRY, windowBytes: 1024 * 1024 });
    expect(first).toMatchObject({ blocksSent: 30, attempts: 2, endConfirmed: true });
    expect(proxy.deletes).toBe(2);
    expect(fs.existsSync(pendingEndPath(statePath))).toBe(false);
    expect(mt.resyncSessions.resyncState('disk0')).toMatchObject({ inProgress: false, lastSession: { completed: true } });
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);

    // Every end is lost and the run gives up (or is killed): the finished work is kept durably.
    model.fill(0x77, 0, 4096);
    fs.writeFileSync(sourceFile, model);
    proxy.loseDeleteAnswers = 1_000;
    const few = { scheduleOffsetsMs: [10], steadyIntervalMs: 10, maxRetries: 2 };
    await expect(networkedResync(`raw:${sourceFile}`, { peer: { url, secret: SECRET }, diskId: 'disk0', statePath, retryPolicy: few })).rejects.toMatchObject({ code: 'BR_NET_UNREACHABLE' });
    expect(fs.existsSync(pendingEndPath(statePath))).toBe(true);
    const lastSession = mt.resyncSessions.resyncState('disk0').lastSession!;
    // The hop recorded each end it saw; what is lost is only the source's knowledge of it.
    expect(lastSession.completed).toBe(true);
    proxy.loseDeleteAnswers = 0;
    const deletesBefore = proxy.deletes;
    const next = await networkedResync(`raw:${sourceFile}`, { peer: { url, secret: SECRET }, diskId: 'disk0', statePath, retryPolicy: FAST_RETRY });
    // Nothing compared again: one end, the same session, the figures of the run that did the work.
    expect(next).toMatchObject({ blocksSent: 1, attempts: 1 });
    expect(proxy.deletes - deletesBefore).toBe(1);
    expect(mt.resyncSessions.resyncState('disk0').lastSession).toEqual(lastSession);
    expect(fs.existsSync(pendingEndPath(statePath))).toBe(false);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  });
});

describe('logs held back by a resync session are bounded', () => {
  const tmp = useTempDirs();

  it('ends a hold that would leave the store less than an eighth free, whoever filled it, and not before', async () => {
    const MiB = 1024 * 1024;
    const usage = { queuedBytes: MiB, storeUsedBytes: 40 * MiB, storeCapacityBytes: 64 * MiB };
    const items = [2, 3];
    const drain = new DiskDrain<number>({
      diskId: 'disk0',
      queue: { next: async () => items[0], complete: async () => { items.shift(); }, describe: (n) => `log ${n}`, usage: () => usage },
      stage: 'apply',
      handle: async () => undefined,
      clock: systemClock,
      ...quiet(),
      health: new DiskHealth('disk0'),
    });
    drain.start();
    drain.hold(() => true);
    await drain.whenIdle();
    const exceeded: number[] = [];
    drain.limitHold(Number.POSITIVE_INFINITY, 1 / 4, 1 / 8, (held) => exceeded.push(held));
    await new Promise((r) => setTimeout(r, 20));
    expect(exceeded).toEqual([]);
    // Other disks fill the store: 57 of 64 MiB used leaves less than 8 MiB free.
    usage.storeUsedBytes = 57 * MiB;
    drain.wake();
    await new Promise((r) => setTimeout(r, 20));
    expect(exceeded).toEqual([MiB]);
    // Told once; the owner releases, and the held items go on.
    drain.wake();
    await new Promise((r) => setTimeout(r, 20));
    expect(exceeded).toEqual([MiB]);
    drain.release();
    await drain.whenIdle();
    expect(items).toEqual([]);
    await drain.stop();
  });
  it('ends a hold when a log of another disk in the same store is refused for want of the room it takes', async () => {
    const MiB = 1024 * 1024;
    const store = {};
    const usage = { queuedBytes: 10 * MiB, storeUsedBytes: 40 * MiB, storeCapacityBytes: 64 * MiB };
    const drain = new DiskDrain<number>({
      diskId: 'disk0',
      queue: { next: async () => 2, complete: async () => undefined, describe: (n) => `log ${n}`, usage: () => usage, store },
      stage: 'apply',
      handle: async () => undefined,
      clock: systemClock,
      ...quiet(),
      health: new DiskHealth('disk0'),
    });
    drain.start();
    drain.hold(() => true);
    await drain.whenIdle();
    const exceeded: number[] = [];
    drain.limitHold(Number.POSITIVE_INFINITY, 1 / 4, 1 / 8, (held) => exceeded.push(held));
    // 24 MiB free: a 20 MiB log fits, and the reserve is kept; nothing to do.
    checkBoundedHolds(store, undefined, 20 * MiB);
    checkBoundedHolds({}, undefined, 30 * MiB);
    expect(exceeded).toEqual([]);
    // A 30 MiB log of another disk was refused: the hold yields its 10 MiB.
    checkBoundedHolds(store, undefined, 30 * MiB);
    expect(exceeded).toEqual([10 * MiB]);
    drain.release();
    await drain.stop();
  });

  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const h of running.splice(0).reverse()) await h.stop();
  });

  /**
   * A master target serving `mtDisks` behind a process server with the
   * smallest spool the config allows (64 MiB), disk0's first log applied,
   * and a resync session of disk0 open at that process server (anchored
   * after log 1), which holds disk0's later logs.
   */
  async function startWithHeldSession(dir: string, mtDisks: string[], seed: number) {
    const extra = { ...quiet(), retryPolicy: FAST_RETRY };
    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: mtDisks.map((id) => ({ id, target: `raw:${path.join(dir, `${id}.img`)}` })) }), hrlLogOps, extra);
    await mt.start();
    running.push(mt);
    const spoolBytes = 64 * 1024 * 1024;
    const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, cache: { dir: path.join(dir, 'cache'), maxBytes: spoolBytes }, forward: { url: mt.url, secret: MT_SECRET } }), hrlLogOps, extra);
    await ps.start();
    running.push(ps);
    const psPeer = { url: ps.url, secret: SECRET };
    const rand = prng(seed);
    const disk0 = Buffer.alloc(DISK_SIZE);
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, disk0, rand);
    await sendLog(psPeer, first.envelope, first.file);
    await ps.drain();
    await mt.drain();
    await channel(ps.url, SESSION_A, { afterSeq: 1 }).open();
    return { mt, ps, psPeer, rand, disk0, spoolBytes };
  }

  it('ends a hold when another disk\'s uploads leave the spool less than an eighth free, though no log of the held disk arrives', async () => {
    const dir = tmp();
    // The master target knows disk0 only: disk1's logs stay in the process server's spool and fill it.
    const { mt, ps, psPeer, rand, disk0, spoolBytes } = await startWithHeldSession(dir, ['disk0'], 9);
    // The session holds about 10 MiB, well below its quarter.
    let held = 0;
    let seq0 = 2;
    while (held < 10 * 1024 * 1024) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq0++, disk0, rand, 300);
      await sendLog(psPeer, log.envelope, log.file);
      fs.rmSync(log.file);
      held += log.envelope.logLength;
    }
    expect(ps.resyncSessions.active('disk0')).toBeDefined();
    // disk1 writes on; none of its uploads may be refused for the room disk0's held logs take.
    const disk1 = Buffer.alloc(DISK_SIZE);
    let sent1 = 0;
    let seq1 = 1;
    let endedAtBytes: number | undefined;
    while (sent1 < spoolBytes - 8 * 1024 * 1024) {
      const log = await makeLog(path.join(dir, 'src'), 'disk1', seq1++, disk1, rand, 300);
      await sendLog(psPeer, log.envelope, log.file);
      fs.rmSync(log.file);
      sent1 += log.envelope.logLength;
      if (endedAtBytes === undefined && ps.resyncSessions.active('disk0') === undefined) {
        endedAtBytes = held + sent1;
        // The held logs go on to the master target and leave the spool.
        await ps.drain();
      }
    }
    expect(endedAtBytes).toBeDefined();
    expect(endedAtBytes!).toBeGreaterThan(spoolBytes * 7 / 8);
    await mt.drain();
    expect(mt.ledger.get('disk0').appliedSeq).toBe(seq0 - 1);
    expect(fs.readFileSync(path.join(dir, 'disk0.img')).equals(disk0)).toBe(true);
  }, 60_000);

  it('ends a session whose held logs pass a quarter of the spool: they go on, and another disk is never refused for them', async () => {
    const dir = tmp();
    // A 64 MiB spool: a session may hold 16 MiB.
    const { mt, ps, psPeer, rand, disk0, spoolBytes } = await startWithHeldSession(dir, ['disk0', 'disk1'], 5);
    // The source writes on: about 40 MiB of logs arrive for the held disk.
    let sent = 0;
    let seq = 2;
    let endedAtBytes: number | undefined;
    while (sent < 40 * 1024 * 1024) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq++, disk0, rand, 300);
      await sendLog(psPeer, log.envelope, log.file);
      fs.rmSync(log.file);
      sent += log.envelope.logLength;
      if (endedAtBytes === undefined && ps.resyncSessions.active('disk0') === undefined) endedAtBytes = sent;
    }
    // The session ended once its held logs passed 16 MiB; they went on to the master target.
    expect(endedAtBytes).toBeDefined();
    expect(endedAtBytes!).toBeGreaterThan(spoolBytes / 4);
    // (the end is asynchronous: a log or two more may arrive before it is done)
    expect(endedAtBytes!).toBeLessThan(spoolBytes / 4 + 12 * 1024 * 1024);
    await ps.drain();
    await mt.drain();
    expect(mt.ledger.get('disk0').appliedSeq).toBe(seq - 1);
    expect(fs.readFileSync(path.join(dir, 'disk0.img')).equals(disk0)).toBe(true);
    // The source's next exchange learns why and resumes in a new session.
    await expect(new ResyncPeer(channel(ps.url, SESSION_A, { afterSeq: 1 })).info()).rejects.toMatchObject({ code: 'BR_RESYNC_HOLD_FULL' });
    // Another disk's large log finds room in the spool.
    const disk1 = Buffer.alloc(DISK_SIZE);
    const big = await makeLog(path.join(dir, 'src'), 'disk1', 1, disk1, rand, 2000);
    expect(big.envelope.logLength).toBeGreaterThan(spoolBytes / 4);
    await sendLog(psPeer, big.envelope, big.file);
    await ps.drain();
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'disk1.img')).equals(disk1)).toBe(true);
  }, 60_000);
});
