import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { systemClock } from '../../src/platform/clock';
import { DiskHealth } from '../../src/retry/health';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { LogShipper } from '../../src/transport/log-shipper';
import { trackerShippingSource } from '../../src/transport/tracker-shipping';
import { useTempDirs } from '../helpers/tmp';
import { FAST_RETRY, prng, quiet, SECRET, startHops } from './transport-fixture';

const SIZE = 16 * 1024 * 1024;

describe('source -> process server -> master target', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it('ships tracked writes cut by cut; the target equals the source and acknowledged logs are deleted', async () => {
    const dir = tmp();
    const { mt, ps, stop } = await startHops(dir);
    cleanup.push(stop);

    const tracker = await ChangeTracker.open({ dir: path.join(dir, 'logs'), diskId: 'disk0', diskSizeBytes: SIZE, persistIntervalMs: 0 });
    cleanup.push(() => tracker.close());
    const shipper = new LogShipper(trackerShippingSource(tracker), { peer: { url: ps.url, secret: SECRET }, clock: systemClock, ...quiet(), health: new DiskHealth('disk0'), retryPolicy: FAST_RETRY });
    shipper.start();
    cleanup.push(() => shipper.stop());

    const model = Buffer.alloc(SIZE);
    const rand = prng(42);
    for (let cut = 0; cut < 5; cut++) {
      for (let i = 0; i < 40; i++) {
        const len = (1 + Math.floor(rand() * 16)) * 512;
        const off = Math.floor(rand() * ((SIZE - len) / 512)) * 512;
        const data = Buffer.alloc(len, Math.floor(rand() * 256));
        await tracker.recordWrite(off, data);
        data.copy(model, off);
      }
      await ChangeTracker.cut([tracker]);
      shipper.wake();
    }
    await shipper.whenIdle();
    await ps.drain();
    await mt.drain();
    expect(tracker.sealedLogs()).toEqual([]);
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    expect(mt.diskStatus()[0]).toMatchObject({ health: 'OK', pendingLogs: 0 });
  });
});

describe('source -> process server -> master target after an overflow', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it('resyncs the folded extents through the log stream and converges, writes going on meanwhile', async () => {
    const dir = tmp();
    const { mt, ps, stop } = await startHops(dir);
    cleanup.push(stop);

    const model = Buffer.alloc(SIZE);
    const tracker = await ChangeTracker.open({ dir: path.join(dir, 'logs'), diskId: 'disk0', diskSizeBytes: SIZE, persistIntervalMs: 0, overflowRatio: 0.25 });
    cleanup.push(() => tracker.close());
    const { SourceShipping } = await import('../../src/transport/source-shipping');
    const shipping = new SourceShipping({
      trackers: new Map([['disk0', tracker]]),
      peer: { url: ps.url, secret: SECRET },
      clock: systemClock,
      ...quiet(),
      retryPolicy: FAST_RETRY,
      readers: new Map([['disk0', async (offset: number, length: number) => Buffer.from(model.subarray(offset, offset + length))]]),
      resyncCheckMs: 50,
      resyncRoundMaxBytes: 1024 * 1024,
    });
    shipping.start();
    cleanup.push(() => shipping.stop());

    const rand = prng(77);
    const write = async (off: number, data: Buffer): Promise<void> => {
      data.copy(model, off);
      await tracker.recordWrite(off, data);
    };
    // Phase 1: ordinary logs.
    for (let i = 0; i < 20; i++) await write(Math.floor(rand() * (SIZE / 4096 - 4)) * 4096, Buffer.alloc(16384, 1 + i));
    await ChangeTracker.cut([tracker]);
    shipping.sealed();
    // Phase 2: a burst larger than a quarter of the disk before any cut: overflow.
    for (let i = 0; i < 80; i++) await write(Math.floor(rand() * (SIZE / 65536 - 1)) * 65536, Buffer.alloc(65536, 100 + (i % 100)));
    expect(tracker.status().resyncRequired).toBe(true);
    // Phase 3: writes go on while resync rounds run.
    for (let i = 0; i < 30; i++) {
      await write(Math.floor(rand() * (SIZE / 4096 - 1)) * 4096, Buffer.alloc(4096, 200 + (i % 50)));
      if (i % 10 === 9) {
        await ChangeTracker.cut([tracker]);
        shipping.sealed();
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    const deadline = Date.now() + 60_000;
    while (tracker.status().resyncRequired) {
      if (Date.now() > deadline) throw new Error('resync did not finish');
      await new Promise((r) => setTimeout(r, 50));
    }
    await ChangeTracker.cut([tracker]);
    shipping.sealed();
    await shipping.drain();
    await ps.drain();
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    expect(mt.diskStatus()[0]).toMatchObject({ health: 'OK' });
    expect(shipping.status()[0]).toMatchObject({ health: 'OK', resyncRequired: false });
  }, 120_000);
});
