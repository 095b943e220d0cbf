import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { systemClock } from '../../src/platform/clock';
import { DiskHealth } from '../../src/retry/health';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { HELD_LOG_ALLOCATION_STEP_BYTES, LogMemory } from '../../src/transport/held-log';
import { LogShipper } from '../../src/transport/log-shipper';
import { trackerShippingSource } from '../../src/transport/tracker-shipping';
import { useTempDirs } from '../helpers/tmp';
import { FAST_RETRY, prng, quiet, SECRET, startHops } from './transport-fixture';

const SIZE = 16 * 1024 * 1024;

describe('source shipper holding sealed logs in memory', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void> | void> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it('reads each sealed log once into its budget, sends it from there, converges, and gives all memory back', async () => {
    const dir = tmp();
    const { mt, ps, stop } = await startHops(dir);
    cleanup.push(stop);
    const tracker = await ChangeTracker.open({ dir: path.join(dir, 'logs'), diskId: 'disk0', diskSizeBytes: SIZE, persistIntervalMs: 0 });
    cleanup.push(() => tracker.close());
    const memory = new LogMemory(HELD_LOG_ALLOCATION_STEP_BYTES);
    let peakBytes = 0;
    const shipper = new LogShipper(trackerShippingSource(tracker), {
      peer: { url: ps.url, secret: SECRET },
      clock: systemClock,
      ...quiet(),
      health: new DiskHealth('disk0'),
      retryPolicy: FAST_RETRY,
      memory,
      onStage: () => {
        peakBytes = Math.max(peakBytes, memory.heldBytes);
      },
    });
    shipper.start();
    cleanup.push(() => shipper.stop());
    const model = Buffer.alloc(SIZE);
    const rand = prng(43);
    for (let cut = 0; cut < 6; cut++) {
      for (let i = 0; i < 40; i++) {
        const len = (1 + Math.floor(rand() * 16)) * 512;
        const off = Math.floor(rand() * ((SIZE - len) / 512)) * 512;
        const data = Buffer.alloc(len);
        for (let j = 0; j < len; j++) data[j] = Math.floor(rand() * 256);
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
    // The budget was used (one buffer, reused: the bound holds one log at a time) and nothing stays held.
    expect(memory.allocations).toBe(1);
    expect(peakBytes).toBeLessThanOrEqual(HELD_LOG_ALLOCATION_STEP_BYTES);
    expect(shipper.heldLogs()).toEqual({ logs: 0, bytes: 0 });
  });
});
