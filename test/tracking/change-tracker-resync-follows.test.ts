import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { parseSidecar, parseTrackerState } from '../../src/tracking/tracker-files';
import { pattern } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';

const SIZE = 4 * 1024 * 1024;
const CHUNK = 64 * 1024;

const open = (dir: string) => ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: SIZE, overflowRatio: 0.25, persistIntervalMs: 0 });
const zeroes = async (_offset: number, length: number): Promise<Buffer> => Buffer.alloc(length);
/** More than a quarter of the disk unshipped: the tracker folds every log. */
async function overflow(tracker: ChangeTracker, seed: number): Promise<void> {
  for (let i = 0; i < 20; i++) await tracker.recordWrite(i * CHUNK, pattern(seed + i, CHUNK));
}

/**
 * A resync log names the sequence it follows (sent as the envelope's
 * `follows`): the newest log before it that the source did not fold, so a
 * receiver admits it past a gap only when the gap is the folded logs.
 */
describe('ChangeTracker: the sequence a resync log follows', () => {
  const tmp = useTempDirs();

  it('is the log a resync round seals right before it, also while an earlier resync log is unshipped', async () => {
    const tracker = await open(tmp());
    await tracker.recordWrite(0, pattern(1, CHUNK));
    await tracker.recordWrite(SIZE / 2, pattern(2, CHUNK));
    await tracker.completeResync(await tracker.beginResync()); // nothing to resync yet
    // Mark some extents for resync the way a torn tail would: through an overflow, then log again.
    await overflow(tracker, 10);
    await tracker.beginResync();
    await tracker.recordWrite(0, pattern(3, CHUNK));
    const first = await tracker.resyncRound(zeroes, CHUNK);
    expect(first!.log.resync).toBe(true);
    const before = tracker.sealedLogs().filter((l) => l.sequence < first!.log.sequence);
    expect(first!.log.follows).toBe(before[before.length - 1]!.sequence);
    expect(first!.log.follows).toBe(first!.log.sequence - 1);
    await tracker.recordWrite(CHUNK, pattern(4, CHUNK));
    const second = await tracker.resyncRound(zeroes, CHUNK);
    expect(second!.log.follows).toBe(second!.log.sequence - 1);
    // The sidecar keeps it, so it survives a restart of the source.
    const sidecar = JSON.parse(fs.readFileSync(second!.log.sidecarPath, 'utf8')) as { follows?: number };
    expect(sidecar.follows).toBe(second!.log.sequence - 1);
    await tracker.close();
  });

  it('after a fold is the newest log acknowledged, never a folded one, across a restart of the source', async () => {
    const dir = tmp();
    const tracker = await open(dir);
    await tracker.recordWrite(0, pattern(1, CHUNK));
    const [shipped] = await ChangeTracker.cut([tracker]);
    await tracker.recordWrite(CHUNK, pattern(2, CHUNK));
    const [folded] = await ChangeTracker.cut([tracker]);
    expect(await tracker.acknowledge(shipped!.name)).toBe(true);
    await overflow(tracker, 20);
    expect(tracker.status().mode).toBe('dirty-only');
    expect(tracker.sealedLogs()).toEqual([]);
    await tracker.close();

    const reopened = await open(dir);
    const round = await reopened.resyncRound(zeroes, CHUNK);
    expect(round!.log.sequence).toBeGreaterThan(folded!.sequence + 1);
    expect(round!.log.follows).toBe(shipped!.sequence);
    // The next round follows the log sealed right before it.
    await reopened.recordWrite(0, pattern(3, CHUNK));
    const next = await reopened.resyncRound(zeroes, CHUNK);
    expect(next!.log.follows).toBe(next!.log.sequence - 1);
    await reopened.close();
  });

  it('moves to the newest log acknowledged when a fold drops the log it named while the round reads', async () => {
    const tracker = await open(tmp());
    await tracker.recordWrite(0, pattern(1, CHUNK));
    const [shipped] = await ChangeTracker.cut([tracker]);
    await tracker.acknowledge(shipped!.name);
    await overflow(tracker, 30);
    await tracker.beginResync();
    await tracker.recordWrite(0, pattern(2, CHUNK));
    let folds = false;
    const round = await tracker.resyncRound(async (offset, length) => {
      if (!folds) {
        folds = true;
        // The log the round sealed (its predecessor) is folded while the round reads.
        await overflow(tracker, 40);
        expect(tracker.status().mode).toBe('dirty-only');
      }
      return Buffer.alloc(length, offset & 0xff);
    }, CHUNK);
    expect(round!.log.follows).toBe(shipped!.sequence);
    await tracker.close();
  });

  it('is worked out at open for a held sequence from a state file written before `follows` was kept', async () => {
    const dir = tmp();
    const tracker = await open(dir);
    await overflow(tracker, 50);
    await tracker.beginResync();
    await tracker.recordWrite(0, pattern(2, CHUNK));
    void tracker.resyncRound(() => new Promise<Buffer>(() => undefined), CHUNK);
    const stateFile = path.join(dir, 'disk0.tracker.json');
    type State = { reservations?: Array<{ sequence: number; follows?: number }>; shippedSequence?: number };
    const readState = (): State => JSON.parse(fs.readFileSync(stateFile, 'utf8')) as State;
    // The round holds its sequence (state written) before it reads, which
    // never ends here; on a loaded machine that takes a while, so wait for it.
    let state = readState();
    for (let waitedMs = 0; (state.reservations?.length ?? 0) === 0 && waitedMs < 10_000; waitedMs += 20) {
      await new Promise((r) => setTimeout(r, 20));
      state = readState();
    }
    const held = state.reservations![0]!;
    expect(held.follows).toBe(held.sequence - 1);
    delete held.follows;
    delete state.shippedSequence;
    fs.writeFileSync(stateFile, JSON.stringify(state));
    const reopened = await open(dir);
    const filled = reopened.sealedLogs().find((l) => l.sequence === held.sequence)!;
    expect(filled.resync).toBe(true);
    expect(filled.follows).toBe(held.sequence - 1);
    await reopened.close();
  });
});

describe('tracker files: follows and shippedSequence', () => {
  const sidecar = { version: 1, diskId: 'disk0', sequence: 9, uniqueId: 'u', previousUniqueId: 'p', sizeBytes: 1, entryCount: 0, cutId: 'c', cutTime: 't', cutTimeMs: 1, recovered: false };
  const state = { version: 1, diskId: 'disk0', diskSizeBytes: SIZE, granularityBytes: 4096, mode: 'logging', nextSequence: 10, lastUniqueId: 'u', activeSequence: null };

  it('reads them, and refuses a follows that is not an earlier sequence of a resync log', () => {
    expect(parseSidecar({ ...sidecar, resync: true, follows: 8 }, 'f').follows).toBe(8);
    for (const bad of [{ resync: true, follows: 9 }, { resync: true, follows: -1 }, { follows: 8 }, { resync: true, follows: '8' }]) {
      expect(() => parseSidecar({ ...sidecar, ...bad }, 'f')).toThrow(expect.objectContaining({ code: 'BR_TRACKER_STATE_CORRUPT' }));
    }
    expect(parseTrackerState({ ...state, shippedSequence: 7, reservations: [{ sequence: 9, uniqueId: 'a', previousUniqueId: 'b', follows: 7 }] }, 'f')).toMatchObject({ shippedSequence: 7, reservations: [{ follows: 7 }] });
    expect(parseTrackerState(state, 'f').shippedSequence).toBeUndefined();
    expect(() => parseTrackerState({ ...state, reservations: [{ sequence: 9, uniqueId: 'a', previousUniqueId: 'b', follows: 9 }] }, 'f')).toThrow(expect.objectContaining({ code: 'BR_TRACKER_STATE_CORRUPT' }));
    expect(() => parseTrackerState({ ...state, shippedSequence: -2 }, 'f')).toThrow(expect.objectContaining({ code: 'BR_TRACKER_STATE_CORRUPT' }));
  });
});

describe('ChangeTracker: a resync log sealed before follows was kept', () => {
  const tmp = useTempDirs();

  it('follows the sealed log before it after a restart; without one and without shippedSequence it goes without', async () => {
    const dir = tmp();
    const tracker = await open(dir);
    await overflow(tracker, 60);
    // In dirty-only mode the first round seals no log before its own: after the fold it comes first.
    const first = await tracker.resyncRound(zeroes, CHUNK);
    await tracker.recordWrite(0, pattern(2, CHUNK));
    const round = await tracker.resyncRound(zeroes, CHUNK);
    expect(first!.log.follows).toBe(0);
    await tracker.close();
    // Strip what an older version did not write.
    for (const log of [round!.log, first!.log]) {
      const sidecar = JSON.parse(fs.readFileSync(log.sidecarPath, 'utf8')) as { follows?: number };
      delete sidecar.follows;
      fs.writeFileSync(log.sidecarPath, JSON.stringify(sidecar));
    }
    const stateFile = path.join(dir, 'disk0.tracker.json');
    const state = JSON.parse(fs.readFileSync(stateFile, 'utf8')) as { shippedSequence?: number };
    delete state.shippedSequence;
    fs.writeFileSync(stateFile, JSON.stringify(state));
    const reopened = await open(dir);
    const logs = reopened.sealedLogs();
    const sequences = logs.map((l) => l.sequence);
    // The round's log follows the log the round sealed before it, still here.
    expect(logs.find((l) => l.sequence === round!.log.sequence)!.follows).toBe(sequences[sequences.indexOf(round!.log.sequence) - 1]);
    // The oldest log here, a resync log after the fold: nothing known to follow, so none.
    expect(logs[0]!.resync).toBe(true);
    expect(logs[0]!.follows).toBeUndefined();
    await reopened.close();
  });
});
