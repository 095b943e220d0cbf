import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { systemClock } from '../../src/platform/clock';
import { networkedResync } from '../../src/resync/networked-resync';
import { DiskHealth } from '../../src/retry/health';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { LogShipper } from '../../src/transport/log-shipper';
import { trackerShippingSource } from '../../src/transport/tracker-shipping';
import { FaultProxy } from '../helpers/fault-proxy';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { execFileSync } from 'node:child_process';
import { FAST_RETRY, prng, quiet, SECRET, startHops } from './transport-fixture';

const SIZE = 32 * 1024 * 1024;

/**
 * A protected disk as the source role sees it: a raw image written through
 * a change tracker whose logs a shipper sends to the process server.
 */
async function startSource(dir: string, psUrl: string) {
  const file = path.join(dir, 'source.img');
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, SIZE);
  const fd = fs.openSync(file, 'r+');
  const tracker = await ChangeTracker.open({ dir: path.join(dir, 'logs'), diskId: 'disk0', diskSizeBytes: SIZE, persistIntervalMs: 0 });
  const shipper = new LogShipper(trackerShippingSource(tracker), { peer: { url: psUrl, secret: SECRET }, clock: systemClock, ...quiet(), health: new DiskHealth('disk0'), retryPolicy: FAST_RETRY });
  shipper.start();
  return {
    file,
    spec: `raw:${file}`,
    tracker,
    shipper,
    /** A write the tracker sees (logged and shipped). */
    async write(offset: number, data: Buffer): Promise<void> {
      await tracker.recordWrite(offset, data);
      fs.writeSync(fd, data, 0, data.length, offset);
    },
    /** A write the tracker never saw (lost tracking): only a resync brings it over. */
    writeUntracked(offset: number, data: Buffer): void {
      fs.writeSync(fd, data, 0, data.length, offset);
    },
    /** Seals the active log and ships it; resolves with its sequence. */
    async cut(): Promise<number | undefined> {
      const [sealed] = await ChangeTracker.cut([tracker]);
      shipper.wake();
      return sealed?.sequence;
    },
    async close(): Promise<void> {
      await shipper.stop();
      await tracker.close();
      fs.closeSync(fd);
    },
  };
}

function randomWrite(rand: () => number): { offset: number; data: Buffer } {
  const blocks = 1 + Math.floor(rand() * 8);
  const offset = Math.floor(rand() * (SIZE / 4096 - blocks)) * 4096;
  const data = Buffer.alloc(blocks * 4096);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
  return { offset, data };
}

describe('networked resync through the process server into the master target', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it('brings a VMDK target in step while writes go on; qemu-img compare finds them identical', async () => {
    requireTool('qemu-img');
    const dir = tmp();
    const targetFile = path.join(dir, 'target.vmdk');
    const { mt, ps, stop } = await startHops(dir, `vmdk:${targetFile}`);
    cleanup.push(stop);
    const source = await startSource(dir, ps.url);
    cleanup.push(() => source.close());
    const rand = prng(7);

    // Replication running: a few cuts reach the target.
    for (let i = 0; i < 30; i++) {
      const w = randomWrite(rand);
      await source.write(w.offset, w.data);
    }
    await source.cut();
    await source.shipper.whenIdle();
    await ps.drain();
    await mt.drain();
    // Tracking lost: changes the target never hears of.
    for (let i = 0; i < 200; i++) {
      const w = randomWrite(rand);
      source.writeUntracked(w.offset, w.data);
    }

    // Writes keep coming (logged and shipped) during the resync.
    let writing = true;
    let writesDuring = 0;
    const writer = (async () => {
      while (writing) {
        const w = randomWrite(rand);
        await source.write(w.offset, w.data);
        writesDuring++;
        if (writesDuring % 10 === 0) await source.cut();
        await new Promise((r) => setTimeout(r, 2));
      }
    })();
    let heldWhileActive = false;
    const result = await networkedResync(source.spec, {
      peer: { url: ps.url, secret: SECRET },
      diskId: 'disk0',
      statePath: path.join(dir, 'resync.state'),
      cut: () => source.cut(),
      retryPolicy: FAST_RETRY,
      onProgress: () => {
        // While the session is open the master target holds the logs after the anchor.
        if (mt.resyncSessions.active('disk0') !== undefined && ps.resyncSessions.active('disk0') !== undefined) heldWhileActive = true;
      },
      progressIntervalMs: 0,
    });
    writing = false;
    await writer;
    expect(heldWhileActive).toBe(true);
    expect(result.attempts).toBe(1);
    expect(result.afterSeq).not.toBeNull();
    expect(result.blocksSent).toBeGreaterThan(0);
    expect(writesDuring).toBeGreaterThan(0);
    // Sessions ended: nothing holds the pipeline any more.
    expect(ps.resyncSessions.active('disk0')).toBeUndefined();
    expect(mt.resyncSessions.active('disk0')).toBeUndefined();
    // The completion reached the master target through the relay: logs sealed during the reads end no point.
    expect(result.endConfirmed).toBe(true);
    const state = mt.resyncSessions.resyncState('disk0');
    expect(state.inProgress).toBe(false);
    expect(state.taintedThrough).toBeGreaterThanOrEqual(result.afterSeq!);

    await source.cut();
    await source.shipper.whenIdle();
    await ps.drain();
    await mt.drain();
    await mt.stop();
    const out = execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', source.file, targetFile], { encoding: 'utf8' });
    expect(out).toContain('Images are identical');
  });

  it('resumes after the link resets and stalls mid-resync instead of starting over', async () => {
    const dir = tmp();
    const targetFile = path.join(dir, 'target.img');
    const { mt, ps, stop } = await startHops(dir, `raw:${targetFile}`);
    cleanup.push(stop);
    const source = await startSource(dir, ps.url);
    cleanup.push(() => source.close());
    const proxy = new FaultProxy(Number(new URL(ps.url).port));
    await proxy.listen();
    cleanup.push(() => proxy.close());
    const rand = prng(11);
    const w0 = randomWrite(rand);
    await source.write(w0.offset, w0.data);
    await source.cut();
    await source.shipper.whenIdle();
    await ps.drain();
    await mt.drain();
    // Every 4 KiB block of the disk differs from the target.
    const noise = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i += 4) noise.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
    source.writeUntracked(0, noise);

    const faults: string[] = [];
    let injected = 0;
    // The channel keeps connections alive: a fault also cuts the ones open now, as a real link failure does.
    const cutOpenConnections = (): void => {
      for (const socket of (proxy as unknown as { sockets: Set<import('node:net').Socket> }).sockets) socket.resetAndDestroy();
    };
    const result = await networkedResync(source.spec, {
      peer: { url: proxy.url, secret: SECRET, timeoutMs: 1_000 },
      diskId: 'disk0',
      statePath: path.join(dir, 'resync.state'),
      cut: () => source.cut(),
      retryPolicy: FAST_RETRY,
      checkpointIntervalMs: 0,
      concurrency: 2,
      progressIntervalMs: 0,
      onProgress: (p) => {
        // A reset in the middle of a request body, later a stall until the timeout.
        if (injected === 0 && p.bytesDone >= SIZE / 4) {
          injected++;
          proxy.mode = { kind: 'reset-after', bytes: 64 * 1024 };
          cutOpenConnections();
          setTimeout(() => (proxy.mode = { kind: 'pass' }), 150);
        } else if (injected === 1 && p.bytesDone >= (SIZE * 3) / 4) {
          injected++;
          proxy.mode = { kind: 'stall' };
          cutOpenConnections();
          setTimeout(() => (proxy.mode = { kind: 'pass' }), 300);
        }
      },
      onRetry: (e) => faults.push(e.error.code),
    });
    expect(injected).toBe(2);
    expect(result.attempts).toBeGreaterThanOrEqual(3);
    expect(faults.every((c) => ['BR_NET_UNREACHABLE', 'BR_NET_TIMEOUT', 'BR_RESYNC_SESSION_EXPIRED', 'BR_RESYNC_NOT_READY'].includes(c))).toBe(true);
    // The last attempt started from saved progress, past the second fault's point...
    expect(result.resumedFromBytes).toBeGreaterThan(SIZE / 2);
    // ...and over all attempts about one pass over the disk was compared and sent, not several.
    expect(result.totals.blocksCompared * 4096).toBeLessThan(SIZE * 1.5);
    expect(result.totals.blocksSent * 4096).toBeLessThan(SIZE * 1.5);
    expect(result.blocksCompared * 4096).toBeLessThanOrEqual(SIZE - result.resumedFromBytes);

    await source.cut();
    await source.shipper.whenIdle();
    await ps.drain();
    await mt.drain();
    await mt.stop();
    expect(fs.readFileSync(targetFile).equals(fs.readFileSync(source.file))).toBe(true);
  });
});
