import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { systemClock } from '../../src/platform/clock';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { DiskHealth } from '../../src/retry/health';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { getDiskState, sendLog } from '../../src/transport/log-client';
import type { LogOps } from '../../src/transport/log-ops';
import { LogShipper, type ShippableLog } from '../../src/transport/log-shipper';
import { masterTargetFromConfig } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import type { LogStageEvent, LogStageSink } from '../../src/transport/log-stage-events';
import { UploadPipeline } from '../../src/transport/upload-pipeline';
import { FaultProxy } from '../helpers/fault-proxy';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, MT_SECRET, prng, quiet, SECRET, type WrittenLog } from './transport-fixture';

/** [MS-HRL] log ops whose verification takes `delayMs` longer (and fails for chosen sequence numbers). */
function slowOps(delayMs: number, failSeqs: Set<number> = new Set()): LogOps & { verifying: number; maxVerifying: number } {
  const ops = {
    verifying: 0,
    maxVerifying: 0,
    async verify(file: string, diskSizeBytes: number | undefined): Promise<void> {
      ops.verifying++;
      ops.maxVerifying = Math.max(ops.maxVerifying, ops.verifying);
      try {
        await new Promise((r) => setTimeout(r, delayMs));
        const seq = Number(/(\d{20})\.hrl/.exec(file)?.[1]);
        if (failSeqs.has(seq)) {
          failSeqs.delete(seq);
          throw new BlockrelayError('BR_HRL_HEADER_CHECKSUM', `test: log ${seq} refused at offset 0`);
        }
        await hrlLogOps.verify(file, diskSizeBytes);
      } finally {
        ops.verifying--;
      }
    },
    ranges: hrlLogOps.ranges,
    apply: hrlLogOps.apply,
  };
  return ops;
}

describe('pipelined uploads', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  async function hops(dir: string, psOps: LogOps, options: { proxy?: boolean; mtOps?: LogOps; onStage?: LogStageSink } = {}) {
    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] }), options.mtOps ?? slowOps(20), { ...quiet(), retryPolicy: FAST_RETRY });
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
    const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: forwardUrl, secret: MT_SECRET, timeoutSeconds: 1 } }), psOps, { ...quiet(), retryPolicy: FAST_RETRY, ...(options.onStage ? { onStage: options.onStage } : {}) });
    await ps.start();
    cleanup.push(() => ps.stop());
    return { mt, ps, proxy };
  }

  async function logs(dir: string, count: number, model: Buffer, seed: number): Promise<WrittenLog[]> {
    const rand = prng(seed);
    const out: WrittenLog[] = [];
    for (let seq = 1; seq <= count; seq++) out.push(await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand, 30));
    return out;
  }

  it('takes up the next log while the one before it is made durable, and applies every log once, in order', async () => {
    const dir = tmp();
    const psOps = slowOps(80);
    const { mt, ps } = await hops(dir, psOps);
    const model = Buffer.alloc(DISK_SIZE);
    const written = await logs(dir, 8, model, 3);
    const spans = new Map<number, { start: number; end: number }>();
    const peer = { url: ps.url, secret: SECRET };
    const pipeline = new UploadPipeline<WrittenLog>({
      key: (l) => l.envelope.seq,
      send: async (l, onBodySent) => {
        const start = Date.now();
        const r = await sendLog(peer, l.envelope, l.file, { onBodySent });
        expect(r.status).toBe(201);
        spans.set(l.envelope.seq, { start, end: Date.now() });
      },
      next: async (l) => written.find((w) => w.envelope.seq === l.envelope.seq + 1),
    });
    for (const l of written) await pipeline.send(l);
    await pipeline.stop();
    // The uploads overlapped: log N+1 started before log N was answered, and two were being verified at once.
    const overlapped = [...spans.keys()].filter((seq) => spans.has(seq + 1) && spans.get(seq + 1)!.start < spans.get(seq)!.end);
    expect(overlapped.length).toBeGreaterThan(4);
    expect(psOps.maxVerifying).toBe(2);
    await ps.drain();
    await mt.drain();
    expect(mt.diskStatus()[0]!.appliedSeq).toBe(8);
    expect(ps.ledger.get('disk0').nextSeq).toBe(9);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  }, 60_000);

  /** Resolves once `ops` is verifying a log (its body has arrived whole). */
  async function verifying(ops: { verifying: number }): Promise<void> {
    while (ops.verifying === 0) await new Promise((r) => setTimeout(r, 5));
  }

  it('ships a log sealed after the body before it went out without waiting for that log\'s answer', async () => {
    const dir = tmp();
    const psOps = slowOps(600);
    const { ps, mt } = await hops(dir, psOps);
    const model = Buffer.alloc(DISK_SIZE);
    const [l1, l2, l3] = await logs(dir, 3, model, 13);
    const sealed: WrittenLog[] = [l1!];
    const events: LogStageEvent[] = [];
    const shipper = new LogShipper(
      {
        diskId: 'disk0',
        diskSizeBytes: DISK_SIZE,
        sealedLogs: async () => sealed.map((w) => ({ seq: w.envelope.seq, file: w.file, cutTimeMs: w.envelope.cutTimeMs, cutId: w.envelope.cutId })),
        acknowledge: async (seq) => { sealed.splice(sealed.findIndex((w) => w.envelope.seq === seq), 1); },
      },
      { peer: { url: ps.url, secret: SECRET }, clock: systemClock, ...quiet(), health: new DiskHealth('disk0'), retryPolicy: FAST_RETRY, onStage: (e) => events.push(e) },
    );
    cleanup.push(() => shipper.stop());
    shipper.start();
    // The first log goes alone (nothing is sent ahead until the receiver holds a log of the disk).
    shipper.wake();
    await shipper.whenIdle();
    sealed.push(l2!);
    shipper.wake();
    // Log 2 is whole at the process server, which verifies it for 600 ms; log 3 is sealed now.
    await verifying(psOps);
    sealed.push(l3!);
    shipper.wake();
    await shipper.whenIdle();
    const at = (seq: number, phase: string): number => events.find((e) => e.seq === seq && e.stage === 'ship' && e.phase === phase)!.atMs;
    expect(at(3, 'start')).toBeLessThan(at(2, 'done'));
    await ps.drain();
    await mt.drain();
    expect(mt.diskStatus()[0]!.appliedSeq).toBe(3);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  }, 60_000);

  it('forwards a log accepted after the body before it went out without waiting for the master target\'s answer to that log', async () => {
    const dir = tmp();
    // The master target applies on receipt: it answers each log only after 600 ms of verification and its apply.
    const mtOps = slowOps(600);
    const events: LogStageEvent[] = [];
    const { ps, mt } = await hops(dir, slowOps(0), { mtOps, onStage: (e) => events.push(e) });
    const model = Buffer.alloc(DISK_SIZE);
    const [l1, l2, l3] = await logs(dir, 3, model, 17);
    const peer = { url: ps.url, secret: SECRET };
    expect((await sendLog(peer, l1!.envelope, l1!.file)).status).toBe(201);
    await ps.drain();
    expect((await sendLog(peer, l2!.envelope, l2!.file)).status).toBe(201);
    await verifying(mtOps);
    expect((await sendLog(peer, l3!.envelope, l3!.file)).status).toBe(201);
    await ps.drain();
    await mt.drain();
    const at = (seq: number, phase: string): number => events.find((e) => e.seq === seq && e.stage === 'forward' && e.phase === phase)!.atMs;
    expect(at(3, 'start')).toBeLessThan(at(2, 'done'));
    expect(mt.diskStatus()[0]!.appliedSeq).toBe(3);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  }, 60_000);

  it('never starts a resync log ahead: it goes once the log before it is answered', async () => {
    // A receiver admits a resync log past a gap: one overtaking its predecessor
    // would be taken, and the predecessor then answered as a duplicate.
    type Item = { seq: number; resync: boolean };
    const items: Item[] = [{ seq: 1, resync: false }, { seq: 2, resync: false }, { seq: 3, resync: true }, { seq: 4, resync: false }];
    const events: string[] = [];
    const answers = new Map<number, () => void>();
    const pipeline = new UploadPipeline<Item>({
      key: (i) => i.seq,
      next: async (i) => items.find((x) => x.seq > i.seq),
      goesAlone: (i) => i.resync,
      send: (i, onBodySent) => new Promise<void>((resolve) => {
        events.push(`start ${i.seq}`);
        setImmediate(onBodySent);
        answers.set(i.seq, () => {
          events.push(`answer ${i.seq}`);
          resolve();
        });
      }),
    });
    const tick = () => new Promise((r) => setTimeout(r, 5));
    // The first log establishes the receiver; after it, logs go ahead.
    const first = pipeline.send(items[0]!);
    await tick();
    answers.get(1)!();
    await first;
    const second = pipeline.send(items[1]!);
    await tick();
    // Log 2's body is out: log 3 (resync) is next but must not start yet.
    expect(events).toEqual(['start 1', 'answer 1', 'start 2']);
    answers.get(2)!();
    await second;
    const third = pipeline.send(items[2]!);
    await tick();
    expect(events).toEqual(['start 1', 'answer 1', 'start 2', 'answer 2', 'start 3', 'start 4']);
    answers.get(3)!();
    await third;
    const fourth = pipeline.send(items[3]!);
    answers.get(4)!();
    await fourth;
    // Log 4 was started ahead once log 3's body was out, and adopted.
    expect(events.filter((e) => e === 'start 4')).toHaveLength(1);
  });

  it('sends nothing ahead to a receiver that holds no log of the disk: a first log lost on the way is not overtaken', async () => {
    const dir = tmp();
    const { ps, mt } = await hops(dir, slowOps(0));
    const model = Buffer.alloc(DISK_SIZE);
    const written = await logs(dir, 2, model, 19);
    const peer = { url: ps.url, secret: SECRET };
    let firstAttempt = true;
    const pipeline = new UploadPipeline<WrittenLog>({
      key: (l) => l.envelope.seq,
      send: async (l, onBodySent) => {
        if (l.envelope.seq === 1 && firstAttempt) {
          // Log 1's body went out, then its connection died before the receiver saw any of it.
          firstAttempt = false;
          onBodySent();
          await new Promise((r) => setTimeout(r, 300));
          throw new BlockrelayError('BR_NET_UNREACHABLE', 'test: connection reset after the body was sent');
        }
        await sendLog(peer, l.envelope, l.file, { onBodySent });
      },
      next: async (l) => written.find((w) => w.envelope.seq === l.envelope.seq + 1),
    });
    cleanup.push(() => pipeline.stop());
    await expect(pipeline.send(written[0]!)).rejects.toMatchObject({ code: 'BR_NET_UNREACHABLE' });
    // Resent (the drain's retry), then the next.
    await pipeline.send(written[0]!);
    await pipeline.send(written[1]!);
    await ps.drain();
    await mt.drain();
    expect(mt.diskStatus()[0]!.appliedSeq).toBe(2);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  }, 60_000);

  it('discards the logs staged behind one that fails, and takes them again once it is resent', async () => {
    const dir = tmp();
    const { mt, ps } = await hops(dir, slowOps(150, new Set([2])));
    const model = Buffer.alloc(DISK_SIZE);
    const [l1, l2, l3] = await logs(dir, 3, model, 5);
    const peer = { url: ps.url, secret: SECRET };
    expect((await sendLog(peer, l1!.envelope, l1!.file)).status).toBe(201);
    // Log 3 streams in behind log 2, whose verification then fails.
    let third: Promise<unknown> | undefined;
    const second = sendLog(peer, l2!.envelope, l2!.file, { onBodySent: () => { third = sendLog(peer, l3!.envelope, l3!.file).catch((e: unknown) => e); } }).catch((e: unknown) => e);
    expect(await second).toMatchObject({ code: 'BR_HRL_HEADER_CHECKSUM' });
    expect(await third).toMatchObject({ code: 'BR_PEER_BUSY', recoverable: true });
    // Nothing of either is visible; the ledger still expects log 2.
    expect(ps.spool.list('disk0').map((e) => e.envelope.seq).filter((s) => s > 1)).toEqual([]);
    expect(ps.ledger.get('disk0').nextSeq).toBe(2);
    expect(fs.readdirSync(path.join(ps.spool.dir, 'disk0')).filter((n) => n.endsWith('.tmp'))).toEqual([]);
    // A log ahead of its turn is still refused as a gap.
    await expect(sendLog(peer, l3!.envelope, l3!.file)).rejects.toMatchObject({ code: 'BR_SEQ_GAP' });
    expect((await sendLog(peer, l2!.envelope, l2!.file)).status).toBe(201);
    expect((await sendLog(peer, l3!.envelope, l3!.file)).status).toBe(201);
    // A resend of an accepted log is a duplicate.
    expect((await sendLog(peer, l2!.envelope, l2!.file)).duplicate).toBe(true);
    await ps.drain();
    await mt.drain();
    expect(mt.diskStatus()[0]!.appliedSeq).toBe(3);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  }, 60_000);

  it('ships with several logs in flight across a link that resets and drops, and each is applied once, in order', async () => {
    const dir = tmp();
    const { mt, ps, proxy } = await hops(dir, slowOps(10), { proxy: true });
    const model = Buffer.alloc(DISK_SIZE);
    const written = await logs(dir, 12, model, 9);
    const remaining = new Map(written.map((w) => [w.envelope.seq, w]));
    const acknowledged: number[] = [];
    const toShippable = (w: WrittenLog): ShippableLog => ({ seq: w.envelope.seq, file: w.file, cutTimeMs: w.envelope.cutTimeMs, cutId: w.envelope.cutId });
    const shipper = new LogShipper(
      {
        diskId: 'disk0',
        diskSizeBytes: DISK_SIZE,
        sealedLogs: async () => [...remaining.values()].sort((a, b) => a.envelope.seq - b.envelope.seq).map(toShippable),
        acknowledge: async (seq) => {
          acknowledged.push(seq);
          remaining.delete(seq);
        },
      },
      { peer: { url: ps.url, secret: SECRET, timeoutMs: 2000 }, clock: systemClock, ...quiet(), health: new DiskHealth('disk0'), retryPolicy: FAST_RETRY },
    );
    // The process server -> master target link fails now and then while logs flow.
    const modes = [{ kind: 'reset-after', bytes: 3000 }, { kind: 'drop' }, { kind: 'pass' }] as const;
    let faults = 1;
    proxy!.mode = modes[0];
    // Nine changes of mode, 60 ms apart, while the logs are shipped and forwarded; then the link heals.
    const faulting = setInterval(() => {
      proxy!.mode = faults < 9 ? modes[faults % modes.length]! : { kind: 'pass' };
      if (++faults > 9) clearInterval(faulting);
    }, 60);
    cleanup.push(async () => clearInterval(faulting));
    shipper.start();
    shipper.wake();
    await shipper.whenIdle();
    await shipper.stop();
    expect(acknowledged).toEqual(written.map((w) => w.envelope.seq));
    while (faults <= 9) await new Promise((r) => setTimeout(r, 20));
    await ps.drain();
    await mt.drain();
    const state = (await getDiskState({ url: mt.url, secret: MT_SECRET }, 'disk0')) as { appliedSeq?: number };
    expect(state.appliedSeq).toBe(12);
    expect(mt.diskStatus()[0]!.health).toBe('OK');
    expect(ps.diskStatus()[0]!.health).toBe('OK');
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    // The faults hit uploads in flight: the forwarder retried.
    expect(ps.diskStatus()[0]!.recentErrors.length).toBeGreaterThan(0);
  }, 120_000);
});
