import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import type { LogOps } from '../../src/transport/log-ops';
import type { LogStageEvent } from '../../src/transport/log-stage-events';
import { masterTargetFromConfig } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { envelopeHeaders, logPath, type LogEnvelope } from '../../src/transport/transport-protocol';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, makeLog, prng, SECRET, startGatedHops } from './transport-fixture';

/** Waits until `check` holds, polling (bounded). */
async function until(check: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Sends `body` as the upload of `envelope`, then breaks the connection off after `sendBytes` of it. */
async function brokenUpload(url: string, envelope: LogEnvelope, body: Buffer, sendBytes: number): Promise<void> {
  const req = http.request(new URL(logPath(envelope.diskId, envelope.seq), url), {
    method: 'PUT',
    headers: { ...envelopeHeaders(envelope), authorization: `Bearer ${SECRET}`, 'content-length': String(body.length) },
  });
  req.on('error', () => undefined);
  await new Promise<void>((resolve) => req.write(body.subarray(0, sendBytes), () => resolve()));
  await new Promise((r) => setTimeout(r, 200));
  req.destroy();
}

describe('process server cut-through', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  /** The gated hops (transport-fixture.ts), the cut-through on unless a test says otherwise. */
  const hopsOf = (dir: string, cutThrough = true) => startGatedHops(dir, cleanup, { forward: { cutThrough } });

  it('forwards a log to the master target while it still arrives, and does not send it again from the spool', async () => {
    const dir = tmp();
    const { mt, ps, hold, appliedSeq, appliesOf } = await hopsOf(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(31);
    const peer = { url: ps.url, secret: SECRET };
    // The first log goes from the spool: nothing is cut through before the master target answered one.
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand, 40);
    await sendLog(peer, first.envelope, first.file);
    await ps.drain();
    expect(ps.cutThroughLogsTotal('disk0')).toBe(0);

    const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand, 40);
    const open = hold(2);
    let answered = false;
    const upload = sendLog(peer, second.envelope, second.file).finally(() => { answered = true; });
    // The master target applies log 2 while the process server has not answered it yet.
    await until(() => appliedSeq() === 2, 'the master target applied log 2');
    expect(answered).toBe(false);
    open();
    expect((await upload).status).toBe(201);
    await ps.drain();
    await mt.drain();
    expect(ps.cutThroughLogsTotal('disk0')).toBe(1);
    expect(appliesOf(2)).toBe(1);
    expect(ps.spool.bytesUsed).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    expect(ps.diskStatus()[0]!.health).toBe('OK');
  }, 60_000);

  it('is off unless asked for: a log goes on only once the process server holds it', async () => {
    const dir = tmp();
    const { mt, ps, hold, appliedSeq } = await hopsOf(dir, false);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(35);
    const peer = { url: ps.url, secret: SECRET };
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand, 40);
    await sendLog(peer, first.envelope, first.file);
    await ps.drain();
    const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand, 40);
    const open = hold(2);
    const upload = sendLog(peer, second.envelope, second.file);
    await new Promise((r) => setTimeout(r, 500));
    const heldAt = appliedSeq();
    open();
    expect((await upload).status).toBe(201);
    await ps.drain();
    await mt.drain();
    expect(heldAt).toBe(1);
    expect(appliedSeq()).toBe(2);
    expect(ps.cutThroughLogsTotal('disk0')).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  }, 60_000);

  it('a log arriving before the one ahead of it went on waits for that one\'s forward to begin, then follows it; one behind a backlog goes from the spool', async () => {
    const dir = tmp();
    const { mt, ps, hold, appliedSeq, appliesOf } = await hopsOf(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(34);
    const peer = { url: ps.url, secret: SECRET };
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand, 40);
    await sendLog(peer, first.envelope, first.file);
    await ps.drain();
    // Log 2 is held at the process server (not durable, so not forwarded yet) while log 3 arrives whole.
    // Log 2 arrives lz4-framed, which is never cut through: it goes from the spool.
    const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand, 40);
    const third = await makeLog(path.join(dir, 'src'), 'disk0', 3, model, rand, 40);
    const fourth = await makeLog(path.join(dir, 'src'), 'disk0', 4, model, rand, 40);
    const open = hold(2);
    const upload2 = sendLog(peer, second.envelope, second.file, { lz4: true });
    await new Promise((r) => setTimeout(r, 200));
    const upload3 = sendLog(peer, third.envelope, third.file);
    await new Promise((r) => setTimeout(r, 200));
    // Log 4 arrives behind two logs that have not gone on: not cut through.
    const upload4 = sendLog(peer, fourth.envelope, fourth.file);
    await new Promise((r) => setTimeout(r, 300));
    const heldAt = appliedSeq();
    open();
    expect((await upload2).status).toBe(201);
    expect((await upload3).status).toBe(201);
    expect((await upload4).status).toBe(201);
    await ps.drain();
    await mt.drain();
    // Log 2 went from the spool, log 3 behind it as it had arrived, log 4 from the spool.
    expect(heldAt).toBe(1);
    expect(ps.cutThroughLogsTotal('disk0')).toBe(1);
    expect(appliedSeq()).toBe(4);
    expect([appliesOf(2), appliesOf(3), appliesOf(4)]).toEqual([1, 1, 1]);
    expect(ps.spool.bytesUsed).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  }, 60_000);

  it('a damaged or broken-off upload forwarded in part is refused by the master target too, and the resend converges', async () => {
    const dir = tmp();
    const { mt, ps, appliedSeq, appliesOf } = await hopsOf(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(32);
    const peer = { url: ps.url, secret: SECRET };
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand, 40);
    await sendLog(peer, first.envelope, first.file);
    await ps.drain();

    // Log 2 damaged on the way: both hops find the hash does not match.
    const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand, 60);
    const good = fs.readFileSync(second.file);
    const damaged = Buffer.from(good);
    damaged[Math.floor(damaged.length / 2)]! ^= 0x40;
    const damagedFile = path.join(dir, 'damaged.hrl');
    fs.writeFileSync(damagedFile, damaged);
    await expect(sendLog(peer, second.envelope, damagedFile)).rejects.toMatchObject({ code: 'BR_UPLOAD_HASH_MISMATCH' });
    // Log 2 broken off halfway: the forward is cut off with it.
    await brokenUpload(ps.url, second.envelope, good, Math.floor(good.length / 2));
    await new Promise((r) => setTimeout(r, 300));
    expect(appliedSeq()).toBe(1);
    expect(mt.spool.bytesUsed).toBe(0);

    expect((await sendLog(peer, second.envelope, second.file)).status).toBe(201);
    await ps.drain();
    await mt.drain();
    expect(appliedSeq()).toBe(2);
    expect(appliesOf(2)).toBe(1);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    // Nothing of the refused uploads is left in either hop's store.
    for (const store of [path.join(dir, 'ps'), path.join(dir, 'mt')]) {
      const left = fs.readdirSync(store, { recursive: true }).map(String).filter((f) => f.endsWith('.tmp') || f.endsWith('.hrl'));
      expect(left).toEqual([]);
    }
  }, 60_000);

  it('a log the master target took while the process server failed to keep it is a duplicate when the source sends it again', async () => {
    const dir = tmp();
    const { mt, ps, failOnce, appliedSeq, appliesOf } = await hopsOf(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(33);
    const peer = { url: ps.url, secret: SECRET };
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand, 40);
    await sendLog(peer, first.envelope, first.file);
    await ps.drain();

    const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand, 40);
    failOnce(2);
    await expect(sendLog(peer, second.envelope, second.file)).rejects.toMatchObject({ code: 'BR_IO' });
    await until(() => appliedSeq() === 2, 'the master target applied log 2');
    // The source resends what was not acknowledged; then the next log follows.
    expect((await sendLog(peer, second.envelope, second.file)).status).toBe(201);
    const third = await makeLog(path.join(dir, 'src'), 'disk0', 3, model, rand, 40);
    expect((await sendLog(peer, third.envelope, third.file)).status).toBe(201);
    await ps.drain();
    await mt.drain();
    expect(appliedSeq()).toBe(3);
    expect(appliesOf(2)).toBe(1);
    expect(ps.spool.bytesUsed).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    expect(ps.diskStatus()[0]!.health).toBe('OK');
  }, 60_000);
});
