import * as fs from 'node:fs';
import * as path from 'node:path';
import { removeStrayTemporaries, writeFileDurably } from '../platform/durable-file';
import { wrapError } from '../retry/blockrelay-error';
import { diskRetentionPaths, readHistoryEpoch } from './retention-format';
import { failoverComplete, listRetentionDisks, readAppliedSeq, readFailoverRecord, readManifest } from './retention-manifest';
import { applyRecordToState, holdsSeq, PointCatalog, type CatalogContents, type CatalogRecord, type RecoveryPoint } from './recovery-points';
import { UndoJournal } from './undo-journal';
import { systemVolumeProbe, type VolumeProbe } from './retention-volume';

/**
 * One disk's history as the master target keeps it in memory: the journal,
 * the catalog and what the catalog holds. Every change goes to disk first
 * (catalog, then journal files), then to these fields.
 */
export class DiskHistory {
  readonly journal: UndoJournal;
  readonly catalog: PointCatalog;
  points: RecoveryPoint[] = [];
  pending: RecoveryPoint | undefined;
  validBytes = 0;
  /** Bytes the journal's segments occupy on the volume (allocated, not apparent length). */
  journalBytes = 0;
  /** Every segment at or below this sequence is deleted (set once a removal has listed the journal). */
  private removedThroughSeq: number | undefined;

  constructor(readonly retentionDir: string, readonly diskId: string) {
    const paths = diskRetentionPaths(retentionDir, diskId);
    this.journal = new UndoJournal(paths.journalDir);
    this.catalog = new PointCatalog(paths.catalog, diskId);
  }

  /**
   * Says durably, before a log is applied without a pre-image, that every
   * older point is gone: a point view opened earlier holds the segments it
   * read and would go on serving the target's new bytes as its point's.
   */
  async bumpHistoryEpoch(): Promise<void> {
    const file = diskRetentionPaths(this.retentionDir, this.diskId).historyEpoch;
    const now = readHistoryEpoch(file);
    await writeFileDurably(file, `${now === Number.MAX_SAFE_INTEGER ? 1 : now + 1}\n`);
  }

  /**
   * Loads the catalog (settling a point whose apply the ledger confirms) and
   * discards half-written pre-images. A catalog damaged before its end is
   * salvaged rather than stopping replication: its intact lines are kept
   * (each has its own CRC), the file is replaced by them, and the number of
   * lines lost is returned so the caller can warn.
   */
  async open(appliedSeq: number | null): Promise<{ salvagedDamagedLines: number }> {
    await this.journal.open();
    // The catalog, manifest and failover record are replaced through temporaries a crash may leave.
    try {
      await removeStrayTemporaries(path.dirname(this.catalog.file));
    } catch (err) {
      throw wrapError(err, 'BR_IO', `sweeping temporaries in ${path.dirname(this.catalog.file)}`);
    }
    let salvaged = 0;
    try {
      this.adopt(await this.catalog.read(appliedSeq));
    } catch (err) {
      if ((err as { code?: string }).code !== 'BR_RETENTION_CATALOG_CORRUPT') throw err;
      const contents = await this.catalog.read(appliedSeq, { skipDamaged: true });
      salvaged = contents.damagedLines ?? 0;
      await this.catalog.rewrite(contents.points, contents.pending);
      this.adopt(await this.catalog.read(appliedSeq));
    }
    this.journalBytes = await this.journal.allocatedBytes();
    return { salvagedDamagedLines: salvaged };
  }

  /** Appends records to the catalog and updates the in-memory state by the catalog's own rules. */
  /** Appends records, fdatasynced unless `sync: false` (a record the ledger makes redundant). */
  async append(records: readonly CatalogRecord[], options: { sync?: boolean } = {}): Promise<void> {
    this.validBytes += await this.catalog.append(records, this.validBytes, options);
    // In place (O(records), not O(points)): `points` only ever grows by push; drops replace the array.
    const state = { points: this.points, pending: this.pending };
    for (const r of records) applyRecordToState(this.diskId, state, r);
    this.points = state.points;
    this.pending = state.pending;
  }

  /** Whether `seq`'s point is recorded (pending or applied); O(1) for a log past the newest point. */
  records(seq: number): boolean {
    return this.pending?.seq === seq || holdsSeq(this.points, seq);
  }

  adopt(contents: CatalogContents): void {
    this.points = contents.points;
    this.pending = contents.pending;
    this.validBytes = contents.validBytes;
  }

  /**
   * Drops the `count` oldest points: the catalog is replaced first, then
   * the pre-images no remaining point needs are deleted, so a crash in
   * between leaves only unreferenced files (deleted by the next prune),
   * never a listed point without its journal. Returns the bytes freed
   * (allocated bytes of the deleted segments).
   */
  async dropOldest(count: number): Promise<number> {
    if (count <= 0) return this.removeUnneeded();
    const remaining = this.points.slice(count);
    await this.catalog.rewrite(remaining, this.pending);
    this.points = remaining;
    this.validBytes = fs.existsSync(this.catalog.file) ? fs.statSync(this.catalog.file).size : 0;
    return this.removeUnneeded();
  }

  /**
   * Drops the `count` oldest points when the volume is full: a full volume
   * may not even have room for the new catalog, so the pre-images only the
   * dropped points need are deleted first, then the catalog is replaced if
   * it can be. Until it is (the next prune, or a crash and restart), the
   * catalog may still list a dropped point; failing over to it reports
   * BR_RETENTION_JOURNAL_MISSING. No segment is ever torn. Returns the
   * bytes freed.
   */
  async dropOldestUnderPressure(count: number): Promise<number> {
    const remaining = this.points.slice(count);
    let freed = await this.removeUnneeded(remaining[0]?.seq ?? this.pending?.seq ?? Number.POSITIVE_INFINITY);
    this.points = remaining;
    try {
      await this.catalog.rewrite(remaining, this.pending);
      this.validBytes = fs.existsSync(this.catalog.file) ? fs.statSync(this.catalog.file).size : 0;
    } catch (err) {
      if (wrapError(err, 'BR_IO', 'catalog').code !== 'BR_DISK_FULL') throw err;
    }
    freed += await this.removeUnneeded();
    return freed;
  }

  /**
   * Deletes pre-images at or below `floor`, by default the oldest point
   * (rolling back to it never applies them).
   *
   * The first call lists the journal directory; after it, every segment up
   * to the floor is known gone, and segments are only ever written above
   * the newest point (so above any floor), so the next call deletes just
   * the sequences between the old floor and the new one, by name, instead
   * of listing what may be hundreds of thousands of files. A floor that
   * moves back, jumps by more than `MAX_UNLISTED_REMOVE_RANGE` or is
   * unbounded lists again.
   */
  async removeUnneeded(floorSeq?: number): Promise<number> {
    const floor = floorSeq ?? this.points[0]?.seq ?? this.pending?.seq ?? Number.POSITIVE_INFINITY;
    const from = this.removedThroughSeq;
    let seqs: Iterable<number>;
    if (from !== undefined && Number.isFinite(floor) && floor >= from && floor - from <= MAX_UNLISTED_REMOVE_RANGE) {
      seqs = sequenceRange(from + 1, floor);
    } else {
      seqs = await this.journal.list();
    }
    let freed = 0;
    for (const seq of seqs) {
      if (seq > floor) break;
      freed += await this.journal.segmentAllocatedBytes(seq);
      await this.journal.remove(seq);
    }
    this.journalBytes = Math.max(0, this.journalBytes - freed);
    // A listing is the truth up to the floor, wherever an earlier floor was.
    this.removedThroughSeq = Number.isFinite(floor) ? floor : undefined;
    return freed;
  }

  /**
   * Applies the retention window: points older than `nowMs - windowMs`
   * disappear, except the newest, which needs no journal and is what the
   * target holds, and the newest point an operator may pick: while a resync
   * runs, the newest points are resync points (not selectable), and after
   * an outage longer than the window the last consistent point is older
   * than it; dropping it would leave nothing to fail over to until the
   * resync completes.
   *
   * In batches: dropping points rewrites the whole catalog, so aged points
   * are dropped only once at least `PRUNE_BATCH.fraction` of the catalog
   * has aged out, or the oldest aged point is more than `pruneLagMs(windowMs)`
   * past the window's start. Per applied log that costs a bounded number of
   * catalog lines, whatever the window holds; the window may hold up to
   * that much extra. Space pressure does not wait (`dropOldestUnderPressure`).
   * Returns the number of points dropped.
   */
  async pruneWindow(nowMs: number, windowMs: number): Promise<number> {
    const cutoff = nowMs - windowMs;
    const oldest = this.points[0];
    // Nothing aged: the common case costs O(1).
    if (oldest === undefined || oldest.timeMs >= cutoff) return 0;
    let keepFrom = this.points.length - 1;
    for (let i = this.points.length - 1; i >= 0; i--) {
      if (this.points[i]!.resync !== true) {
        keepFrom = i;
        break;
      }
    }
    let drop = 0;
    while (drop < keepFrom && this.points[drop]!.timeMs < cutoff) drop++;
    if (drop === 0) return 0;
    const batchPoints = Math.max(1, Math.ceil(this.points.length * PRUNE_BATCH.fraction));
    const overdue = oldest.timeMs < cutoff - pruneLagMs(windowMs);
    if (drop < batchPoints && !overdue) return 0;
    await this.dropOldest(drop);
    return drop;
  }
}

/**
 * When the window prunes (DiskHistory.pruneWindow): once this fraction of
 * the catalog has aged out, or once the oldest aged point is `pruneLagMs`
 * past the window's start. A rewrite then carries ~100 points per dropped
 * point at a steady cut rate, independent of how many the window holds.
 */
export const PRUNE_BATCH = {
  fraction: 0.01,
  /** Least lag allowed past the window's start before pruning anyway. */
  minLagMs: 60_000,
} as const;

/** How far past the window's start the oldest aged point may be before pruning runs whatever the batch: 1% of the window, at least a minute. */
export function pruneLagMs(windowMs: number): number {
  return Math.max(PRUNE_BATCH.minLagMs, Math.ceil(windowMs * PRUNE_BATCH.fraction));
}

/** Most sequences `removeUnneeded` deletes by name without listing the journal (one batch is ~1% of a window). */
const MAX_UNLISTED_REMOVE_RANGE = 100_000;

function* sequenceRange(first: number, last: number): Generator<number> {
  for (let seq = first; seq <= last; seq++) yield seq;
}

/** Space and history of one disk, for the status page and `blockrelay retention status`. */
export interface DiskRetentionUsage {
  readonly diskId: string;
  /** Bytes the segments occupy on the volume (allocated blocks): what the retention bound counts. */
  readonly journalBytes: number;
  /** The segments' total length, holes included (at least `journalBytes` less block rounding). */
  readonly journalApparentBytes: number;
  readonly journalSegments: number;
  readonly catalogBytes: number;
  readonly points: number;
  readonly oldestPointTime: string | null;
  readonly newestPointTime: string | null;
  readonly failedOver: boolean;
  /** A failover was started and did not finish (its output is not a whole copy). */
  readonly failoverIncomplete: boolean;
}

export interface RetentionUsage {
  readonly dir: string;
  readonly volumeTotalBytes: number;
  readonly volumeAvailableBytes: number;
  /** Journal bytes occupied on the volume plus catalog lengths, over every disk. */
  readonly usedBytes: number;
  readonly disks: DiskRetentionUsage[];
}

/** Reports the space the history on a retention directory uses, per disk and in total. */
export async function retentionUsage(retentionDir: string, probe: VolumeProbe = systemVolumeProbe): Promise<RetentionUsage> {
  const disks: DiskRetentionUsage[] = [];
  for (const diskId of listRetentionDisks(retentionDir)) {
    const manifest = await readManifest(retentionDir, diskId);
    const history = new DiskHistory(retentionDir, diskId);
    const contents = await history.catalog.read(readAppliedSeq(manifest.stateDir, diskId));
    const segments = await history.journal.list();
    const journal = await history.journal.usage();
    const failoverRecord = await readFailoverRecord(retentionDir, diskId);
    disks.push({
      diskId,
      journalBytes: journal.allocatedBytes,
      journalApparentBytes: journal.apparentBytes,
      journalSegments: segments.length,
      catalogBytes: contents.fileBytes,
      points: contents.points.length,
      oldestPointTime: contents.points[0] === undefined ? null : new Date(contents.points[0].timeMs).toISOString(),
      newestPointTime: contents.points.length === 0 ? null : new Date(contents.points[contents.points.length - 1]!.timeMs).toISOString(),
      failedOver: failoverRecord !== undefined && failoverComplete(failoverRecord),
      failoverIncomplete: failoverRecord !== undefined && !failoverComplete(failoverRecord),
    });
  }
  const cap = fs.existsSync(retentionDir) ? probe.capacity(retentionDir) : { totalBytes: 0, availableBytes: 0 };
  return {
    dir: retentionDir,
    volumeTotalBytes: cap.totalBytes,
    volumeAvailableBytes: cap.availableBytes,
    usedBytes: disks.reduce((n, d) => n + d.journalBytes + d.catalogBytes, 0),
    disks,
  };
}
