import * as fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { ChangeTracker, type ResyncReport } from '../../src/tracking/change-tracker';
import { MAPS_SLOTS, decodeTrackerMaps, encodeTrackerMaps, mapsSlotPath } from '../../src/tracking/tracker-files';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const DISK = 1024 * 1024;
const KiB = 1024;

/**
 * Rewrites the newest maps generation with an empty dirty map, as a stop
 * leaves it when a detached native export's records came back after the
 * last persist (review s4 S4), or a crash between a log write and a persist.
 */
function forgetDirtyOnDisk(dir: string): void {
  let newest: { generation: number; buf: Buffer } | undefined;
  for (let slot = 0; slot < MAPS_SLOTS; slot++) {
    const file = mapsSlotPath(dir, 'disk0', slot);
    if (!fs.existsSync(file)) continue;
    const maps = decodeTrackerMaps(fs.readFileSync(file), file);
    if (newest === undefined || maps.generation > newest.generation) {
      maps.dirty.clearAll();
      newest = { generation: maps.generation, buf: encodeTrackerMaps(maps, maps.generation + 1) };
    }
  }
  expect(newest).toBeDefined();
  fs.writeFileSync(mapsSlotPath(dir, 'disk0', (newest!.generation + 1) % MAPS_SLOTS), newest!.buf);
}

function covers(extents: readonly { offset: number; length: number }[], offset: number, length: number): boolean {
  return extents.some((e) => e.offset <= offset && e.offset + e.length >= offset + length);
}

describe('ChangeTracker.open rebuilds the dirty map from the unshipped logs', () => {
  it('lists a sealed log\'s writes as dirty although the persisted dirty map lacks them, so an overflow fold resyncs them', async () => {
    const dir = tempDir();
    const first = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0, overflowRatio: 0.25 });
    await first.recordWrite(0, Buffer.alloc(64 * KiB, 1));
    await first.rotate();
    await first.close({ seal: true });
    forgetDirtyOnDisk(dir);

    const reports: ResyncReport[] = [];
    const tracker = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0, overflowRatio: 0.25, onResyncRequired: (r) => reports.push(r) });
    try {
      expect(tracker.sealedLogs().length).toBeGreaterThan(0);
      expect(tracker.status().dirtyBytes).toBeGreaterThanOrEqual(64 * KiB);
      // Past the overflow limit: the logs are folded and dropped. The first
      // log's writes must be in the resync map, or the replica never gets them.
      await tracker.recordWrite(512 * KiB, Buffer.alloc(256 * KiB, 2));
      expect(tracker.status().mode).toBe('dirty-only');
      const overflow = reports.find((r) => r.reason === 'overflow');
      expect(overflow, JSON.stringify(reports)).toBeDefined();
      expect(covers(overflow!.extents, 0, 64 * KiB), JSON.stringify(overflow!.extents)).toBe(true);
      expect(covers(overflow!.extents, 512 * KiB, 256 * KiB)).toBe(true);
    } finally {
      await tracker.close({ seal: false });
    }
  });
});
