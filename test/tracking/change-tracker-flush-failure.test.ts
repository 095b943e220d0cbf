import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import type { HrlWriterFile } from '../../src/tracking/hrl-writer';
import { TrackerMapsWriter, mapsSlotPath } from '../../src/tracking/tracker-files';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const DISK = 1024 * 1024;

/** A real log file whose next fdatasync fails with EIO once (Linux reports a writeback error to one fdatasync only). */
class EioOnceLog implements HrlWriterFile {
  failNextSync = false;
  readonly syncs: string[] = [];
  private constructor(private readonly fh: fsp.FileHandle) {}

  static last: EioOnceLog | undefined;
  static async open(p: string): Promise<HrlWriterFile> {
    EioOnceLog.last = new EioOnceLog(await fsp.open(p, 'wx+'));
    return EioOnceLog.last;
  }

  write(b: Buffer, o: number, l: number, p: number): Promise<unknown> {
    return this.fh.write(b, o, l, p);
  }

  writev(b: Buffer[], p: number): Promise<unknown> {
    return this.fh.writev(b, p);
  }

  async datasync(): Promise<void> {
    if (this.failNextSync) {
      this.failNextSync = false;
      this.syncs.push('EIO');
      throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', errno: -5 });
    }
    await this.fh.datasync();
    this.syncs.push('ok');
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

/** The next maps persist writes its slot, then fails (as an I/O error on the same volume would). */
function failNextMapsWrite(): void {
  const real = TrackerMapsWriter.prototype.write;
  vi.spyOn(TrackerMapsWriter.prototype, 'write').mockImplementationOnce(async function (this: TrackerMapsWriter, ...args: Parameters<typeof real>) {
    await real.apply(this, args);
    throw new BlockrelayError('BR_IO', 'maps write failed (injected)');
  });
}

afterEach(() => {
  vi.restoreAllMocks();
});

/** A tracker whose active log's syncs can be failed (EioOnceLog), with the creation's own sync forgotten. */
async function trackerOnFailingLog(dir: string): Promise<{ tracker: ChangeTracker; log: EioOnceLog }> {
  const tracker = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, metadataSizeBytes: 256, persistIntervalMs: 0, openLogFile: EioOnceLog.open });
  const log = EioOnceLog.last!;
  log.syncs.length = 0;
  return { tracker, log };
}

/** A restart finds the 4 KiB write in the resync map. */
async function expectResyncOnReopen(dir: string): Promise<void> {
  const reopened = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0 });
  try {
    expect(reopened.status().resyncBytes).toBeGreaterThanOrEqual(4096);
  } finally {
    await reopened.close({ seal: false });
  }
}

describe('ChangeTracker.flush when the maps persist and the log sync fail in one round', () => {
  it('folds the logs in that round, so the retried FLUSH is not answered from a log whose sync error was dropped', async () => {
    const dir = tempDir();
    const { tracker, log } = await trackerOnFailingLog(dir);
    try {
      await tracker.recordWrite(0, Buffer.alloc(4096, 7));
      log.failNextSync = true;
      failNextMapsWrite();
      await expect(tracker.flush()).rejects.toThrow(/maps write failed/);
      expect(log.syncs).toEqual(['EIO']);
      // The log's error was not dropped: everything unshipped is in the persisted resync map.
      const after = tracker.status();
      expect(after.mode).toBe('dirty-only');
      expect(after.resyncRequired).toBe(true);
      expect(after.resyncBytes).toBeGreaterThanOrEqual(4096);
      expect(after.lastResyncReason).toBe('log-io-error');
      // The guest's retried FLUSH is answered from the maps, never from a second fdatasync of that log.
      await tracker.flush();
      expect(log.syncs).toEqual(['EIO']);
    } finally {
      await tracker.close({ seal: false });
    }
    // A restart finds the write in the resync map.
    await expectResyncOnReopen(dir);
  });

  it('never answers a later FLUSH from that log when the persist of the fold failed too', async () => {
    const dir = tempDir();
    const { tracker, log } = await trackerOnFailingLog(dir);
    try {
      await tracker.recordWrite(0, Buffer.alloc(4096, 5));
      log.failNextSync = true;
      // The round's persist and then the fold's persist fail.
      failNextMapsWrite();
      failNextMapsWrite();
      await expect(tracker.flush()).rejects.toThrow(/maps write failed/);
      // The retry persists the maps and folds (the log still fails with its
      // first error); it does not sync the log again.
      await tracker.flush();
      expect(log.syncs).toEqual(['EIO']);
      expect(tracker.status().mode).toBe('dirty-only');
    } finally {
      await tracker.close({ seal: false });
    }
    await expectResyncOnReopen(dir);
  });

  it('still answers the FLUSH after a log sync failure alone, with the logs folded', async () => {
    const dir = tempDir();
    const { tracker, log } = await trackerOnFailingLog(dir);
    try {
      await tracker.recordWrite(8192, Buffer.alloc(4096, 9));
      log.failNextSync = true;
      await tracker.flush();
      expect(log.syncs).toEqual(['EIO']);
      expect(tracker.status().mode).toBe('dirty-only');
      expect(tracker.status().resyncBytes).toBeGreaterThanOrEqual(4096);
    } finally {
      await tracker.close({ seal: false });
    }
  });
});

/** Files this process holds open under `dir`. */
function openFilesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    try {
      const target = fs.readlinkSync(`/proc/self/fd/${fd}`);
      if (target.startsWith(dir)) out.push(target);
    } catch {
      // Closed meanwhile (the readdir's own descriptor).
    }
  }
  return out;
}

describe('ChangeTracker.close when the maps persist fails', () => {
  it('leaves no maps slot file open, and a retried close succeeds', async () => {
    if (!fs.existsSync('/proc/self/fd')) return;
    const dir = tempDir();
    const tracker = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0 });
    await tracker.recordWrite(0, Buffer.alloc(4096, 3));
    failNextMapsWrite();
    await expect(tracker.close({ seal: false })).rejects.toThrow(/maps write failed/);
    const slots = [0, 1].map((slot) => mapsSlotPath(dir, 'disk0', slot));
    expect(openFilesUnder(dir).filter((f) => slots.includes(f))).toEqual([]);
    await tracker.close({ seal: false });
    expect(openFilesUnder(dir)).toEqual([]);
    const reopened = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0 });
    await reopened.close();
  });
});
