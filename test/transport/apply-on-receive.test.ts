import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { SimulatedClock, systemClock } from '../../src/platform/clock';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { BandwidthLimiter } from '../../src/transport/bandwidth-limiter';
import type { DiskTarget } from '../../src/targets/disk-target';
import { heldLogBytes } from '../../src/transport/held-log';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { getDiskState, sendLog } from '../../src/transport/log-client';
import { APPLY_ON_RECEIVE_KEEPALIVE_MS } from '../../src/transport/log-receiver';
import { envelopeHeaders, logPath } from '../../src/transport/transport-protocol';
import type { LogOps } from '../../src/transport/log-ops';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import type { DiskDrain } from '../../src/transport/disk-drain';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET } from './transport-fixture';

/** Files a disk's inbox holds (spooled logs, envelopes, temporaries). */
function inboxFiles(dir: string): string[] {
  const inbox = path.join(dir, 'mt', 'inbox', 'disk0');
  return fs.existsSync(inbox) ? fs.readdirSync(inbox) : [];
}

describe('master target applying on receipt', () => {
  const tmp = useTempDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const r of running.splice(0)) await r.stop();
  });

  async function startMt(dir: string, logOps: LogOps = hrlLogOps): Promise<ApplyingHop> {
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
    const mt = masterTargetFromConfig(config, logOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    running.push(mt);
    return mt;
  }

  /** The disk's drain (the hop keeps it private; a resync session holds it the same way). */
  function drainOf(mt: ApplyingHop): DiskDrain {
    return (mt as unknown as { disks: Map<string, { drain: DiskDrain }> }).disks.get('disk0')!.drain;
  }

  it('answers a log only once it is applied and recorded, and spools nothing', async () => {
    const dir = tmp();
    const mt = await startMt(dir);
    const peer = { url: mt.url, secret: SECRET };
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(11);
    for (let seq = 1; seq <= 3; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
      expect((await sendLog(peer, log.envelope, log.file)).status).toBe(201);
      // No drain() here: the answer itself means applied.
      expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
      expect(await getDiskState(peer, 'disk0')).toMatchObject({ appliedSeq: seq, nextSeq: seq + 1 });
      expect(inboxFiles(dir)).toEqual([]);
      // The ledger knows its hash: a resend is a duplicate, a different log under its number a conflict.
      expect(await sendLog(peer, log.envelope, log.file)).toEqual({ status: 200, duplicate: true });
    }
    const other = await makeLog(path.join(dir, 'other'), 'disk0', 3, Buffer.alloc(DISK_SIZE), prng(12));
    await expect(sendLog(peer, other.envelope, other.file)).rejects.toMatchObject({ code: 'BR_SEQ_CONFLICT' });
  });

  it('spools a log durably while the disk is held, and applies it once released', async () => {
    const dir = tmp();
    const mt = await startMt(dir);
    const peer = { url: mt.url, secret: SECRET };
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(13);
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand);
    const afterFirst = Buffer.from(model);
    const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand);
    expect((await sendLog(peer, first.envelope, first.file)).status).toBe(201);
    drainOf(mt).hold(() => true);
    expect((await sendLog(peer, second.envelope, second.file)).status).toBe(201);
    expect(mt.spool.list('disk0').map((e) => e.envelope.seq)).toEqual([2]);
    expect(inboxFiles(dir).sort()).toEqual(['00000000000000000002.hrl', '00000000000000000002.json']);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(afterFirst)).toBe(true);
    drainOf(mt).release();
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    expect(mt.spool.list('disk0')).toEqual([]);
  });

  it('takes an lz4-framed upload paced by a bandwidth limit, at that pace', async () => {
    const dir = tmp();
    const mt = await startMt(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, prng(15), 200);
    expect(log.envelope.logLength).toBeGreaterThan(1_500_000);
    // The bucket starts with one second of tokens: the rest of the log waits for the rate.
    const limiter = new BandwidthLimiter(1_000_000, systemClock);
    const started = Date.now();
    expect((await sendLog({ url: mt.url, secret: SECRET }, log.envelope, log.file, { lz4: true, limiter })).status).toBe(201);
    // Random payloads hardly compress: about logLength - 1 MB waits for tokens.
    expect(Date.now() - started).toBeGreaterThanOrEqual(((log.envelope.logLength - 1_000_000) / 1_000_000) * 1000 * 0.8);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  });

  it('sends interim 102 answers while a slow apply runs, so the sender\'s request keeps making progress', async () => {
    const dir = tmp();
    const clock = new SimulatedClock(Date.now());
    let release!: () => void;
    const gate = new Promise<void>((resolve) => { release = resolve; });
    let started!: () => void;
    const applying = new Promise<void>((resolve) => { started = resolve; });
    const slow: LogOps = {
      ...hrlLogOps,
      async apply(file: string, target: DiskTarget) {
        started();
        await gate;
        return hrlLogOps.apply(file, target);
      },
    };
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
    const mt = masterTargetFromConfig(config, slow, { ...quiet(), retryPolicy: FAST_RETRY, clock });
    await mt.start();
    running.push(mt);
    const model = Buffer.alloc(DISK_SIZE);
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, prng(16));
    const interim: number[] = [];
    const answer = new Promise<number>((resolve, reject) => {
      const req = http.request(new URL(logPath('disk0', 1), mt.url), { method: 'PUT', headers: { ...envelopeHeaders(log.envelope), 'content-length': String(log.envelope.logLength), authorization: `Bearer ${SECRET}` } }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.on('information', (info) => interim.push(info.statusCode));
      req.on('error', reject);
      fs.createReadStream(log.file).pipe(req);
    });
    await applying;
    await clock.advance(APPLY_ON_RECEIVE_KEEPALIVE_MS);
    await clock.advance(APPLY_ON_RECEIVE_KEEPALIVE_MS);
    await new Promise((r) => setTimeout(r, 100));
    expect(interim).toEqual([102, 102]);
    release();
    expect(await answer).toBe(201);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  });

  it('applies a log on receipt from memory, writing no file of it; past the memory bound, from a temp file', async () => {
    for (const heldLogMaxBytes of [undefined, 0]) {
      const dir = tmp();
      const seen: Array<{ held: boolean; fileExists: boolean; inbox: string[] }> = [];
      const watching: LogOps = {
        ...hrlLogOps,
        async apply(file: string, target: DiskTarget) {
          seen.push({ held: heldLogBytes(file) !== undefined, fileExists: fs.existsSync(file), inbox: inboxFiles(dir) });
          return hrlLogOps.apply(file, target);
        },
      };
      const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
      const mt = masterTargetFromConfig(config, watching, { ...quiet(), retryPolicy: FAST_RETRY, ...(heldLogMaxBytes === undefined ? {} : { heldLogMaxBytes }) });
      await mt.start();
      running.push(mt);
      const model = Buffer.alloc(DISK_SIZE);
      const rand = prng(17);
      for (let seq = 1; seq <= 2; seq++) {
        const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
        expect((await sendLog({ url: mt.url, secret: SECRET }, log.envelope, log.file, { lz4: seq === 2 })).status).toBe(201);
      }
      expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
      if (heldLogMaxBytes === undefined) expect(seen).toEqual([{ held: true, fileExists: false, inbox: [] }, { held: true, fileExists: false, inbox: [] }]);
      else expect(seen.map((s) => [s.held, s.fileExists, s.inbox.length])).toEqual([[false, true, 1], [false, true, 1]]);
      expect(inboxFiles(dir)).toEqual([]);
    }
  });

  it('spools a log whose apply on receipt failed, and the retrying drain applies it', async () => {
    const dir = tmp();
    let applies = 0;
    const flaky: LogOps = {
      ...hrlLogOps,
      async apply(file: string, target: DiskTarget) {
        applies++;
        if (applies === 1) {
          // The log lands, then the apply fails before it is recorded: the retry applies it again.
          await hrlLogOps.apply(file, target);
          throw new BlockrelayError('BR_IO', 'injected failure while applying');
        }
        return hrlLogOps.apply(file, target);
      },
    };
    const mt = await startMt(dir, flaky);
    const peer = { url: mt.url, secret: SECRET };
    const model = Buffer.alloc(DISK_SIZE);
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, prng(14));
    expect((await sendLog(peer, log.envelope, log.file)).status).toBe(201);
    await mt.drain();
    expect(applies).toBe(2);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    expect(await getDiskState(peer, 'disk0')).toMatchObject({ appliedSeq: 1, nextSeq: 2 });
    expect(mt.spool.list('disk0')).toEqual([]);
  });
});
