import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { loadNativeTap, type NativeTapExport } from '../../src/platform/native';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { HrlWriter } from '../../src/tracking/hrl-writer';
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
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** A CountingExport that keeps the overflow limit the tracker hands the writers at each release. */
class LimitRecordingExport extends CountingExport {
  readonly limits: number[] = [];
  override release(...args: unknown[]): void {
    this.limits.push(args[2] as number);
    super.release();
  }
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

describe('ChangeTracker.flush with the native tap attached', () => {
  const tmp = useTempDirs();

  it('lets the native writers run through the log flush, whether or not idle intents are cleared', async () => {
    const native = loadNativeTap();
    if (native === undefined) throw new Error('the addon is built for the tests');
    const dir = tmp();
    const diskSizeBytes = 64 * 1024 * 1024;
    const diskFd = fs.openSync(path.join(dir, 'disk.img'), 'w+');
    fs.ftruncateSync(diskFd, diskSizeBytes);
    const t = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes, persistIntervalMs: 0, intentIdleClearMs: 0 });
    // The real export, its holds counted on the way through.
    const real = new native.TapExport(diskFd, diskSizeBytes, 512, 32 << 20, true, () => t.onNativeNotify());
    let holds = 1;
    let durableSets = 0;
    const exp: NativeTapExport = {
      hold: () => {
        holds++;
        return real.hold();
      },
      release: (...args) => {
        holds--;
        real.release(...args);
      },
      drain: () => real.drain(),
      setDurableRegions: (r) => {
        durableSets++;
        real.setDurableRegions(r);
      },
      attention: () => real.attention(),
      close: () => real.close(),
    };
    const heldAtLogFlush: number[] = [];
    const logFlush = HrlWriter.prototype.flush;
    const spy = vi.spyOn(HrlWriter.prototype, 'flush').mockImplementation(function (this: HrlWriter) {
      heldAtLogFlush.push(holds);
      return logFlush.call(this);
    });
    try {
      t.attachNative(exp);
      const setsAtAttach = durableSets;
      await t.recordWrite(0, Buffer.alloc(4096, 1));
      // An intent to clear at the next persists (intentIdleClearMs 0), then none.
      await t.intend(1 << 20, 4096);
      await t.flush();
      await t.flush();
      await t.flush();
      expect(heldAtLogFlush).toEqual([0, 0, 0]);
      expect(durableSets, 'one persist cleared the idle intent (under its own short hold)').toBeGreaterThan(setsAtAttach);
      expect(await settledHoldCount(() => holds)).toBe(0);
    } finally {
      spy.mockRestore();
      t.detachNative(exp);
      await t.close();
      await real.close();
      fs.closeSync(diskFd);
    }
  });
});

async function settledHoldCount(count: () => number): Promise<number> {
  for (let i = 0; i < 100 && count() !== 0; i++) await new Promise((r) => setTimeout(r, 10));
  return count();
}

describe('ChangeTracker.acknowledge with the native tap attached', () => {
  const tmp = useTempDirs();

  it('hands the native writers an overflow limit that counts the room the acknowledged log frees', async () => {
    const diskSizeBytes = 64 * 1024 * 1024;
    const t = await ChangeTracker.open({ dir: tmp(), diskId: 'disk0', diskSizeBytes, persistIntervalMs: 0, overflowRatio: 1 });
    await t.recordWrite(0, Buffer.alloc(4 << 20, 1));
    const sealed = await t.rotate();
    expect(sealed!.sizeBytes).toBeGreaterThan(4 << 20);
    const exp = new LimitRecordingExport();
    const limits = exp.limits;
    t.attachNative(exp);
    expect(limits.at(-1)).toBe(diskSizeBytes - sealed!.sizeBytes);
    expect(await t.acknowledge(sealed!.name)).toBe(true);
    expect(await settledHolds(exp)).toBe(0);
    // Nothing later refreshes it while the writers run unheld: the last limit
    // must already count the deleted log (else a native write near the limit
    // raises attention and waits for a fold check that has nothing to fold).
    expect(limits.at(-1)).toBe(diskSizeBytes);
    t.detachNative(exp);
    await t.close();
  });

  it('after a failed state write counts the log in the limit again, and a retried acknowledgement writes the state', async () => {
    const dir = tmp();
    const diskSizeBytes = 64 * 1024 * 1024;
    const t = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes, persistIntervalMs: 0, overflowRatio: 1 });
    await t.recordWrite(0, Buffer.alloc(4 << 20, 1));
    const sealed = await t.rotate();
    const exp = new LimitRecordingExport();
    const limits = exp.limits;
    t.attachNative(exp);
    // The state file's name taken by a non-empty directory: the rename that
    // replaces it fails (a real failed state write, after the writers went).
    const statePath = path.join(dir, 'disk0.tracker.json');
    fs.rmSync(statePath);
    fs.mkdirSync(path.join(statePath, 'blocker'), { recursive: true });
    await expect(t.acknowledge(sealed!.name)).rejects.toMatchObject({ code: 'BR_IO' });
    expect(await settledHolds(exp)).toBe(0);
    expect(t.sealedLogs().map((l) => l.name)).toEqual([sealed!.name]);
    expect(limits.at(-1), 'the log still listed is counted again').toBe(diskSizeBytes - sealed!.sizeBytes);

    fs.rmSync(statePath, { recursive: true });
    expect(await t.acknowledge(sealed!.name)).toBe(true);
    const state = JSON.parse(fs.readFileSync(statePath, 'utf8')) as { shippedSequence?: number };
    expect(state.shippedSequence, 'the retry wrote the state before deleting the log').toBe(sealed!.sequence);
    expect(fs.existsSync(sealed!.path)).toBe(false);
    expect(await settledHolds(exp)).toBe(0);
    expect(limits.at(-1)).toBe(diskSizeBytes);
    t.detachNative(exp);
    await t.close();
  });
});
