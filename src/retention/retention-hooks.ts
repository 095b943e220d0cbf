import * as path from 'node:path';
import type { BlockrelayConfig } from '../daemon/config';
import { silentLogger, type Logger } from '../daemon/logger';
import { systemClock, type Clock } from '../platform/clock';
import { KeyedLock } from '../platform/keyed-lock';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import type { DiskTarget } from '../targets/disk-target';
import { hrlLogOps } from '../transport/hrl-log-ops';
import type { LogOps } from '../transport/log-ops';
import type { SpoolEntry } from '../transport/log-spool';
import type { ApplyHooks, PointsSummary } from '../transport/master-target';
import { readAppliedSeq, writeManifest, type DiskManifest } from './retention-manifest';
import { DiskHistory } from './retention-pruner';
import { pointRecordFromEnvelope, selectablePoints, type CatalogRecord, type RecoveryPoint } from './recovery-points';
import { coalesceExtents, undoLogOccupiedBoundBytes, undoLogSizeBytes } from './undo-journal';
import { BLOB_SNAPSHOT_DEFAULTS, isSnapshotTarget, snapshotDue, snapshotIdOf, snapshotPointRecord, sweepOrphanSnapshots, type SnapshotTarget } from './blob-snapshots';
import { INSTALL_DIR, systemVolumeProbe, validateRetentionVolume, type VolumeProbe } from './retention-volume';

/** Largest run of folded sequence numbers filled with empty pre-images before a resync log. */
const MAX_FILLED_SEQUENCE_GAP = 100_000;

/** Defaults, units in the names. */
export const RETENTION_DEFAULTS = {
  windowHours: 24,
  /** Free space left on the volume for everything else (catalog appends, the file system itself). */
  reserveBytes: 64 * 1024 * 1024,
} as const;

/** Where the hooks report that the volume is full (a recoverable Warning) and that it is no longer. */
export interface RetentionHealthSink {
  warn(diskId: string, err: BlockrelayError): void;
  clear(diskId: string): void;
}

export interface RetentionHooksOptions {
  readonly dir: string;
  readonly windowHours: number;
  /** The master target's state directory: its ledger says which logs are applied. */
  readonly stateDir: string;
  /** The master target's inbox root (`STATE/inbox`); recorded so `failover --point latest` finds pending logs. */
  readonly inboxDir: string;
  readonly logOps?: LogOps;
  readonly clock?: Clock;
  readonly logger?: Logger;
  /**
   * Bytes the history may take in total. Without it, the bound is the
   * volume's free space (statfs) less `reserveBytes`.
   */
  readonly capacityBytes?: number;
  readonly reserveBytes?: number;
  readonly probe?: VolumeProbe;
  readonly health?: RetentionHealthSink;
  /** Page-blob targets: the least time between crash-consistent snapshots (default 5 minutes). */
  readonly snapshotIntervalMs?: number;
}

/**
 * The master target's retention: an `ApplyHooks` that makes each log's
 * pre-images durable in the undo journal before the log is applied, records
 * the recovery point the log ends, and applies the retention window.
 *
 * Never stops applying for lack of space: when the volume is full the
 * oldest points are pruned until the pre-image fits; if even an empty
 * history cannot hold it, the whole history is dropped (every older point
 * needs this pre-image) and the log is applied without one. Either way a
 * BR_RETENTION_VOLUME_FULL Warning goes to the disk's health. Other
 * failures (I/O errors) are thrown so the apply is retried: applying without
 * a durable pre-image would silently lose the history.
 */
export class RetentionHooks implements ApplyHooks {
  readonly clock: Clock;
  private readonly logger: Logger;
  private readonly logOps: LogOps;
  private readonly histories = new Map<string, DiskHistory>();
  /** Disks whose unlisted snapshots were swept in this process. */
  private readonly sweptSnapshots = new Set<string>();
  private readonly loading = new Map<string, Promise<DiskHistory>>();
  private readonly manifests = new Map<string, string>();
  private readonly locks = new KeyedLock();
  private health: RetentionHealthSink | undefined;

  constructor(readonly options: RetentionHooksOptions) {
    this.clock = options.clock ?? systemClock;
    this.logger = options.logger ?? silentLogger();
    this.logOps = options.logOps ?? hrlLogOps;
    this.health = options.health;
  }

  /** Lets the master target receive the hooks' Warnings (volume full) in its disk health. */
  attachHealth(sink: RetentionHealthSink): void {
    this.health = sink;
  }

  get windowMs(): number {
    return this.options.windowHours * 3_600_000;
  }

  /**
   * The disk's history, loaded on first use. Callers that come while it
   * loads share the one load: two copies of a history would each append
   * with their own idea of the catalog's valid length, and the next append
   * through one would cut off the other's record.
   */
  history(diskId: string): Promise<DiskHistory> {
    const loaded = this.histories.get(diskId);
    if (loaded !== undefined) return Promise.resolve(loaded);
    let loading = this.loading.get(diskId);
    if (loading === undefined) {
      loading = this.load(diskId).finally(() => this.loading.delete(diskId));
      this.loading.set(diskId, loading);
    }
    return loading;
  }

  private async load(diskId: string): Promise<DiskHistory> {
    const h = new DiskHistory(this.options.dir, diskId);
    const { salvagedDamagedLines } = await h.open(readAppliedSeq(this.options.stateDir, diskId));
    if (salvagedDamagedLines > 0) {
      // Replication goes on: losing the records of a few points beats stopping the disk.
      this.logger.warn({ disk: diskId, code: 'BR_RETENTION_CATALOG_CORRUPT', damagedLines: salvagedDamagedLines, file: h.catalog.file }, 'recovery point catalog was damaged; kept its intact records');
    }
    this.histories.set(diskId, h);
    return h;
  }

  /** The status page's view of the disk's points (from memory; undefined before the disk's first log). */
  pointsSummary(diskId: string): PointsSummary | undefined {
    const h = this.histories.get(diskId);
    if (h === undefined) return undefined;
    const points = selectablePoints(h.points);
    const newest = points[points.length - 1];
    let app: RecoveryPoint | undefined;
    for (let i = points.length - 1; i >= 0 && app === undefined; i--) if (points[i]!.kind === 'app') app = points[i];
    return {
      newestCrash: newest === undefined ? null : new Date(newest.timeMs).toISOString(),
      newestApp: app === undefined ? null : `${new Date(app.timeMs).toISOString()}${app.name !== undefined ? ` (${app.name})` : ''}`,
      count: points.length,
    };
  }

  async beforeApply(diskId: string, entry: SpoolEntry, target: DiskTarget): Promise<void> {
    await this.locks.run(diskId, async () => {
      const h = await this.history(diskId);
      await this.recordManifest(diskId, entry, target);
      // A page blob keeps its points as snapshots, taken after the apply.
      if (isSnapshotTarget(target)) return;
      const { seq } = entry.envelope;
      const recorded = h.records(seq);
      if (entry.envelope.resync === true && !recorded) await this.fillSkipped(h, seq, target);
      if (!h.journal.has(seq)) {
        if (recorded) {
          // The point was recorded, so its pre-image had been written; it is gone
          // (pruned for space): older points cannot be rebuilt any more.
          await this.dropHistory(h, seq, 'its pre-image is missing');
        } else {
          await this.journal(h, seq, entry, target);
        }
      }
      if (!recorded) {
        await this.appendUnderPressure(h, [pointRecordFromEnvelope(entry.envelope)], seq);
      }
    });
  }

  async afterApply(diskId: string, entry: SpoolEntry, target?: DiskTarget): Promise<void> {
    await this.locks.run(diskId, async () => {
      const h = await this.history(diskId);
      if (target !== undefined && isSnapshotTarget(target)) {
        await this.snapshotPoint(h, entry, target);
        return;
      }
      const { seq } = entry.envelope;
      // Not synced: the master target's ledger recorded appliedSeq durably
      // before this runs, and every reader of the catalog counts a point up
      // to it as applied; the next synced append carries this line along.
      await h.append([{ v: 1, t: 'applied', seq }], { sync: false });
      const dropped = await h.pruneWindow(this.clock.now(), this.windowMs);
      if (dropped > 0) this.logger.info({ disk: diskId, dropped, oldest: h.points[0]?.id }, 'retention window pruned old points');
    });
  }

  /**
   * Page blobs: snapshots the blob when a point is due (app tags, and every
   * `snapshotIntervalMs` of cut time), records it, then applies the window:
   * the catalog drops old points first, then their snapshots are deleted,
   * so a crash in between leaves only unlisted snapshots, never a listed
   * point without its snapshot.
   */
  private async snapshotPoint(h: DiskHistory, entry: SpoolEntry, target: SnapshotTarget): Promise<void> {
    // A resync log's end is no point: its blocks were read while the source changed.
    if (entry.envelope.resync === true) return;
    const newest = h.points[h.points.length - 1];
    if (newest !== undefined && newest.seq >= entry.envelope.seq) return; // re-run after a crash
    if (snapshotDue(newest, entry.envelope, this.options.snapshotIntervalMs ?? BLOB_SNAPSHOT_DEFAULTS.crashIntervalMs)) {
      const snap = await target.snapshot();
      await this.appendUnderPressure(h, [snapshotPointRecord(entry.envelope, snap.spec)], entry.envelope.seq);
    }
    if (!this.sweptSnapshots.has(h.diskId)) await this.sweepSnapshots(h, target);
    const before = h.points;
    const dropped = await h.pruneWindow(this.clock.now(), this.windowMs);
    if (dropped === 0) return;
    for (const p of before.slice(0, dropped)) {
      if (p.snapshot !== undefined) await target.deleteSnapshot(snapshotIdOf(p.snapshot));
    }
    this.logger.info({ disk: h.diskId, dropped, oldest: h.points[0]?.id }, 'retention window pruned old snapshots');
  }

  /**
   * Once per disk and process: deletes snapshots a crash or a failed delete
   * left unlisted (blob-snapshots.ts sweepOrphanSnapshots). A failure is
   * told and tried again at the next snapshot point; it never stops applying.
   */
  private async sweepSnapshots(h: DiskHistory, target: SnapshotTarget): Promise<void> {
    try {
      const deleted = await sweepOrphanSnapshots(target, h.points);
      this.sweptSnapshots.add(h.diskId);
      if (deleted.length > 0) this.logger.info({ disk: h.diskId, deleted }, 'deleted snapshots no recovery point lists (left by a crash or a failed delete)');
    } catch (err) {
      this.logger.warn({ disk: h.diskId, err }, 'could not sweep unlisted snapshots; trying again at the next snapshot point');
    }
  }

  /**
   * A resync log follows the logs the source folded after an overflow, so
   * their sequence numbers were never applied here. Each gets an empty
   * pre-image: nothing was written under it, and every reader of the journal
   * can go on treating sequences as consecutive. A gap too large to fill
   * ends the older history instead.
   */
  private async fillSkipped(h: DiskHistory, seq: number, target: DiskTarget): Promise<void> {
    const known = Math.max(h.pending?.seq ?? 0, h.points[h.points.length - 1]?.seq ?? 0);
    if (known === 0 || seq <= known + 1) return;
    if (seq - known - 1 > MAX_FILLED_SEQUENCE_GAP) {
      await this.dropHistory(h, seq, `${seq - known - 1} logs were folded before this resync log`);
      return;
    }
    for (let s = known + 1; s < seq; s++) if (!h.journal.has(s)) await h.journal.write(s, [], target);
  }

  private async journal(h: DiskHistory, seq: number, entry: SpoolEntry, target: DiskTarget): Promise<void> {
    const extents = coalesceExtents(await this.logOps.ranges(entry.file));
    let needBytes = undoLogSizeBytes(extents);
    // Zero pre-images are holes: when the full length does not fit, ask the target what the segment will occupy.
    if (this.availableBytes() < needBytes) needBytes = await undoLogOccupiedBoundBytes(extents, target);
    let pruned = 0;
    while (this.availableBytes() < needBytes && h.points.length > 1) {
      await this.dropOldestForSpace(h);
      pruned++;
    }
    if (this.availableBytes() < needBytes) {
      await this.dropHistory(h, seq, `the ${needBytes}-byte pre-image does not fit even with all history pruned`);
      return;
    }
    let written;
    try {
      // The volume may fill under us all the same: then the newest history that fits is kept.
      written = await this.dropOldestWhileFull(h, () => h.journal.write(seq, extents, target));
    } catch (err) {
      const coded = wrapError(err, 'BR_IO', `journaling log ${seq} of ${h.diskId}`);
      if (coded.code !== 'BR_DISK_FULL') throw coded;
      await this.dropHistory(h, seq, 'the volume is full');
      return;
    }
    h.journalBytes += written.value.allocatedBytes;
    pruned += written.pruned;
    // The need was a bound on what the segment occupies, short on blocks larger than a page: keep within a
    // capacity bound. Not against statfs: a volume may report freed blocks late, and pruning would run on
    // to the newest point; there the file system's own ENOSPC is the limit.
    while (this.options.capacityBytes !== undefined && this.availableBytes() < 0 && h.points.length > 1) {
      await this.dropOldestForSpace(h);
      pruned++;
    }
    if (pruned > 0) this.warnFull(h, `pruned the ${pruned} oldest point(s) to journal log ${seq}`);
    else this.health?.clear(h.diskId);
  }

  /**
   * Drops the oldest point to make room. When it is the last point an
   * operator can pick (only resync points follow it, during a resync), that
   * is said on its own: until the resync completes, failover has nothing.
   */
  private async dropOldestForSpace(h: DiskHistory): Promise<void> {
    const oldest = h.points[0];
    if (oldest !== undefined && oldest.resync !== true && selectablePoints(h.points).length === 1) {
      this.logger.warn({ disk: h.diskId, code: 'BR_RETENTION_VOLUME_FULL', point: oldest.id }, `retention volume ${this.options.dir} is full: dropping ${oldest.id}, the last point of ${h.diskId} an operator can fail over to; none is selectable until the running resync completes`);
    }
    await h.dropOldestUnderPressure(1);
  }

  /**
   * Appends a point's record; when the volume is full (the append is then
   * undone whole: recovery-points.ts), the oldest points make room, as for
   * a pre-image. Still full with one point left, it throws BR_DISK_FULL and
   * the apply is retried under the policy.
   */
  private async appendUnderPressure(h: DiskHistory, records: readonly CatalogRecord[], seq: number): Promise<void> {
    const { pruned } = await this.dropOldestWhileFull(h, () => h.append(records));
    if (pruned > 0) this.warnFull(h, `pruned the ${pruned} oldest point(s) to record point ${seq}`);
  }

  /**
   * Runs `write`; while it fails with BR_DISK_FULL and more than one point
   * is left, drops the oldest and runs it again. With one point left the
   * last BR_DISK_FULL is thrown (a failed write leaves nothing behind:
   * pre-images go to a temporary file, catalog appends are undone whole).
   */
  private async dropOldestWhileFull<T>(h: DiskHistory, write: () => Promise<T>): Promise<{ value: T; pruned: number }> {
    let pruned = 0;
    for (;;) {
      try {
        return { value: await write(), pruned };
      } catch (err) {
        if (wrapError(err, 'BR_IO', h.diskId).code !== 'BR_DISK_FULL' || h.points.length <= 1) throw err;
        await this.dropOldestForSpace(h);
        pruned++;
      }
    }
  }

  /**
   * Applies `seq` without a pre-image: every older point would need it, so
   * all of them go (catalog first, then their journal). The point `seq`
   * ends is still recorded; it needs no journal while it is the newest.
   */
  private async dropHistory(h: DiskHistory, seq: number, why: string): Promise<void> {
    const lost: RecoveryPoint[] = h.points;
    await h.dropOldestUnderPressure(h.points.length);
    await h.journal.remove(seq);
    // After the space is freed (this path is often a full volume), before the log touches the target.
    await h.bumpHistoryEpoch();
    this.warnFull(h, `dropped all ${lost.length} older point(s) of ${h.diskId} before log ${seq}: ${why}`);
  }

  private warnFull(h: DiskHistory, what: string): void {
    const err = new BlockrelayError('BR_RETENTION_VOLUME_FULL', `retention volume ${this.options.dir} is full: ${what}; history is shorter than the ${this.options.windowHours} h window`, { details: { disk: h.diskId } });
    this.logger.warn({ disk: h.diskId, code: err.code }, err.message);
    this.health?.warn(h.diskId, err);
  }

  /**
   * Bytes the history may still grow by. With `capacityBytes`, the journal
   * counts by the bytes its segments occupy (allocated blocks: a segment's
   * zero pre-images are holes) and the catalog by its length. A new
   * pre-image's need is its full length (`undoLogSizeBytes`) when that
   * fits, else a bound on what it will occupy from the target's allocation
   * map (`undoLogOccupiedBoundBytes`); after it is written, with
   * `capacityBytes`, the oldest points go until the history is back within
   * that bound.
   */
  private availableBytes(): number {
    if (this.options.capacityBytes !== undefined) {
      let used = 0;
      for (const h of this.histories.values()) used += h.journalBytes + h.validBytes;
      return this.options.capacityBytes - used;
    }
    const probe = this.options.probe ?? systemVolumeProbe;
    return probe.capacity(this.options.dir).availableBytes - (this.options.reserveBytes ?? RETENTION_DEFAULTS.reserveBytes);
  }

  private async recordManifest(diskId: string, entry: SpoolEntry, target: DiskTarget): Promise<void> {
    const manifest: DiskManifest = {
      version: 1,
      diskId,
      targetSpec: target.spec,
      diskSizeBytes: target.sizeBytes,
      stateDir: path.resolve(this.options.stateDir),
      inboxDir: path.resolve(this.options.inboxDir, diskId),
      windowHours: this.options.windowHours,
      ...(entry.envelope.group !== undefined ? { group: entry.envelope.group } : {}),
    };
    const text = JSON.stringify(manifest);
    if (this.manifests.get(diskId) === text) return;
    await writeManifest(this.options.dir, manifest);
    this.manifests.set(diskId, text);
  }
}

/**
 * The retention hooks a master target runs with when `config.retention` is
 * set (undefined otherwise). Validates the retention volume first: it must
 * not be the cache/install volume, hold a target, be FAT, read-only or of
 * zero capacity.
 */
export function retentionHooksFromConfig(config: BlockrelayConfig, extra: Partial<RetentionHooksOptions> & { allowSharedVolume?: boolean } = {}): RetentionHooks | undefined {
  if (config.retention === undefined) return undefined;
  const dir = path.resolve(config.retention.dir);
  validateRetentionVolume(
    {
      dir,
      excludedDirs: [
        { what: 'state directory', dir: config.stateDir },
        ...(config.cache !== undefined ? [{ what: 'cache directory', dir: config.cache.dir }] : []),
        { what: 'install directory', dir: INSTALL_DIR },
      ],
      targetSpecs: config.disks.map((d) => d.target),
      ...(extra.allowSharedVolume === true ? { allowSharedVolume: true } : {}),
    },
    extra.probe ?? systemVolumeProbe,
  );
  const { allowSharedVolume: _allow, ...options } = extra;
  return new RetentionHooks({
    dir,
    windowHours: config.retention.windowHours,
    stateDir: config.stateDir,
    inboxDir: path.join(config.stateDir, 'inbox'),
    ...options,
  });
}
