import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { HELD_LOG_ALLOCATION_STEP_BYTES, heldLogBytes, holdLog, LogMemory, releaseHeldLog } from '../../src/transport/held-log';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { hashHex, LogSpool, newXxhash64 } from '../../src/transport/log-spool';
import { masterTargetFromConfig } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import type { LogEnvelope } from '../../src/transport/transport-protocol';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, MT_SECRET, prng, quiet, SECRET } from './transport-fixture';

/** The upload body: the log in pieces of at most 64 KiB, as a socket delivers it. */
function body(bytes: Buffer): Readable {
  return Readable.from((function* () {
    for (let at = 0; at < bytes.length; at += 65536) yield bytes.subarray(at, Math.min(bytes.length, at + 65536));
  })());
}

/** Files in the spool's directory of `disk` (temporaries included). */
function spoolFiles(dir: string, disk = 'disk0'): string[] {
  const d = path.join(dir, 'spool', disk);
  return fs.existsSync(d) ? fs.readdirSync(d).sort() : [];
}

describe('process server: spooled logs held in memory beside their files', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void> | void> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  async function spoolOf(dir: string, memoryBytes = HELD_LOG_ALLOCATION_STEP_BYTES): Promise<{ spool: LogSpool; memory: LogMemory }> {
    const spool = new LogSpool(path.join(dir, 'spool'), 1 << 30);
    await spool.open();
    const memory = new LogMemory(memoryBytes);
    spool.holdCommittedLogs(memory);
    cleanup.push(() => spool.releaseHeldLogs());
    return { spool, memory };
  }

  it('verifies a durable log from memory while its file is written and fsynced, keeps it held after commit, and releases it on remove', async () => {
    const dir = tmp();
    const { spool, memory } = await spoolOf(dir);
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, Buffer.alloc(DISK_SIZE), prng(31), 30);
    const bytes = fs.readFileSync(log.file);
    let verifiedFromMemory = false;
    const entry = await spool.receive(log.envelope, body(bytes), {
      lz4: false,
      verify: async (file, env) => {
        // The temp file is written whole too (durable before the answer), but verification reads the buffer.
        verifiedFromMemory = heldLogBytes(file)?.equals(bytes) === true && fs.readFileSync(file).equals(bytes);
        await hrlLogOps.verify(file, env.diskSizeBytes);
      },
    });
    expect(verifiedFromMemory).toBe(true);
    expect(fs.readFileSync(entry.file).equals(bytes)).toBe(true);
    expect(heldLogBytes(entry.file)?.equals(bytes)).toBe(true);
    expect(spool.heldLogs()).toEqual({ logs: 1, bytes: bytes.length });
    await spool.remove('disk0', 1);
    expect(heldLogBytes(entry.file)).toBeUndefined();
    expect(spool.heldLogs()).toEqual({ logs: 0, bytes: 0 });
    expect(spoolFiles(dir)).toEqual([]);
    // The buffer went back as a spare: the next log reuses it.
    expect(memory.take(bytes.length)).toBeDefined();
    expect(memory.allocations).toBe(1);
  });

  it('refuses a held log that fails [MS-HRL] verification: nothing visible, nothing held, its memory given back', async () => {
    const dir = tmp();
    const { spool, memory } = await spoolOf(dir);
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, Buffer.alloc(DISK_SIZE), prng(32), 30);
    const damaged = fs.readFileSync(log.file);
    // The writer's first block is empty: payloads start after it, at 8192.
    damaged[8192 + 100] ^= 0x40;
    const envelope: LogEnvelope = { ...log.envelope, xxhash64: hashHex((await newXxhash64()).update(damaged)) };
    let heldWhileVerified = false;
    const err = await spool.receive(envelope, body(damaged), {
      lz4: false,
      verify: async (file, env) => {
        heldWhileVerified = heldLogBytes(file) !== undefined;
        await hrlLogOps.verify(file, env.diskSizeBytes);
      },
    }).catch((e: unknown) => e);
    expect(heldWhileVerified).toBe(true);
    expect(err).toMatchObject({ code: 'BR_HRL_DATA_CHECKSUM', details: { offset: 8192 } });
    expect(spool.list('disk0')).toEqual([]);
    expect(spoolFiles(dir)).toEqual([]);
    expect(spool.heldLogs()).toEqual({ logs: 0, bytes: 0 });
    expect(spool.bytesUsed).toBe(0);
    // Only a spare is left in the budget, which the next log takes.
    expect(memory.take(damaged.length)).toBeDefined();
    expect(memory.allocations).toBe(1);
  });

  it('never holds more than its bound under many concurrent uploads; the logs past it go through their files', async () => {
    const dir = tmp();
    // Room for two logs (buffers are taken in steps of 64 MiB).
    const bound = 2 * HELD_LOG_ALLOCATION_STEP_BYTES;
    const { spool, memory } = await spoolOf(dir, bound);
    const logs = await Promise.all(Array.from({ length: 10 }, (_, i) => makeLog(path.join(dir, 'src'), `disk${i}`, 1, Buffer.alloc(DISK_SIZE), prng(40 + i), 20)));
    let peakBytes = 0;
    let heldAtVerify = 0;
    const entries = await Promise.all(logs.map((log) => spool.receive(log.envelope, body(fs.readFileSync(log.file)), {
      lz4: false,
      verify: async (file, env) => {
        peakBytes = Math.max(peakBytes, memory.heldBytes);
        if (heldLogBytes(file) !== undefined) heldAtVerify++;
        await hrlLogOps.verify(file, env.diskSizeBytes);
      },
    })));
    expect(peakBytes).toBeLessThanOrEqual(bound);
    expect(memory.heldBytes).toBeLessThanOrEqual(bound);
    expect(heldAtVerify).toBe(2);
    expect(spool.heldLogs().logs).toBe(2);
    for (const [i, entry] of entries.entries()) {
      const bytes = fs.readFileSync(logs[i]!.file);
      expect(fs.readFileSync(entry.file).equals(bytes)).toBe(true);
      const held = heldLogBytes(entry.file);
      if (held !== undefined) expect(held.equals(bytes)).toBe(true);
    }
    // Removing a held log makes room for the next upload.
    const heldEntry = entries.find((e) => heldLogBytes(e.file) !== undefined)!;
    await spool.remove(heldEntry.envelope.diskId, 1);
    const next = await makeLog(path.join(dir, 'src'), 'disk0', 2, Buffer.alloc(DISK_SIZE), prng(60), 20);
    const nextEntry = await spool.receive(next.envelope, body(fs.readFileSync(next.file)), { lz4: false, verify: (file, env) => hrlLogOps.verify(file, env.diskSizeBytes) });
    expect(heldLogBytes(nextEntry.file)).toBeDefined();
    expect(memory.heldBytes).toBeLessThanOrEqual(bound);
    spool.releaseHeldLogs();
    expect(spool.heldLogs()).toEqual({ logs: 0, bytes: 0 });
    for (const e of entries) expect(heldLogBytes(e.file)).toBeUndefined();
  });

  it('sends the same bytes for a log held in memory as for its file, lz4-framed and plain', async () => {
    const dir = tmp();
    // Runs that compress and runs that do not, and a last block that is short.
    const rand = prng(77);
    const bytes = Buffer.alloc(3 * 1024 * 1024 + 12345);
    for (let at = 0; at < bytes.length; at += 4) if (Math.floor(at / 300_000) % 2 === 1 && at + 4 <= bytes.length) bytes.writeUInt32LE(Math.floor(rand() * 2 ** 32), at);
    const file = path.join(dir, 'log.hrl');
    fs.writeFileSync(file, bytes);
    const bodies: Buffer[] = [];
    const server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        bodies.push(Buffer.concat(chunks));
        res.writeHead(201, { 'content-type': 'application/json' }).end('{}');
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    cleanup.push(() => new Promise<void>((resolve) => server.close(() => resolve())));
    const url = `http://127.0.0.1:${(server.address() as import('node:net').AddressInfo).port}`;
    const envelope: LogEnvelope = { diskId: 'disk0', seq: 1, xxhash64: hashHex((await newXxhash64()).update(bytes)), logLength: bytes.length, cutTimeMs: 0, cutId: 'c', group: undefined, appTag: undefined, diskSizeBytes: undefined };
    for (const lz4 of [true, false]) {
      bodies.length = 0;
      await sendLog({ url, secret: SECRET }, envelope, file, { lz4 });
      // The file's bytes held under its name, changed on disk: only the held bytes can make the same body.
      holdLog(file, Buffer.from(bytes));
      fs.writeFileSync(file, Buffer.alloc(bytes.length, 0xee));
      try {
        await sendLog({ url, secret: SECRET }, envelope, file, { lz4 });
      } finally {
        releaseHeldLog(file);
        fs.writeFileSync(file, bytes);
      }
      expect(bodies.length).toBe(2);
      expect(bodies[1]!.equals(bodies[0]!)).toBe(true);
      if (lz4) expect(bodies[0]!.length).toBeLessThan(bytes.length);
      else expect(bodies[0]!.equals(bytes)).toBe(true);
    }
  });

  it('forwards from memory, and after a stop between answer and forward a restarted process server forwards from the file', async () => {
    const dir = tmp();
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(91);
    const psConfig = (forwardUrl: string) => validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, cache: { dir: path.join(dir, 'ps', 'cache'), memoryBytes: 256 * 1024 * 1024 }, forward: { url: forwardUrl, secret: MT_SECRET, timeoutSeconds: 1 } });
    // No master target yet: the logs are answered (durable here) and wait to be forwarded.
    const ps1 = processServerFromConfig(psConfig('http://127.0.0.1:1'), hrlLogOps, { ...quiet(), retryPolicy: { ...FAST_RETRY, maxRetries: 1_000_000 } });
    await ps1.start();
    for (let seq = 1; seq <= 3; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
      expect((await sendLog({ url: ps1.url, secret: SECRET }, log.envelope, log.file)).status).toBe(201);
    }
    expect(ps1.spool.heldLogs().logs).toBe(3);
    const files = ps1.spool.list('disk0').map((e) => e.file);
    await ps1.stop();
    // Stopped: nothing is held any more; the spool's files are all that is left, as after a kill.
    for (const f of files) expect(heldLogBytes(f)).toBeUndefined();

    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] }), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    cleanup.push(() => mt.stop());
    const ps2 = processServerFromConfig(psConfig(mt.url), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await ps2.start();
    cleanup.push(() => ps2.stop());
    expect(ps2.spool.heldLogs().logs).toBe(0);
    // Two more logs, held and forwarded from memory behind the three from files.
    for (let seq = 4; seq <= 5; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
      expect((await sendLog({ url: ps2.url, secret: SECRET }, log.envelope, log.file)).status).toBe(201);
    }
    await ps2.drain();
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    expect(ps2.spool.bytesUsed).toBe(0);
    expect(ps2.spool.heldLogs()).toEqual({ logs: 0, bytes: 0 });
  });
});
