import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import type { HrlWriterFile } from '../../src/tracking/hrl-writer';
import { MAPS_SLOTS, decodeTrackerMaps, mapsSlotPath } from '../../src/tracking/tracker-files';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const DISK = 1024 * 1024;

/** The newest valid maps generation on disk, read synchronously (no event-loop turn in between). */
function generationOnDisk(dir: string): number {
  let best = -1;
  for (let slot = 0; slot < MAPS_SLOTS; slot++) {
    const file = mapsSlotPath(dir, 'disk0', slot);
    if (!fs.existsSync(file)) continue;
    try {
      best = Math.max(best, decodeTrackerMaps(fs.readFileSync(file), file).generation);
    } catch {
      // A slot being rewritten.
    }
  }
  return best;
}

/**
 * A log file that writes through, counts its fdatasyncs, can hold them
 * until released, and notes the maps generation on disk when it is written.
 */
class ObservedLog implements HrlWriterFile {
  datasyncs = 0;
  /** Maps generation on disk at each write, while `watchDir` is set. */
  readonly generationsAtWrite: number[] = [];
  watchDir: string | undefined;
  private gate: Promise<void> | undefined;
  private openGate: (() => void) | undefined;
  private constructor(private readonly fh: fsp.FileHandle) {}

  static last: ObservedLog | undefined;
  static async open(p: string): Promise<HrlWriterFile> {
    ObservedLog.last = new ObservedLog(await fsp.open(p, 'wx+'));
    return ObservedLog.last;
  }

  /** fdatasyncs wait from now until the returned function is called. */
  holdSyncs(): () => void {
    this.gate = new Promise((r) => { this.openGate = r; });
    return () => {
      this.gate = undefined;
      this.openGate?.();
    };
  }

  write(buffer: Buffer, offset: number, length: number, position: number): Promise<unknown> {
    if (this.watchDir !== undefined) this.generationsAtWrite.push(generationOnDisk(this.watchDir));
    return this.fh.write(buffer, offset, length, position);
  }

  writev(buffers: Buffer[], position: number): Promise<unknown> {
    if (this.watchDir !== undefined) this.generationsAtWrite.push(generationOnDisk(this.watchDir));
    return this.fh.writev(buffers, position);
  }

  async datasync(): Promise<void> {
    if (this.gate !== undefined) await this.gate;
    await this.fh.datasync();
    this.datasyncs++;
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

async function openTracker(dir: string): Promise<{ tracker: ChangeTracker; log: ObservedLog }> {
  const tracker = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, metadataSizeBytes: 256, persistIntervalMs: 0, openLogFile: ObservedLog.open });
  return { tracker, log: ObservedLog.last! };
}

/** Lets pending I/O callbacks and microtasks run. */
function settle(): Promise<void> {
  return new Promise((r) => setTimeout(r, 20));
}

describe('ChangeTracker.flush', () => {
  it('starts the log write and sync of a FLUSH before its maps persist has completed', async () => {
    const dir = tempDir();
    const { tracker, log } = await openTracker(dir);
    await tracker.recordWrite(8192, Buffer.alloc(4096, 1));
    const before = generationOnDisk(dir);
    const syncsBefore = log.datasyncs;
    log.watchDir = dir;
    await tracker.flush();
    log.watchDir = undefined;
    // The block close is the flush's first log write: the maps persist of the
    // same flush had not reached the disk yet (a sequential flush would show
    // the new generation here).
    expect(log.generationsAtWrite.length).toBeGreaterThan(0);
    expect(log.generationsAtWrite[0]).toBe(before);
    expect(generationOnDisk(dir)).toBe(before + 1);
    expect(log.datasyncs).toBe(syncsBefore + 1);
    await tracker.close();
  });

  it('answers every flush that arrives while a round runs with one more round, not one each', async () => {
    const dir = tempDir();
    const { tracker, log } = await openTracker(dir);
    await tracker.recordWrite(0, Buffer.alloc(4096, 1));
    const syncsBefore = log.datasyncs;
    const release = log.holdSyncs();
    const first = tracker.flush();
    await settle();
    // The first round now waits in its log sync; the write queues behind it.
    const write = tracker.recordWrite(4096, Buffer.alloc(4096, 2));
    const later = [tracker.flush(), tracker.flush(), tracker.flush(), tracker.flush()];
    expect(new Set(later).size).toBe(1);
    release();
    await Promise.all([first, write, ...later]);
    expect(tracker.status().flushRounds).toBe(2);
    expect(log.datasyncs).toBe(syncsBefore + 2);
    await tracker.close();
  });

  it('never lets a flush join a round that a write recorded before it would miss', async () => {
    const dir = tempDir();
    const { tracker, log } = await openTracker(dir);
    await tracker.recordWrite(0, Buffer.alloc(4096, 1));
    const release = log.holdSyncs();
    const first = tracker.flush();
    await settle();
    const second = tracker.flush();
    // Recorded after the second round was queued: that round does not cover it.
    const write = tracker.recordWrite(4096, Buffer.alloc(4096, 2));
    const third = tracker.flush();
    expect(third).not.toBe(second);
    release();
    await Promise.all([first, second, write]);
    const syncsBefore = log.datasyncs;
    await third;
    // The third flush had a round of its own, which made the later write durable.
    expect(log.datasyncs).toBe(syncsBefore + 1);
    expect(tracker.status().flushRounds).toBe(3);
    await tracker.close();
  });
});
