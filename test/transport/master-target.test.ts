import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { callJson, getDiskState, sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET } from './transport-fixture';

describe('master target', () => {
  const tmp = useTempDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const r of running.splice(0)) await r.stop();
  });

  async function startMt(dir: string): Promise<ApplyingHop> {
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
    const mt = masterTargetFromConfig(config, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    running.push(mt);
    return mt;
  }

  it('applies logs in order, exactly once, and the target equals the model', async () => {
    const dir = tmp();
    const mt = await startMt(dir);
    const peer = { url: mt.url, secret: SECRET };
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(1);
    const logs = [];
    for (let seq = 1; seq <= 4; seq++) logs.push(await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand));
    for (const log of logs) expect((await sendLog(peer, log.envelope, log.file)).status).toBe(201);
    // A resend after a lost answer is a harmless duplicate.
    expect(await sendLog(peer, logs[1]!.envelope, logs[1]!.file)).toEqual({ status: 200, duplicate: true });
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    const state = await getDiskState(peer, 'disk0');
    expect(state).toMatchObject({ nextSeq: 5, appliedSeq: 4 });
    expect(mt.spool.list('disk0')).toEqual([]);
  });

  it('accepts lz4-framed uploads', async () => {
    const dir = tmp();
    const mt = await startMt(dir);
    const model = Buffer.alloc(DISK_SIZE);
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, prng(2));
    expect((await sendLog({ url: mt.url, secret: SECRET }, log.envelope, log.file, { lz4: true })).status).toBe(201);
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  });

  it('refuses a gap, a conflict, a wrong secret, a bad disk id and a corrupt log, writing nothing', async () => {
    const dir = tmp();
    const mt = await startMt(dir);
    const peer = { url: mt.url, secret: SECRET };
    const rand = prng(3);
    const model = Buffer.alloc(DISK_SIZE);
    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand);
    const third = await makeLog(path.join(dir, 'src'), 'disk0', 3, Buffer.alloc(DISK_SIZE), rand);

    await expect(sendLog({ ...peer, secret: 'wrong-secret-wrong-secret' }, first.envelope, first.file)).rejects.toMatchObject({ code: 'BR_AUTH_FAILED' });
    await expect(sendLog(peer, { ...first.envelope, diskId: '../etc' }, first.file)).rejects.toMatchObject({ code: 'BR_DISK_ID_INVALID' });
    await expect(sendLog(peer, { ...first.envelope, diskId: 'disk9' }, first.file)).rejects.toMatchObject({ code: 'BR_DISK_UNKNOWN' });

    const corrupt = path.join(dir, 'corrupt.hrl');
    const bytes = fs.readFileSync(first.file);
    bytes[bytes.length - 4096 - 100] ^= 0xff; // inside the last payload
    fs.writeFileSync(corrupt, bytes);
    const { hashFile } = await import('../../src/transport/log-spool');
    const corruptHash = (await hashFile(corrupt)).xxhash64;
    await expect(sendLog(peer, { ...first.envelope, xxhash64: corruptHash }, corrupt)).rejects.toMatchObject({ code: expect.stringMatching(/^BR_HRL_/) });
    // The body does not match its declared hash: a transfer fault, recoverable.
    await expect(sendLog(peer, first.envelope, corrupt)).rejects.toMatchObject({ code: 'BR_UPLOAD_HASH_MISMATCH', recoverable: true });
    expect(fs.existsSync(path.join(dir, 'target.img'))).toBe(false);

    expect((await sendLog(peer, first.envelope, first.file)).status).toBe(201);
    await expect(sendLog(peer, third.envelope, third.file)).rejects.toMatchObject({ code: 'BR_SEQ_GAP', details: { expectedSeq: 2 } });
    await expect(sendLog(peer, { ...third.envelope, seq: 1 }, third.file)).rejects.toMatchObject({ code: 'BR_SEQ_CONFLICT' });
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  });

  it('runs the hooks\' afterApply again for a log whose afterApply failed (a page blob\'s snapshot refused once)', async () => {
    const dir = tmp();
    const calls: number[] = [];
    let failed = false;
    const hooks = {
      async afterApply(_disk: string, entry: { envelope: { seq: number } }): Promise<void> {
        calls.push(entry.envelope.seq);
        if (!failed) {
          failed = true;
          throw new BlockrelayError('BR_BLOB_THROTTLED', 'Snapshot Blob failed (HTTP 503 ServerBusy)');
        }
      },
    };
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
    const mt = masterTargetFromConfig(config, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY, hooks });
    await mt.start();
    running.push(mt);
    const model = Buffer.alloc(DISK_SIZE);
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, prng(3));
    await sendLog({ url: mt.url, secret: SECRET }, log.envelope, log.file);
    await mt.drain();
    // Once for the apply that failed in afterApply, once more for the retry, which applies nothing twice.
    expect(calls).toEqual([1, 1]);
    expect(mt.diskStatus()[0]?.appliedSeq).toBe(1);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
  });

  it('refuses a second instance on the same state directory', async () => {
    const dir = tmp();
    await startMt(dir);
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [] });
    await expect(masterTargetFromConfig(config, hrlLogOps, quiet()).start()).rejects.toMatchObject({ code: 'BR_LOCKED' });
  });

  it('serves status and metrics without the secret, and refuses control calls without it', async () => {
    const dir = tmp();
    const mt = await startMt(dir);
    const status = (await (await fetch(`${mt.url}/v1/status`)).json()) as { disks: Array<{ diskId: string; health: string }> };
    expect(status.disks).toEqual([expect.objectContaining({ diskId: 'disk0', health: 'OK' })]);
    const metrics = await (await fetch(`${mt.url}/metrics`)).text();
    expect(metrics).toContain('blockrelay_disk_health');
    const refused = await fetch(`${mt.url}/v1/disks/disk0/resume`, { method: 'POST' });
    expect(refused.status).toBe(401);
    await expect(callJson({ url: mt.url, secret: SECRET }, 'POST', '/v1/disks/disk0/resume')).resolves.toMatchObject({ diskId: 'disk0' });
  });
});

describe('stopping while a status page polls', () => {
  const tmp = useTempDirs();

  it('stops promptly although a keep-alive client was mid-request and keeps reusing its connection', async () => {
    const net = await import('node:net');
    const dir = tmp();
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
    const mt = masterTargetFromConfig(config, hrlLogOps, quiet());
    await mt.start();
    const { port } = new URL(mt.url);
    const socket = net.connect(Number(port), '127.0.0.1');
    await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
    const poll = 'GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n';
    let responses = 0;
    let buffered = '';
    socket.on('data', (d) => {
      buffered += d.toString('latin1');
      // After each answer, ask again at once on the same connection, as a busy poller would.
      let at: number;
      while ((at = buffered.indexOf('HTTP/1.1 ')) >= 0) {
        buffered = buffered.slice(at + 9);
        responses++;
        if (!socket.destroyed && responses < 10_000) socket.write(poll);
      }
    });
    socket.on('error', () => undefined);
    // Busy when the stop begins: an upload whose body is still arriving.
    const upload = [
      'PUT /v1/disks/disk0/logs/1 HTTP/1.1', 'Host: x', 'Connection: keep-alive', `Authorization: Bearer ${SECRET}`,
      'x-blockrelay-xxhash64: 0123456789abcdef', 'x-blockrelay-log-length: 10', 'x-blockrelay-cut-time-ms: 1', 'x-blockrelay-cut-id: c',
      'x-blockrelay-disk-size-bytes: 8388608', 'Content-Length: 10', '', '',
    ].join('\r\n');
    socket.write(`${upload}01234`);
    await new Promise((r) => setTimeout(r, 100));
    const started = Date.now();
    const stopping = mt.stop();
    await new Promise((r) => setTimeout(r, 50));
    socket.write('56789');
    await stopping;
    const tookMs = Date.now() - started;
    socket.destroy();
    expect(responses).toBeGreaterThan(0);
    expect(tookMs).toBeLessThan(3000);
  });
});
