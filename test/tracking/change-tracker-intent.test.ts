import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { CHANGE_TRACKER_DEFAULTS, ChangeTracker, WRITE_INTENT_REGION_BYTES } from '../../src/tracking/change-tracker';
import { NbdClient } from '../../src/tap/nbd-client';
import { useTempDirs } from '../helpers/tmp';
import { startTap } from '../tap/nbd-fixtures';

const R = WRITE_INTENT_REGION_BYTES;
const SIZE = 8 * R;

/** Trackers opened by a test; those it leaves open on purpose (a simulated crash) are closed after it, not left to the garbage collector. */
const opened: ChangeTracker[] = [];
afterEach(async () => {
  for (const t of opened.splice(0)) await t.close({ seal: false }).catch(() => undefined);
});

async function open(dir: string, options: { intentIdleClearMs?: number; clock?: SimulatedClock } = {}): Promise<ChangeTracker> {
  const t = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: SIZE, persistIntervalMs: 0, ...options });
  opened.push(t);
  return t;
}

function resyncExtents(t: ChangeTracker): Array<[number, number]> {
  return [...t.resyncExtents()].map((e) => [e.offset / R, e.length / R]);
}

describe('write intent', () => {
  const tmp = useTempDirs();

  it('makes the first write into a region wait for a durable mark, and later ones not', async () => {
    const dir = tmp();
    const t = await open(dir);
    await t.recordWrite(R + 4096, Buffer.alloc(4096, 1));
    const first = t.intend(R + 4096, 4096);
    expect(first).toBeInstanceOf(Promise);
    await first;
    expect(t.intend(R + 8192, 4096)).toBeUndefined();
    // A write spanning into an unmarked region waits again.
    expect(t.intend(2 * R - 4096, 8192)).toBeInstanceOf(Promise);
    await t.close();
  });

  it('resyncs exactly the intended regions after an unclean stop, nothing after a clean one', async () => {
    const dir = tmp();
    const t = await open(dir);
    // Intended and on the disk, but the process dies before any flush or persist.
    await t.recordWrite(3 * R + 512, Buffer.alloc(4096, 7));
    await t.intend(3 * R + 512, 4096);
    await t.recordWrite(6 * R, Buffer.alloc(4096, 8));
    await t.intend(6 * R, 4096);
    // "Crash": a second tracker opens the same directory without the first closing.
    const after = await open(dir);
    expect(resyncExtents(after)).toEqual([[3, 1], [6, 1]]);
    expect(after.status().lastResyncReason).toBe('write-intent');
    await after.close();
    const clean = await open(dir);
    // The regions are still owed a resync (kept in the maps), but the intent file is empty again.
    expect(resyncExtents(clean)).toEqual([[3, 1], [6, 1]]);
    const snapshot = await clean.beginResync();
    await clean.completeResync(snapshot);
    await clean.close();
    const again = await open(dir);
    expect(resyncExtents(again)).toEqual([]);
    await again.close();
  });

  it('clears a region once its writes are in persisted maps and it stayed idle for a persist', async () => {
    // Without the idle window (intentIdleClearMs 0), one idle persist is the rule.
    // One persist is not enough: the region may still be busy.
    const busy = tmp();
    const b = await open(busy, { intentIdleClearMs: 0 });
    await b.recordWrite(2 * R, Buffer.alloc(4096, 3));
    await b.intend(2 * R, 4096);
    await b.flush();
    const crashedBusy = await open(busy);
    expect(resyncExtents(crashedBusy)).toEqual([[2, 1]]);
    await crashedBusy.close();

    // Idle across a second persist: the mark is dropped and nothing is owed after a crash.
    const idle = tmp();
    const t = await open(idle, { intentIdleClearMs: 0 });
    await t.recordWrite(2 * R, Buffer.alloc(4096, 3));
    await t.intend(2 * R, 4096);
    await t.flush();
    await t.flush();
    const crashedIdle = await open(idle);
    expect(resyncExtents(crashedIdle)).toEqual([]);
    await crashedIdle.close();
  });

  it('keeps a region marked until it has been idle for the idle window, so a region written every few cuts is not re-marked', async () => {
    const clock = new SimulatedClock();
    const window = CHANGE_TRACKER_DEFAULTS.intentIdleClearMs;
    const dir = tmp();
    const t = await open(dir, { clock });
    await t.recordWrite(2 * R, Buffer.alloc(4096, 3));
    await t.intend(2 * R, 4096);
    // Cuts every 250 ms for most of the window: still marked, so the next write there needs no fsync.
    for (let elapsed = 0; elapsed < window - 500; elapsed += 250) {
      await clock.advance(250);
      await t.flush();
    }
    expect(t.intend(2 * R + 8192, 4096)).toBeUndefined();
    await t.recordWrite(2 * R + 8192, Buffer.alloc(4096, 4));
    // Idle from here: marked until the window has passed since that write's persist, then cleared.
    await t.flush();
    await clock.advance(window - 250);
    await t.flush();
    expect(await crashOpen(dir)).toEqual([[2, 1]]);
    await clock.advance(500);
    await t.flush();
    expect(await crashOpen(dir)).toEqual([]);
    expect(t.intend(2 * R, 4096)).toBeInstanceOf(Promise);
    await t.close();

    /** What a crash right now would leave owed: a second tracker's view of the directory. */
    async function crashOpen(d: string): Promise<Array<[number, number]>> {
      const copy = tmp();
      for (const name of fs.readdirSync(d)) fs.copyFileSync(path.join(d, name), path.join(copy, name));
      const after = await open(copy);
      try {
        return resyncExtents(after);
      } finally {
        await after.close();
      }
    }
  });

  it('holds a write back from the disk until its intent is durable (through the NBD tap)', async () => {
    const dir = tmp();
    const tap = await startTap(dir, { sizeBytes: 4 * 1024 * 1024 });
    let allow!: () => void;
    const gate = new Promise<void>((resolve) => { allow = resolve; });
    (tap.recorder as unknown as { intend: (o: number, l: number) => Promise<void> | undefined }).intend = () => gate;
    const client = await NbdClient.connect({ host: '127.0.0.1', port: tap.port, exportName: 'disk0' });
    try {
      const writing = client.write(8192, Buffer.alloc(4096, 0xee));
      await new Promise((r) => setTimeout(r, 150));
      expect(fs.readFileSync(tap.imagePath).subarray(8192, 8192 + 4096).every((b) => b === 0)).toBe(true);
      expect(tap.recorder.records.length).toBe(1);
      allow();
      await writing;
      expect(fs.readFileSync(tap.imagePath).subarray(8192, 8192 + 4096).every((b) => b === 0xee)).toBe(true);
    } finally {
      await client.close();
      await tap.close();
    }
  });
});
