import * as fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { parseSidecar } from '../../src/tracking/tracker-files';
import { useTempDirs } from '../helpers/tmp';
import { pattern } from '../helpers/prng';

const SIZE = 4 * 1024 * 1024;
const CHUNK = 64 * 1024;

const zeroes = async (_offset: number, length: number): Promise<Buffer> => Buffer.alloc(length);

/**
 * Review s6, V7: ordinary logs sealed between the rounds of a log-stream
 * resync were recorded as selectable crash points, while the replica at
 * their end still held pre-overflow data in the extents later rounds bring.
 * Such a log is now marked `tainted` in its sidecar (sent as the envelope's
 * `tainted`), until the resync owes nothing.
 */
describe('ChangeTracker: logs sealed while a resync is owed', () => {
  const tmp = useTempDirs();

  it('are tainted from the overflow until the last round, and only then', async () => {
    const tracker = await ChangeTracker.open({ dir: tmp(), diskId: 'disk0', diskSizeBytes: SIZE, overflowRatio: 0.25, persistIntervalMs: 0 });
    try {
      await tracker.recordWrite(0, pattern(1, CHUNK));
      const [clean] = await ChangeTracker.cut([tracker]);
      expect(clean!.tainted).toBeUndefined();
      // More than a quarter of the disk unshipped: the tracker folds everything into its resync map.
      for (let i = 0; i < 20; i++) await tracker.recordWrite(i * CHUNK, pattern(10 + i, CHUNK));
      expect(tracker.status().resyncRequired).toBe(true);
      const seen: Array<{ sequence: number; resync: boolean; tainted: boolean }> = [];
      // Ships (acknowledges) what is sealed, noting each log's sidecar first: unshipped logs would overflow again.
      const ship = async (): Promise<void> => {
        for (const log of tracker.sealedLogs()) {
          const sidecar = parseSidecar(JSON.parse(fs.readFileSync(log.sidecarPath, 'utf8')), log.sidecarPath);
          seen.push({ sequence: log.sequence, resync: sidecar.resync === true, tainted: sidecar.tainted === true });
          await tracker.acknowledge(log.name);
        }
      };
      let rounds = 0;
      for (;;) {
        const round = await tracker.resyncRound(zeroes, 4 * CHUNK);
        if (round === undefined) break;
        rounds++;
        // Writes between rounds, sealed by an ordinary cut.
        await tracker.recordWrite(SIZE - CHUNK, pattern(100 + rounds, CHUNK));
        await ChangeTracker.cut([tracker]);
        await ship();
        expect(rounds).toBeLessThan(50);
      }
      expect(rounds).toBeGreaterThan(2);
      // Every ordinary log up to the last round's is tainted; the one cut after it is not.
      const lastRound = Math.max(...seen.filter((l) => l.resync).map((l) => l.sequence));
      const ordinary = seen.filter((l) => !l.resync && l.sequence > clean!.sequence);
      expect(ordinary.filter((l) => l.sequence < lastRound).every((l) => l.tainted)).toBe(true);
      expect(ordinary.filter((l) => l.sequence > lastRound)).toEqual([{ sequence: lastRound + 1, resync: false, tainted: false }]);
      expect(seen.filter((l) => l.resync).every((l) => !l.tainted)).toBe(true);
    } finally {
      await tracker.close();
    }
  });
  it('refuse an app-consistent cut while the resync is owed (its point could never be selected), and take it once in step', async () => {
    const tracker = await ChangeTracker.open({ dir: tmp(), diskId: 'disk0', diskSizeBytes: SIZE, overflowRatio: 0.25, persistIntervalMs: 0 });
    try {
      await tracker.recordWrite(0, pattern(1, CHUNK));
      expect(await ChangeTracker.cutAppConsistent([tracker], 'before')).toMatchObject({ cutId: expect.any(String) });
      for (let i = 0; i < 20; i++) await tracker.recordWrite(i * CHUNK, pattern(10 + i, CHUNK));
      // Dirty-map-only after the overflow: nothing could even be sealed.
      await expect(ChangeTracker.cutAppConsistent([tracker], 'during')).rejects.toMatchObject({ code: 'BR_TAG_RESYNC_PENDING', details: { disk: 'disk0' } });
      for (const log of tracker.sealedLogs()) await tracker.acknowledge(log.name);
      await tracker.resyncRound(zeroes, 4 * CHUNK);
      // Logging again, but extents are still owed.
      await tracker.recordWrite(SIZE - CHUNK, pattern(2, CHUNK));
      await expect(ChangeTracker.cutAppConsistent([tracker], 'between rounds')).rejects.toMatchObject({ code: 'BR_TAG_RESYNC_PENDING' });
      while ((await tracker.resyncRound(zeroes, 16 * CHUNK)) !== undefined) {
        for (const log of tracker.sealedLogs()) await tracker.acknowledge(log.name);
      }
      const taken = await ChangeTracker.cutAppConsistent([tracker], 'after');
      const log = tracker.sealedLogs().find((l) => l.cutId === taken.cutId)!;
      expect(log).toMatchObject({ appTag: 'after' });
      expect(log.tainted).toBeUndefined();
    } finally {
      await tracker.close();
    }
  });
});
