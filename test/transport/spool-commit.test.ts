import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { getDiskState, sendLog } from '../../src/transport/log-client';
import { hashHex, LogSpool, newXxhash64, SPOOL_WRITEBACK_STEP_BYTES } from '../../src/transport/log-spool';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import type { DiskDrain } from '../../src/transport/disk-drain';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET } from './transport-fixture';

describe('spool commit and sequence ledger', () => {
  const tmp = useTempDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const r of running.splice(0)) await r.stop();
  });

  /** A master target that spools every log (apply on receipt off), its drain not started until `start`. */
  async function startMt(dir: string): Promise<ApplyingHop> {
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
    const mt = masterTargetFromConfig(config, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY, applyOnReceive: false });
    await mt.start();
    running.push(mt);
    return mt;
  }

  it('writes a large upload back as it arrives, so the fsync before its answer is left the last step or less; a staged log is not', async () => {
    const dir = tmp();
    const bytes = 3 * SPOOL_WRITEBACK_STEP_BYTES + 12345;
    const data = Buffer.alloc(bytes, 0x5a);
    const envelope = { diskId: 'disk0', seq: 1, xxhash64: hashHex((await newXxhash64()).update(data)), logLength: bytes, cutTimeMs: 1, cutId: 'c1', diskSizeBytes: DISK_SIZE, group: undefined, appTag: undefined };
    const spool = new LogSpool(path.join(dir, 'spool'), 1 << 30);
    await spool.open();
    // Every fdatasync on any file handle while the upload streams in (in 1 MiB pieces).
    const handle = await fsp.open(path.join(dir, 'probe'), 'w');
    const proto = Object.getPrototypeOf(handle) as { datasync(): Promise<void> };
    await handle.close();
    const syncs: string[] = [];
    const original = proto.datasync;
    proto.datasync = function datasync(this: fsp.FileHandle) {
      syncs.push('datasync');
      return original.call(this);
    };
    try {
      const pieces = (): Readable => Readable.from((function* () { for (let at = 0; at < bytes; at += 1 << 20) yield data.subarray(at, Math.min(bytes, at + (1 << 20))); })());
      const entry = await spool.receive(envelope, pieces(), { lz4: false, verify: async () => undefined });
      expect(fs.readFileSync(entry.file).equals(data)).toBe(true);
      // One at a time, each started once another step is written: at least one, at most one per step.
      expect(syncs.length).toBeGreaterThanOrEqual(1);
      expect(syncs.length).toBeLessThanOrEqual(3);
      // Staged for apply on receipt (not durable): nothing is written back.
      syncs.length = 0;
      const staged = await spool.stage({ ...envelope, seq: 2 }, pieces(), { lz4: false, verify: async () => undefined, durable: false });
      await staged.discard();
      expect(syncs).toEqual([]);
    } finally {
      proto.datasync = original;
    }
  });

  it('fails an upload whose writeback sync failed, though the final fsync would succeed, and leaves nothing of it in the spool', async () => {
    const dir = tmp();
    const bytes = 2 * SPOOL_WRITEBACK_STEP_BYTES + 4096;
    const data = Buffer.alloc(bytes, 0x6b);
    const envelope = { diskId: 'disk0', seq: 1, xxhash64: hashHex((await newXxhash64()).update(data)), logLength: bytes, cutTimeMs: 1, cutId: 'c1', diskSizeBytes: DISK_SIZE, group: undefined, appTag: undefined };
    const spoolDir = path.join(dir, 'spool');
    const spool = new LogSpool(spoolDir, 1 << 30);
    await spool.open();
    const handle = await fsp.open(path.join(dir, 'probe'), 'w');
    const proto = Object.getPrototypeOf(handle) as { datasync(): Promise<void> };
    await handle.close();
    const original = proto.datasync;
    // The kernel reports a writeback error to one sync: the first (background) one fails, every later one "succeeds".
    let syncs = 0;
    proto.datasync = function datasync(this: fsp.FileHandle) {
      if (++syncs === 1) return Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }));
      return original.call(this);
    };
    try {
      const pieces = Readable.from((function* () { for (let at = 0; at < bytes; at += 1 << 20) yield data.subarray(at, Math.min(bytes, at + (1 << 20))); })());
      await expect(spool.receive(envelope, pieces, { lz4: false, verify: async () => undefined })).rejects.toMatchObject({ code: 'BR_IO' });
    } finally {
      proto.datasync = original;
    }
    expect(syncs).toBeGreaterThanOrEqual(1);
    expect(spool.list('disk0')).toEqual([]);
    expect(fs.existsSync(path.join(spoolDir, 'disk0')) ? fs.readdirSync(path.join(spoolDir, 'disk0')) : []).toEqual([]);
  });

  it('drops a log renamed into place without its envelope (a crash between the renames): it was never answered', async () => {
    const dir = tmp();
    const model = Buffer.alloc(DISK_SIZE);
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 7, model, prng(1));
    const spoolDir = path.join(dir, 'spool');
    const spool = new LogSpool(spoolDir, 1 << 30);
    await spool.open();
    await spool.receive(log.envelope, fs.createReadStream(log.file), { lz4: false, verify: async () => undefined });
    expect(fs.readdirSync(path.join(spoolDir, 'disk0')).sort()).toEqual(['00000000000000000007.hrl', '00000000000000000007.json']);
    // The crash kept the log's rename but not the envelope's.
    fs.rmSync(path.join(spoolDir, 'disk0', '00000000000000000007.json'));
    const reopened = new LogSpool(spoolDir, 1 << 30);
    await reopened.open();
    expect(reopened.list('disk0')).toEqual([]);
    expect(fs.readdirSync(path.join(spoolDir, 'disk0'))).toEqual([]);
  });

  it('ends the bounded holds in its spool when it refuses a log for want of room, so the log fits when sent again', async () => {
    const dir = tmp();
    const config = validateConfig({
      stateDir: path.join(dir, 'mt'),
      listen: '127.0.0.1:0',
      secret: SECRET,
      disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target0.img')}` }, { id: 'disk1', target: `raw:${path.join(dir, 'target1.img')}` }],
    });
    const mt = masterTargetFromConfig(config, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY, spoolMaxBytes: 2 * 1024 * 1024 });
    await mt.start();
    running.push(mt);
    const peer = { url: mt.url, secret: SECRET };
    const drain0 = (mt as unknown as { disks: Map<string, { drain: DiskDrain }> }).disks.get('disk0')!.drain;
    // disk0 is held (as by a resync session) with a bound that leaves the spool no reserve to keep.
    drain0.hold(() => true);
    await drain0.whenIdle();
    const ended: number[] = [];
    drain0.limitHold(Number.POSITIVE_INFINITY, 1, 0, (held) => {
      ended.push(held);
      drain0.release();
    });
    let model0 = Buffer.alloc(DISK_SIZE);
    const rand = prng(4);
    for (let seq = 1; seq < 50; seq++) {
      const next = Buffer.from(model0);
      const log = await makeLog(path.join(dir, 'src0'), 'disk0', seq, next, rand, 40);
      if (mt.spool.bytesUsed + log.envelope.logLength > 2 * 1024 * 1024) break;
      expect((await sendLog(peer, log.envelope, log.file)).status).toBe(201);
      model0 = next;
    }
    expect(ended).toEqual([]);
    const big = await makeLog(path.join(dir, 'src1'), 'disk1', 1, Buffer.alloc(DISK_SIZE), prng(5), 60);
    expect(mt.spool.bytesUsed + big.envelope.logLength).toBeGreaterThan(2 * 1024 * 1024);
    await expect(sendLog(peer, big.envelope, big.file)).rejects.toMatchObject({ code: 'BR_SPOOL_FULL' });
    // The refusal ended the hold: disk0's logs go on, and the refused log fits when sent again.
    expect(ended.length).toBe(1);
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'target0.img')).equals(model0)).toBe(true);
    expect((await sendLog(peer, big.envelope, big.file)).status).toBe(201);
  });

  it('saves the ledger when logs are applied, not when accepted; a restart rebuilds it from the spool', async () => {
    const dir = tmp();
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(2);
    const logs = [];
    for (let seq = 1; seq <= 3; seq++) logs.push(await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand));
    const ledgerFile = path.join(dir, 'mt', 'disks', 'disk0.json');
    let mt = await startMt(dir);
    // Hold the drain so the logs stay spooled.
    (mt as unknown as { disks: Map<string, { drain: { hold(f: () => boolean): void } }> }).disks.get('disk0')!.drain.hold(() => true);
    for (const log of logs) expect((await sendLog({ url: mt.url, secret: SECRET }, log.envelope, log.file)).status).toBe(201);
    expect(fs.existsSync(ledgerFile)).toBe(false);
    await mt.stop();
    running.splice(0);

    // Restarted: the spool says which logs were accepted.
    mt = await startMt(dir);
    const peer = { url: mt.url, secret: SECRET };
    await mt.drain();
    expect(await getDiskState(peer, 'disk0')).toMatchObject({ nextSeq: 4, appliedSeq: 3 });
    expect(JSON.parse(fs.readFileSync(ledgerFile, 'utf8'))).toMatchObject({ nextSeq: 4, appliedSeq: 3 });
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    // Every log accepted before the restart is still known by its hash.
    expect(await sendLog(peer, logs[0]!.envelope, logs[0]!.file)).toEqual({ status: 200, duplicate: true });
    const other = await makeLog(path.join(dir, 'other'), 'disk0', 2, Buffer.alloc(DISK_SIZE), prng(3));
    await expect(sendLog(peer, other.envelope, other.file)).rejects.toMatchObject({ code: 'BR_SEQ_CONFLICT' });
  });
});
