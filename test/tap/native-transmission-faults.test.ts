import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { useTempDirs } from '../helpers/tmp';
import { expectLogsRebuildDisk, hangableDisk, MiB, nativeTap, peer, useCleanups, waitIdle } from './native-tap-fixtures';
import { rawHandshake, readSimpleReply, request } from './nbd-fixtures';
import { NbdClient } from '../../src/tap/nbd-client';
import * as P from '../../src/tap/nbd-protocol';

/**
 * The native data path under faults: a disk that hangs, slow log appends,
 * stops with replies queued, clients reusing handles. Each test provokes
 * one defect a review of native/tap-transmission.cc found.
 */

const tempDir = useTempDirs();
const cleanups = useCleanups();

/** Milliseconds a 10 ms timer fires late: how long the event loop was blocked. */
async function timerLagMs(): Promise<number> {
  const started = performance.now();
  await new Promise((r) => setTimeout(r, 10));
  return performance.now() - started - 10;
}

/**
 * A native tap on a disk that hangs, with one write stuck in the disk write
 * and one done before: `writing` is the stuck write's reply. The disk is
 * resumed from outside after `watchdogS` seconds, so a blocked main thread
 * cannot keep a test from ending: it then sees the block as lag. Undefined
 * where the hangable disk cannot be made.
 */
async function writeStuckOnHungDisk(watchdogS: number, options: { failureExpected: boolean }) {
  const dir = tempDir();
  const disk = await hangableDisk(dir, 16 * MiB, cleanups);
  if (disk === undefined) return undefined;
  const t = await nativeTap(dir, cleanups, { sizeBytes: 16 * MiB, imagePath: disk.path });
  cleanups.push(() => disk.recover());
  const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port, exportName: 'disk0' });
  cleanups.push(() => client.close().catch(() => undefined));
  await client.write(0, Buffer.alloc(65536, 0x11));
  disk.hang();
  const watchdog = spawn('sh', ['-c', `sleep ${watchdogS}; kill -CONT ${disk.serverPid}`], { stdio: 'ignore' });
  cleanups.push(() => {
    watchdog.kill();
  });
  const write = client.write(65536, Buffer.alloc(65536, 0x22));
  const writing = options.failureExpected ? write.catch(() => undefined) : write;
  // The native writer is now stuck in the disk write.
  await new Promise((r) => setTimeout(r, 300));
  return { disk, t, client, writing };
}

describe('native tap under faults', () => {
  it('keeps the event loop running while the tracker waits for a write stuck on a hung disk', async () => {
    const stuck = await writeStuckOnHungDisk(3, { failureExpected: false });
    if (stuck === undefined) return;
    const { disk, t, client, writing } = stuck;
    let flushed = false;
    const flushing = t.tracker.flush().then(() => {
      flushed = true;
    });
    const lagMs = await timerLagMs();
    expect(lagMs, 'event loop blocked while the tracker holds the native writers').toBeLessThan(1000);
    expect(flushed, 'the locked section waits for the write in flight').toBe(false);
    disk.recover();
    await flushing;
    await writing;
    const image = fs.readFileSync(disk.path);
    expect(image.subarray(65536, 131072).every((b) => b === 0x22)).toBe(true);
    await client.close();
  }, 30_000);

  it('keeps the event loop running while the server closes with a write stuck on a hung disk', async () => {
    const stuck = await writeStuckOnHungDisk(4, { failureExpected: true });
    if (stuck === undefined) return;
    const { disk, t, writing } = stuck;
    let closed = false;
    // The connection is dropped after 300 ms; the export's writer is still stuck.
    const closing = t.server.close(300).then(() => {
      closed = true;
    });
    let worstLagMs = 0;
    for (let i = 0; i < 100 && !closed; i++) worstLagMs = Math.max(worstLagMs, await timerLagMs());
    expect(worstLagMs, 'event loop blocked while the export closes').toBeLessThan(1000);
    expect(closed, 'the server stops waiting for the stuck writer after its grace').toBe(true);
    expect(t.warnings.some((w) => w.includes('still writing to its disk'))).toBe(true);
    disk.recover();
    await closing;
    await writing;
  });

  it('answers a FLUSH it carried out before a graceful stop ends the connection', async () => {
    const dir = tempDir();
    const t = await nativeTap(dir, cleanups);
    const p = await peer(t.port, cleanups);
    await rawHandshake(p, 'disk0');
    // Native writes wait: the WRITE below keeps the connection thread in its
    // queueing step, where it sends nothing, while the FLUSH is answered.
    await t.tracker.pauseNative();
    let resumed = false;
    const resume = (): void => {
      if (!resumed) t.tracker.resumeNative();
      resumed = true;
    };
    cleanups.push(resume);
    p.send(Buffer.concat([request(P.NBD_CMD_FLUSH, 0, 0, 1), request(P.NBD_CMD_WRITE, 0, 4096, 2, { payload: Buffer.alloc(4096, 0x33) })]));
    // The FLUSH is carried out and its reply queued for the thread.
    await new Promise((r) => setTimeout(r, 300));
    const closing = t.server.close(5000);
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 1 });
    // The WRITE was never carried out: no reply, and the connection closes.
    expect(await p.waitClosed()).toBe(true);
    expect(p.pending).toBe(0);
    resume();
    await closing;
  });

  it('keeps a TRIM ahead of later writes when the client reuses its handle for a FLUSH in flight', async () => {
    const dir = tempDir();
    const t = await nativeTap(dir, cleanups);
    // The TRIM's disk operation waits for this gate (its write intent), so
    // the FLUSH with the same handle is answered while the TRIM is not.
    let open!: () => void;
    const gate = new Promise<void>((r) => { open = r; });
    cleanups.push(() => open());
    const intend = t.tracker.intend.bind(t.tracker);
    t.tracker.intend = (offset: number, length: number) => {
      if (length !== 65536) return intend(offset, length);
      return gate.then(() => intend(offset, length));
    };
    const p = await peer(t.port, cleanups);
    await rawHandshake(p, 'disk0');
    p.send(Buffer.concat([
      request(P.NBD_CMD_FLUSH, 0, 0, 7),
      request(P.NBD_CMD_TRIM, 0, 65536, 7),
      request(P.NBD_CMD_WRITE, 0, 4096, 8, { payload: Buffer.alloc(4096, 0x44) }),
    ]));
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 7 });
    // The WRITE after the TRIM must not be read, let alone written, before the TRIM's reply.
    await new Promise((r) => setTimeout(r, 300));
    expect(p.pending, 'a reply came before the TRIM was answered').toBe(0);
    open();
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 7 });
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 8 });
    p.destroy();
    await waitIdle(t.server);
    expect(fs.readFileSync(t.imagePath).subarray(0, 4096).every((b) => b === 0x44)).toBe(true);
    await expectLogsRebuildDisk(t);
  });

  it('keeps an overflow the tracker has not handled yet across an unrelated release of the writers', async () => {
    const dir = tempDir();
    // 8 MiB disk, overflow at 2 MiB of unshipped log.
    const t = await nativeTap(dir, cleanups, { overflowRatio: 0.25 });
    const limit = 2 * MiB;
    const exp = t.server.findExport('disk0')!.native!;
    const p = await peer(t.port, cleanups);
    await rawHandshake(p, 'disk0');
    // Log up to just under the limit, leaving room for a new metadata block.
    let offset = 0;
    let handle = 1;
    for (;;) {
      const room = limit - t.tracker.status().unshippedBytes - 4096 - 8192;
      if (room < 4096) break;
      const length = Math.min(65536, Math.floor(room / 4096) * 4096);
      p.send(request(P.NBD_CMD_WRITE, offset, length, handle, { payload: Buffer.alloc(length, 0x55) }));
      expect(await readSimpleReply(p)).toEqual({ error: 0, handle });
      offset += length;
      handle++;
    }
    expect(exp.attention()[0]).toBe(0);
    // One small write crosses the limit (it fits the socket buffer, so it
    // leaves in this turn). Everything below happens before the tracker's
    // notification can run: the export raises attention, then another
    // operation holds and releases the writers, as a flush or a cut does.
    const gap = limit - t.tracker.status().unshippedBytes;
    const length = Math.floor(gap / 4096) * 4096 + 4096;
    p.send(request(P.NBD_CMD_WRITE, offset, length, handle, { payload: Buffer.alloc(length, 0x66) }));
    const deadline = Date.now() + 5000;
    while (exp.attention()[0] === 0 && Date.now() < deadline) {
      // Spin: the notification must not run before the release below.
    }
    expect(exp.attention()[0], 'the write crossed the overflow limit').toBe(1);
    void t.tracker.pauseNative();
    t.tracker.resumeNative();
    // The tracker still sees the overflow and folds into dirty-map-only tracking.
    const folded = Date.now() + 3000;
    while (t.tracker.status().lastResyncReason !== 'overflow' && Date.now() < folded) await new Promise((r) => setTimeout(r, 10));
    expect(t.tracker.status()).toMatchObject({ mode: 'dirty-only', lastResyncReason: 'overflow' });
    expect(exp.attention()[0]).toBe(0);
  });
});
