import { describe, expect, it } from 'vitest';
import type { NativeTapExport } from '../../src/platform/native';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { useTempDirs } from '../helpers/tmp';

/** Stands in for the addon's TapExport: counts holds the way it does (created held once). */
class CountingExport implements NativeTapExport {
  holds = 1;
  hold(): Promise<Float64Array> {
    this.holds++;
    return Promise.resolve(new Float64Array(0));
  }
  release(): void {
    this.holds--;
  }
  drain(): Float64Array {
    return new Float64Array(0);
  }
  setDurableRegions(): void {}
  attention(): Float64Array {
    return new Float64Array([0, 0]);
  }
  close(): void {}
}

/** Holds end asynchronously (a resume takes the lock once more first): waits for the count to settle. */
async function settledHolds(exp: CountingExport): Promise<number> {
  for (let i = 0; i < 100 && exp.holds !== 0; i++) await new Promise((r) => setTimeout(r, 10));
  return exp.holds;
}

describe('ChangeTracker.attachNative', () => {
  const tmp = useTempDirs();

  async function open(): Promise<ChangeTracker> {
    return ChangeTracker.open({ dir: tmp(), diskId: 'disk0', diskSizeBytes: 64 * 1024 * 1024, persistIntervalMs: 0 });
  }

  it('lets the export go when nothing holds the lock', async () => {
    const t = await open();
    const exp = new CountingExport();
    t.attachNative(exp);
    expect(exp.holds).toBe(0);
    await t.flush();
    expect(await settledHolds(exp)).toBe(0);
    t.detachNative(exp);
    await t.close();
  });

  it('leaves no hold behind when an operation was only waiting for the lock as the export attached', async () => {
    const t = await open();
    const exp = new CountingExport();
    // The flush has asked for the lock; its turn comes a few microtasks later.
    const flushing = t.flush();
    t.attachNative(exp);
    await flushing;
    expect(await settledHolds(exp)).toBe(0);
    t.detachNative(exp);
    await t.close();
  });

  it('hands the creation hold to an operation holding the lock, which lets it go when it ends', async () => {
    const t = await open();
    const exp = new CountingExport();
    let attachedWhileHeld = -1;
    // A cut holds the lock over awaits; attach from inside it by racing a microtask loop.
    const cutting = t.flush();
    await Promise.resolve();
    await Promise.resolve();
    t.attachNative(exp);
    attachedWhileHeld = exp.holds;
    await cutting;
    expect(attachedWhileHeld).toBeGreaterThanOrEqual(0);
    expect(await settledHolds(exp)).toBe(0);
    t.detachNative(exp);
    await t.close();
  });
});
