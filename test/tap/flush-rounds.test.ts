import { describe, expect, it } from 'vitest';
import { FlushRounds } from '../../src/tap/flush-rounds';
import * as P from '../../src/tap/nbd-protocol';
import { useTempDirs } from '../helpers/tmp';
import { nativeTap, peer, useCleanups } from './native-tap-fixtures';
import { rawHandshake, readSimpleReply, request } from './nbd-fixtures';

const tempDir = useTempDirs();
const cleanups = useCleanups();

/** A sync that waits until the test lets it finish, counting how often it started. */
function gatedSync(): { sync: () => Promise<void>; started: () => number; finish: () => void } {
  let started = 0;
  let gates: (() => void)[] = [];
  return {
    sync: () => {
      started++;
      return new Promise<void>((r) => gates.push(r));
    },
    started: () => started,
    finish: () => {
      const open = gates;
      gates = [];
      for (const g of open) g();
    },
  };
}

const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 5));

describe('FlushRounds', () => {
  it('answers every flush asked while a sync runs with one more sync, started after them', async () => {
    const g = gatedSync();
    const rounds = new FlushRounds(g.sync);
    const first = rounds.flush();
    await tick();
    expect(g.started()).toBe(1);
    const later = [rounds.flush(), rounds.flush(), rounds.flush()];
    expect(new Set(later).size).toBe(1);
    expect(later[0]).not.toBe(first);
    let laterDone = false;
    void later[0]!.then(() => { laterDone = true; });
    // The running sync may have started before their writes: it answers none of them.
    g.finish();
    await first;
    await tick();
    expect(laterDone).toBe(false);
    expect(g.started()).toBe(2);
    g.finish();
    await Promise.all(later);
    expect(rounds.rounds).toBe(2);
    // Idle again: the next flush starts a round of its own at once.
    const next = rounds.flush();
    await tick();
    expect(g.started()).toBe(3);
    g.finish();
    await next;
  });

  it('lets a failed sync fail only the flushes it answered', async () => {
    let calls = 0;
    const rounds = new FlushRounds(async () => {
      if (++calls === 1) throw new Error('EIO');
    });
    const failing = rounds.flush();
    const after = rounds.flush();
    await expect(failing).rejects.toThrow('EIO');
    await expect(after).resolves.toBeUndefined();
    expect(rounds.rounds).toBe(2);
  });
});

describe('native tap FLUSHes in flight together', () => {
  it('share disk and tracker sync rounds instead of one round each', async () => {
    const t = await nativeTap(tempDir(), cleanups);
    const p = await peer(t.port, cleanups);
    await rawHandshake(p, 'disk0');
    const exp = t.server.findExport('disk0')!;
    const diskBefore = exp.diskFlushes!.rounds;
    const trackerBefore = t.tracker.status().flushRounds;
    const n = 8;
    const requests: Buffer[] = [];
    for (let i = 0; i < n; i++) {
      requests.push(request(P.NBD_CMD_WRITE, i * 4096, 4096, 100 + i, { payload: Buffer.alloc(4096, i + 1) }));
      requests.push(request(P.NBD_CMD_FLUSH, 0, 0, 200 + i));
    }
    p.send(Buffer.concat(requests));
    const handles = new Set<number>();
    for (let i = 0; i < 2 * n; i++) {
      const r = await readSimpleReply(p);
      expect(r.error).toBe(0);
      handles.add(r.handle);
    }
    expect(handles.size).toBe(2 * n);
    const diskRounds = exp.diskFlushes!.rounds - diskBefore;
    const trackerRounds = t.tracker.status().flushRounds - trackerBefore;
    // One round each would be 8; the flushes that arrive while one runs share the next.
    expect(diskRounds).toBeGreaterThanOrEqual(1);
    expect(diskRounds).toBeLessThan(n);
    expect(trackerRounds).toBeLessThan(n);
  });
});
