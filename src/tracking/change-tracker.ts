import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { systemClock, type Clock, type TimerHandle } from '../platform/clock';
import { BlockrelayError, isBlockrelayError, wrapError } from '../retry/blockrelay-error';
import { DIRTY_MAP_DEFAULT_GRANULARITY_BYTES, DirtyMap, type DirtyExtent } from './dirty-map';
import { NIL_GUID, randomGuid } from './hrl-format';
import { HrlWriter, type HrlWriterFile, type HrlWriterOptions } from './hrl-writer';
import { syncDirectory } from '../platform/durable-file';
import { DISK_ID_PATTERN } from '../platform/disk-id';
import { NATIVE_TAP_MODE, type NativeTapExport } from '../platform/native';
import { loadSealedLogs, recoverOpenLogs, type ResyncReason, type SealedLogInfo } from './tracker-recovery';
import {
  MAX_APP_TAG_BYTES,
  OPEN_LOG_SUFFIX,
  RESYNC_LOG_TMP_SUFFIX,
  SEALED_LOG_SUFFIX,
  SIDECAR_SUFFIX,
  TMP_SUFFIX,
  readTrackerMaps,
  TrackerMapsWriter,
  logBaseName,
  parseLogName,
  parseTrackerState,
  readJsonFile,
  writeFileAtomic,
  type LogSidecar,
  type ResyncReservation,
  type TrackerMaps,
  decodeIntents,
  encodeIntents,
  intentPath,
  type TrackerState,
} from './tracker-files';

/** Defaults, units in the names. */
export const CHANGE_TRACKER_DEFAULTS = {
  /** Unshipped logs may use this share of the disk size before the tracker folds them into the dirty map. */
  overflowRatio: 0.5,
  /** The dirty maps are also persisted this often (besides every flush); 0 turns the timer off. */
  persistIntervalMs: 1000,
  /** Extents listed in a resync report (the map itself holds all of them). */
  reportExtentsMax: 1000,
  /**
   * A write-intent region is cleared only after this long without a write
   * (and at least one persist). Clearing sooner made a region that is
   * written every few cuts pay an fsynced intent rewrite before its next
   * write, again and again: with 250 ms cuts and random writes over 4 GiB
   * that held the demo's churn near 32 MB/s, against 98-158 MB/s without it
   * (e2e bench). The cost is bounded the other way: after a crash, regions
   * written in the last few seconds are resynced (16 MiB each at most).
   */
  intentIdleClearMs: 5000,
  /**
   * Writes shorter than this are appended, never rewritten in place: at 4 KiB
   * the map upkeep and a positional rewrite per write cost more CPU than the
   * bytes they save (tap bench, 4 KiB QD16: 1.00 of qemu-nbd coalesced, 1.44
   * appended), while a 64 KiB rewrite costs no more than its append.
   */
  coalesceMinBytes: 32 * 1024,
} as const;

export interface ChangeTrackerOptions {
  /** Directory of the logs, sidecars, state and maps (shared by several disks). */
  readonly dir: string;
  /** Names the files; letters, digits, `_`, `.` and `-`. */
  readonly diskId: string;
  readonly diskSizeBytes: number;
  readonly granularityBytes?: number;
  readonly metadataSizeBytes?: number;
  /** Largest HRL entry; longer writes and zero ranges are split (default 1 MiB). */
  readonly maxEntryBytes?: number;
  /** Rewrite an exact overwrite in the open log in place (HrlWriterOptions.coalesceOverwrites; default true). */
  readonly coalesceOverwrites?: boolean;
  /** Shortest write coalesced (HrlWriterOptions.coalesceMinBytes; default CHANGE_TRACKER_DEFAULTS.coalesceMinBytes). */
  readonly coalesceMinBytes?: number;
  readonly overflowRatio?: number;
  readonly persistIntervalMs?: number;
  /** See CHANGE_TRACKER_DEFAULTS.intentIdleClearMs; 0 clears a region after one idle persist. */
  readonly intentIdleClearMs?: number;
  readonly clock?: Clock;
  /** Told whenever extents become resync-required. */
  readonly onResyncRequired?: (report: ResyncReport) => void;
  /** Creates log files (default: fs/promises); tests inject failures through it. */
  readonly openLogFile?: (filePath: string) => Promise<HrlWriterFile>;
  /**
   * With `openLogFile`: make the next log ahead through it as well, so a cut
   * takes a spare as on real files (default false: logs on injected files are
   * created in line, as tests that count them expect). Power-loss tests set it.
   */
  readonly spareOnInjectedFiles?: boolean;
}

export type { ResyncReason, SealedLogInfo } from './tracker-recovery';

/** Reads the protected disk, for resync rounds. */
export type DiskReader = (offset: number, length: number) => Promise<Buffer>;

/** What one resync round carried. */
export interface ResyncRoundResult {
  readonly log: SealedLogInfo;
  readonly bytes: number;
  /** Resync extents still waiting after this round. */
  readonly remainingBytes: number;
}

/**
 * Size of a write-intent region. Before the first write into a region that
 * is not yet marked on disk reaches the protected disk, the mark is made
 * durable; after a crash every marked region is resynced. Coarse regions
 * keep those fsyncs rare; a region is cleared once every write recorded in
 * it is covered by persisted maps and it has been idle for a persist.
 */
export const WRITE_INTENT_REGION_BYTES = 16 * 1024 * 1024;
/** Earlier persists remembered for the intent idle window (persists come at least every cut). */
const MAX_PERSIST_EPOCHS = 4096;

/** Ends the name of a log made ahead of the cut that takes it: `ID.next-N.hrl.spare` (see ChangeTracker.spare). */
const SPARE_LOG_SUFFIX = '.hrl.spare';

/** Most bytes one resync round reads at once from the disk. */
const RESYNC_READ_CHUNK_BYTES = 1024 * 1024;

export interface ResyncReport {
  readonly diskId: string;
  readonly reason: ResyncReason;
  readonly resyncBytes: number;
  /** The first extents (up to CHANGE_TRACKER_DEFAULTS.reportExtentsMax); `resyncExtents()` lists all. */
  readonly extents: readonly DirtyExtent[];
  readonly extentsTruncated: boolean;
  /** The failure that made the logs fold (reason 'log-io-error'), e.g. a seal's fdatasync failing with EIO. */
  readonly cause?: { readonly code: string; readonly message: string };
}

export interface TrackerStatus {
  readonly diskId: string;
  readonly mode: 'logging' | 'dirty-only';
  readonly resyncRequired: boolean;
  readonly resyncBytes: number;
  readonly dirtyBytes: number;
  /** Sealed logs plus the active log, in bytes. */
  readonly unshippedBytes: number;
  readonly sealedLogs: number;
  readonly activeLogEntries: number;
  /** Bytes of the active log (payloads plus its open block), in both the TS and the native write path. */
  readonly activeLogBytes: number;
  /**
   * Payload bytes the active log rewrote in place (exact overwrites
   * coalesced, HrlWriterOptions.coalesceOverwrites): bytes it did not grow by.
   */
  readonly activeLogRewrittenBytes: number;
  readonly lastResyncReason: ResyncReason | null;
  /**
   * FLUSH rounds run so far: each persists the maps and syncs the log once,
   * however many `flush()` calls it answers (calls that arrive while one
   * round runs share the next).
   */
  readonly flushRounds: number;
}

export interface CutPoint {
  readonly cutId: string;
  readonly cutTimeMs: number;
  /** Marks an app-consistent point (see MAX_APP_TAG_BYTES). */
  readonly appTag?: string;
}

type Release = () => void;

/**
 * Tracks the writes of one protected disk: the active [MS-HRL] log holds the
 * data, the native DirtyMap the extents.
 *
 * Maps (persisted together in `ID.maps.0`/`ID.maps.1`, alternately):
 * - `dirty`: every change not yet durably shipped (unshipped sealed logs,
 *   the active log, and resync extents). Rebuilt on `acknowledge`.
 * - `pending`: changes since the active log was last made durable. It is
 *   persisted before the log is fsynced, so after a crash the extents of a
 *   torn tail are known and become resync extents.
 * - `resync`: extents to compare and copy by resync (overflow, torn tails,
 *   a lost dirty map).
 *
 * Durability contract: when `flush()` resolves, every write recorded before
 * it is in a durable log or in the persisted `resync`/`dirty` maps. Writes
 * recorded but never flushed are covered only up to the last persist (a
 * flush, a rotate, or the `persistIntervalMs` timer).
 *
 * One process owns a tracker directory per disk id; all operations are
 * serialised on an internal lock.
 */
export class ChangeTracker {
  readonly diskId: string;
  readonly diskSizeBytes: number;
  private readonly dir: string;
  private readonly clock: Clock;
  private readonly overflowRatio: number;
  private readonly persistIntervalMs: number;
  private readonly metadataSizeBytes: number | undefined;
  private readonly maxEntryBytes: number | undefined;
  private readonly coalesceOverwrites: boolean | undefined;
  private readonly coalesceMinBytes: number;
  private readonly granularityBytes: number;
  private readonly onResyncRequired: ((report: ResyncReport) => void) | undefined;
  private readonly openLogFile: ((filePath: string) => Promise<HrlWriterFile>) | undefined;
  private readonly spareOnInjectedFiles: boolean;
  private mode: 'logging' | 'dirty-only';
  private nextSequence: number;
  private lastUniqueId: string;
  private writer: HrlWriter | undefined;
  private activeSequence: number | null = null;
  private sealed: SealedLogInfo[];
  /** Sum of the sealed logs' sizes (checked against the overflow limit on every write). */
  private sealedBytes: number;
  private readonly maps: { dirty: DirtyMap; pending: DirtyMap; resync: DirtyMap };
  /** Extents of the active log only, to rebuild `dirty` on acknowledge. */
  private readonly activeMap: DirtyMap;
  /** Extents of each unshipped sealed log, by file name (sparse native maps, no I/O to rebuild `dirty`). */
  private readonly logMaps: Map<string, DirtyMap>;
  private generation = 1;
  /** Generation of the last maps persist; each persist writes generation + 1 into the other slot. */
  private mapsGeneration: number;
  private persistedGeneration = 0;
  private readonly mapsWriter: TrackerMapsWriter;
  /** The flush round waiting for the lock, which later `flush()` calls join while it is last in line (see flush). */
  private nextFlushRound: { readonly done: Promise<void>; readonly ticket: number } | undefined;
  /** Counts lock requests: a flush joins a waiting round only when nothing asked for the lock after it. */
  private lockTickets = 0;
  private flushRounds = 0;
  private lockTail: Promise<void> = Promise.resolve();
  /** Operations holding or waiting for the lock. */
  private lockDepth = 0;
  private timer: TimerHandle | undefined;
  private closed = false;
  private lastResyncReason: ResyncReason | null = null;
  /** Sequences held for resync logs being written; sealed logs after the lowest wait for it. */
  private reservations: ResyncReservation[] = [];
  /**
   * The sequence of the log an app-consistent cut of several trackers is
   * sealing here while that cut is undecided: it and later logs are not
   * handed out for shipping until then (see cutAppConsistent).
   */
  private appCutHold: number | undefined;
  /** Counts folds, so a resync round can tell that one happened while it ran. */
  private folds = 0;
  /**
   * The newest sequence the receiver acknowledged, persisted before the log
   * is deleted; undefined for a state file from before it was kept (until
   * the next acknowledgement). A resync log after a fold follows it.
   */
  private shippedSequence: number | undefined;
  /** Write intent: region -> epoch of its last intent (see WRITE_INTENT_REGION_BYTES). */
  private readonly intents = new Map<number, number>();
  /** Regions the intent file on disk holds. */
  private durableIntents = new Set<number>();
  private intentEpoch = 0;
  /** Intent epoch when the operation holding the lock asked for it (everything recorded before is covered by it). */
  private opQueuedEpoch = 0;
  /** Queue epoch of the previous maps persist: regions idle since then may be cleared. */
  private lastPersistQueuedEpoch = 0;
  /** Covered epochs of earlier persists with their times, oldest first: how long a region has been idle. */
  private persistEpochs: Array<{ readonly epoch: number; readonly atMs: number }> = [];
  /** Covered epoch of the newest persist at least intentIdleClearMs old. */
  private idleEpoch = 0;
  private readonly intentIdleClearMs: number;
  private intentWrite: Promise<void> = Promise.resolve();
  /**
   * The source tap's native data path, when attached (attachNative): its
   * connection threads log and write without JavaScript and queue
   * (offset, length) records. Whenever this tracker holds its lock the
   * native writers are held too and their records taken first, so every
   * locked operation sees what a JavaScript-only tap would have recorded.
   */
  private native: NativeTapExport | undefined;
  private nativeAttentionQueued = false;
  /** The attention kind the operation holding the lock dealt with; the next release clears it. */
  private nativeAttentionHandled = 0;
  /** Whether the operation holding the lock still holds the native writers (see letNativeGo). */
  private nativeHeld = false;
  /** Whether an operation holds the lock now (not only waits for it). */
  private lockHeld = false;
  /** While a flush has let the native writers go, the records taken meanwhile (offset/length pairs). */
  private nativeSince: number[] | undefined;
  /**
   * The next log, created ahead of the cut that will take it (prepareSpare):
   * creating a log costs two syncs, which a cut would otherwise pay while
   * the disk's writes wait. Named `ID.next-N.hrl.spare` until taken, a name
   * open() deletes (a crash leaves nothing it would recover as a log).
   */
  private spare: HrlWriter | undefined;
  /** The spare being created (awaited by a cut before it holds the writers). */
  private spareMaking: Promise<void> | undefined;
  /** Names the spares (several can exist when one is discarded while the next is made). */
  private spareCount = 0;
  /** Size of the log a cut is sealing while writes already go to the next (counted as unshipped). */
  private sealingBytes = 0;
  /**
   * Set while a cut seals its log with writes already going to the next:
   * the cut holds the lock, but recordWrite's fast path may run beside it
   * (nothing else is waiting for the lock then; see recordWrite).
   */
  private writesPassCut = false;

  private constructor(options: ChangeTrackerOptions, init: { mode: 'logging' | 'dirty-only'; nextSequence: number; lastUniqueId: string; sealed: SealedLogInfo[]; maps: TrackerMaps; logMaps: Map<string, DirtyMap>; mapsGeneration: number; shippedSequence: number | undefined }) {
    this.diskId = options.diskId;
    this.diskSizeBytes = options.diskSizeBytes;
    this.dir = options.dir;
    this.clock = options.clock ?? systemClock;
    this.overflowRatio = options.overflowRatio ?? CHANGE_TRACKER_DEFAULTS.overflowRatio;
    this.persistIntervalMs = options.persistIntervalMs ?? CHANGE_TRACKER_DEFAULTS.persistIntervalMs;
    this.intentIdleClearMs = options.intentIdleClearMs ?? CHANGE_TRACKER_DEFAULTS.intentIdleClearMs;
    this.metadataSizeBytes = options.metadataSizeBytes;
    this.maxEntryBytes = options.maxEntryBytes;
    this.coalesceOverwrites = options.coalesceOverwrites;
    this.coalesceMinBytes = options.coalesceMinBytes ?? CHANGE_TRACKER_DEFAULTS.coalesceMinBytes;
    this.granularityBytes = options.granularityBytes ?? DIRTY_MAP_DEFAULT_GRANULARITY_BYTES;
    this.onResyncRequired = options.onResyncRequired;
    this.openLogFile = options.openLogFile;
    this.spareOnInjectedFiles = options.spareOnInjectedFiles ?? false;
    this.mode = init.mode;
    this.nextSequence = init.nextSequence;
    this.lastUniqueId = init.lastUniqueId;
    this.sealed = init.sealed;
    this.sealedBytes = init.sealed.reduce((sum, l) => sum + l.sizeBytes, 0);
    this.maps = init.maps;
    this.logMaps = init.logMaps;
    this.mapsGeneration = init.mapsGeneration;
    this.shippedSequence = init.shippedSequence;
    this.activeMap = new DirtyMap(this.diskSizeBytes, this.granularityBytes);
    this.mapsWriter = new TrackerMapsWriter(this.dir, this.diskId);
  }

  /**
   * Opens the tracker of a disk, recovering from whatever a crash left:
   * unsealed logs are recovered up to their last durable block and sealed,
   * the extents of their torn tails become resync extents, sealed logs
   * without a sidecar get one, and a new active log is opened.
   */
  static async open(options: ChangeTrackerOptions): Promise<ChangeTracker> {
    if (!DISK_ID_PATTERN.test(options.diskId)) throw new BlockrelayError('BR_CONFIG_INVALID', `disk id '${options.diskId}' must match ${DISK_ID_PATTERN}`);
    if (!Number.isSafeInteger(options.diskSizeBytes) || options.diskSizeBytes <= 0) throw new BlockrelayError('BR_CONFIG_INVALID', `diskSizeBytes must be a positive integer, got ${options.diskSizeBytes}`);
    const ratio = options.overflowRatio ?? CHANGE_TRACKER_DEFAULTS.overflowRatio;
    if (!(ratio > 0 && ratio <= 10)) throw new BlockrelayError('BR_CONFIG_INVALID', `overflowRatio must be in (0, 10], got ${ratio}`);
    const granularity = options.granularityBytes ?? DIRTY_MAP_DEFAULT_GRANULARITY_BYTES;
    const { dir, diskId } = options;
    const clock = options.clock ?? systemClock;
    try {
      await fsp.mkdir(dir, { recursive: true });
    } catch (err) {
      throw wrapError(err, 'BR_IO', `cannot create tracker directory ${dir}`);
    }
    const statePath = path.join(dir, `${diskId}.tracker.json`);
    const raw = await readJsonFile(statePath);
    const state = raw === undefined ? undefined : parseTrackerState(raw, statePath);
    if (state !== undefined && (state.diskSizeBytes !== options.diskSizeBytes || state.granularityBytes !== granularity || state.diskId !== diskId)) {
      throw new BlockrelayError('BR_TRACKER_STATE_CORRUPT', `${statePath} is for ${state.diskId} of ${state.diskSizeBytes} bytes at ${state.granularityBytes}-byte blocks, not ${diskId} of ${options.diskSizeBytes} at ${granularity}`, { details: { file: statePath } });
    }
    const names = await listDir(dir);
    // Only this disk's leftovers: `ID.…tmp` or `ID-SSSSSSSSSSSS.…tmp` (disk1 must not touch disk10's).
    for (const n of names) {
      const ours = n.startsWith(`${diskId}.`) || (n.startsWith(`${diskId}-`) && /^\d{12}\./.test(n.slice(diskId.length + 1)));
      if (ours && n.endsWith(TMP_SUFFIX)) await unlinkIfPresent(path.join(dir, n));
      // A next log made ahead and never taken (prepareSpare): nothing was written to it.
      // Exactly `ID.next-N.hrl.spare`: a disk named `ID.next-x` may share the directory.
      if (n.startsWith(`${diskId}.next-`) && n.endsWith(SPARE_LOG_SUFFIX) && /^\d+$/.test(n.slice(diskId.length + 6, n.length - SPARE_LOG_SUFFIX.length))) await unlinkIfPresent(path.join(dir, n));
    }
    // The sidecar of an acknowledged log (at or below shippedSequence, which
    // acknowledge writes first) with no file of that log left: acknowledge
    // was stopped between its two unlinks. Any other sidecar without its log
    // is not a leftover of ours and stays.
    const shipped = state?.shippedSequence ?? 0;
    for (const n of names) {
      const seq = parseLogName(diskId, n, SIDECAR_SUFFIX);
      if (seq === undefined || seq > shipped) continue;
      const base = logBaseName(diskId, seq);
      if (!names.some((m) => m !== n && m.startsWith(`${base}.`))) await unlinkIfPresent(path.join(dir, n));
    }
    const openLogs = names.map((n) => ({ n, seq: parseLogName(diskId, n, OPEN_LOG_SUFFIX) })).filter((x) => x.seq !== undefined).sort((a, b) => a.seq! - b.seq!);

    const reasons: ResyncReason[] = [];
    const stored = await readTrackerMaps(dir, diskId);
    let maps: TrackerMaps | undefined = stored;
    if (maps !== undefined && (maps.dirty.diskSizeBytes !== options.diskSizeBytes || maps.dirty.granularityBytes !== granularity)) maps = undefined;
    if (maps === undefined) {
      const fresh = state === undefined && openLogs.length === 0 && !names.some((n) => parseLogName(diskId, n, SEALED_LOG_SUFFIX) !== undefined);
      maps = { dirty: new DirtyMap(options.diskSizeBytes, granularity), pending: new DirtyMap(options.diskSizeBytes, granularity), resync: new DirtyMap(options.diskSizeBytes, granularity), pendingLogSequence: 0, pendingLogEndBytes: 0, durableLogEndBytes: 0 };
      if (!fresh) {
        // Without the dirty map nothing says what changed: the one case of a whole-disk resync.
        maps.resync.mark(0, options.diskSizeBytes);
        reasons.push('dirty-map-lost');
      }
    }

    // Regions marked for writes that may have reached the disk without being
    // recorded (the stop was not clean) are resynced.
    const intentFile = intentPath(dir, diskId);
    const intentBytes = await fsp.readFile(intentFile).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      throw wrapError(err, 'BR_IO', `cannot read ${intentFile}`);
    });
    let intentRegions: number[] = [];
    if (intentBytes !== undefined) {
      const { regionBytes, regions } = decodeIntents(intentBytes, intentFile);
      intentRegions = regions;
      for (const r of regions) {
        const start = r * regionBytes;
        if (start < options.diskSizeBytes) maps.resync.mark(start, Math.min(regionBytes, options.diskSizeBytes - start));
      }
      if (regions.length > 0) reasons.push('write-intent');
    }
    await recoverOpenLogs({ dir, diskId, clock, names, openLogs, maps, reasons });
    const loaded = await loadSealedLogs({ dir, diskId, clock, diskSizeBytes: options.diskSizeBytes, granularityBytes: granularity, names, maps, reasons });
    const { logMaps } = loaded;
    // A resync log sealed before `follows` was kept follows the newest log still here below it (a
    // resync round's predecessor), or the newest acknowledged; with neither known it goes without.
    const sealed = loaded.sealed.map((l, i) => {
      if (l.resync !== true || l.follows !== undefined) return l;
      const below = i > 0 ? loaded.sealed[i - 1]!.sequence : state === undefined ? 0 : state.shippedSequence;
      return below === undefined || below >= l.sequence ? l : { ...l, follows: below };
    });

    const mode = state?.mode ?? 'logging';
    // Every log name counts, set-aside `.corrupt` ones too, so no sequence is used twice.
    const seqOf = (n: string): number => parseLogName(diskId, n.replace(/\.corrupt$/, ''), SEALED_LOG_SUFFIX) ?? parseLogName(diskId, n.replace(/\.corrupt$/, ''), OPEN_LOG_SUFFIX) ?? 0;
    let maxSeq = 0;
    for (const n of await listDir(dir)) maxSeq = Math.max(maxSeq, seqOf(n));
    const lastUniqueId = sealed.length > 0 ? sealed[sealed.length - 1]!.uniqueId : state?.lastUniqueId ?? NIL_GUID;
    // dirty ⊇ every unshipped log, by construction: a persisted dirty map can
    // lack a log's extents (native records that came back after the last
    // persist of a stop, or a crash between a log write and a persist), and
    // an overflow fold would then drop the log without resyncing them. Logs
    // being dropped by an unfinished fold go to the resync map for the same reason.
    for (const m of logMaps.values()) {
      maps.dirty.merge(m);
      if (mode === 'dirty-only') maps.resync.merge(m);
    }
    maps.dirty.merge(maps.resync);
    const tracker: ChangeTracker = new ChangeTracker(options, { mode, nextSequence: Math.max(state?.nextSequence ?? 1, maxSeq + 1), lastUniqueId: state?.reservations?.length ? state.lastUniqueId : lastUniqueId, sealed, maps, logMaps, mapsGeneration: stored?.generation ?? 0, shippedSequence: state === undefined ? 0 : state.shippedSequence });
    try {
      // The file still lists the regions just turned into resync extents; the
      // first persist of the maps (below) covers them and then empties it.
      tracker.durableIntents = new Set(intentRegions);
      // A resync round cut short by a crash: its extents are still in the resync
      // map (cleared only once its log is sealed), so an empty log fills the
      // held sequence and keeps the chain; a later round carries the data.
      for (const r of state?.reservations ?? []) {
        if (sealed.some((l) => l.sequence === r.sequence)) continue;
        // A reservation from before `follows` was kept is given one now (an unfinished fold drops the sealed logs).
        await tracker.sealResyncLog(r.follows !== undefined ? r : withFollows(r, tracker.followsFor(r.sequence, mode === 'dirty-only')), undefined, undefined);
      }
      if (mode === 'dirty-only') {
        // An overflow was under way: finish dropping the logs.
        await tracker.dropAllLogs();
        await tracker.writeState();
      } else {
        await tracker.openActiveLog();
      }
      await tracker.persistMaps(true);
    } catch (err) {
      // The maps slot files may be open already, and a next log being made.
      await tracker.mapsWriter.close();
      await tracker.spareMaking;
      await tracker.discardSpare().catch(() => undefined);
      throw err;
    }
    for (const reason of new Set(reasons)) tracker.report(reason);
    tracker.scheduleTimer();
    return tracker;
  }

  /**
   * Several trackers rotate at one cut: new writes on all of them wait while
   * every active log is sealed and the next one opened, so the sealed logs
   * end at one crash-consistent point shared by all the disks. Returns the
   * sealed logs in the order of `trackers`.
   */
  static async cut(trackers: readonly ChangeTracker[], options: { cutId?: string; clock?: Clock; appTag?: string } = {}): Promise<(SealedLogInfo | undefined)[]> {
    checkAppTag(options.appTag);
    // A cut right after another (one longer than the interval) finds the
    // next log still being made: wait for it before holding the writes, so
    // the held window never includes a log's creation (its two syncs).
    // Writes recorded during that wait land before the cut (nextLogReady).
    if (trackers.some((t) => t.spareMaking !== undefined)) await ChangeTracker.sparesReady(trackers);
    // Every lock queued at once, synchronously: any write recorded after
    // the spares were ready lands behind the cut, in the next logs.
    const { ordered, release } = await ChangeTracker.holdAll(trackers);
    try {
      const point: CutPoint = { cutId: options.cutId ?? randomGuid(), cutTimeMs: (options.clock ?? ordered[0]?.clock ?? systemClock).now(), appTag: options.appTag };
      const switched = new SwitchBarrier(ordered.length);
      // Settled, not Promise.all: when one member's seal fails, the others'
      // are still running, and their locks must stay held until they end
      // (a flush or an acknowledgement must not run inside a seal).
      const settled = await Promise.allSettled(ordered.map((t) => t.rotateHeld(point, switched)));
      const failed = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
      if (failed !== undefined) throw failed.reason;
      const sealed = settled.map((s) => (s as PromiseFulfilledResult<SealedLogInfo | undefined>).value);
      return trackers.map((t) => sealed[ordered.indexOf(t)]);
    } finally {
      release();
    }
  }

  /**
   * An app-consistent cut of `trackers`: refused with BR_TAG_RESYNC_PENDING
   * (recoverable) while any of them owes a resync, since the point would
   * end a tainted log (see sealActive) that no failover may select, and an
   * operator who quiesced the application must not be told it was taken.
   * Returns the cut's identity.
   *
   * All or nothing: either every member's log carries the tag or none does.
   * The check is made again once every lock is held (a fold or a resync
   * round queued before the locks comes in between), so a refusal then
   * seals nothing. What is left is a member failing during the seal itself
   * (its log volume fails and it folds): the other members' logs are
   * already sealed with the tag, so they are kept from the shippers
   * (`appCutHold`) until every member's outcome is known, and on a failure
   * their sidecars are written again without the tag before the locks are
   * let go. Not covered: a crash of the process during the cut, which can
   * leave the tag in the sidecars written before it; the caller was then
   * never told the point was taken.
   */
  static async cutAppConsistent(trackers: readonly ChangeTracker[], appTag: string, options: { clock?: Clock } = {}): Promise<{ cutId: string; cutTimeMs: number }> {
    checkAppTag(appTag);
    const owing = (): ChangeTracker | undefined => trackers.find((t) => t.owesResync() || t.mode === 'dirty-only' || t.writer === undefined);
    const refuse = (t: ChangeTracker): BlockrelayError => new BlockrelayError('BR_TAG_RESYNC_PENDING', `disk ${t.diskId} is not in step (a resync of ${t.status().resyncBytes} bytes is owed): an app-consistent point can be taken once its resync has finished`, { details: { disk: t.diskId, resyncBytes: t.status().resyncBytes } });
    const before = owing();
    if (before !== undefined) throw refuse(before);
    const { ordered, release } = await ChangeTracker.holdAll(trackers);
    try {
      const late = owing();
      if (late !== undefined) throw refuse(late);
      const point: CutPoint = { cutId: randomGuid(), cutTimeMs: (options.clock ?? ordered[0]?.clock ?? systemClock).now(), appTag };
      for (const t of ordered) t.appCutHold = t.activeSequence ?? undefined;
      // Settled, not Promise.all: every member's seal has ended before the outcome is judged.
      // No switch barrier: writes stay held through the seals (app cuts are
      // rare, and the outcome is judged before any write goes on).
      const settled = await Promise.allSettled(ordered.map((t) => t.rotateHeld(point)));
      const failed = settled.findIndex((s) => s.status === 'rejected' || s.value === undefined || s.value.tainted === true);
      if (failed >= 0) {
        const dropped = await Promise.allSettled(settled.map((s, i) => (s.status === 'fulfilled' && s.value !== undefined ? ordered[i]!.dropAppTag(s.value) : undefined)));
        // A member whose maps could not even be persisted by the fold may keep the tag: that failure comes first.
        const stuck = dropped.find((d) => d.status === 'rejected');
        if (stuck !== undefined) throw stuck.reason;
        const outcome = settled[failed]!;
        throw outcome.status === 'rejected' ? outcome.reason : refuse(ordered[failed]!);
      }
      return { cutId: point.cutId, cutTimeMs: point.cutTimeMs };
    } finally {
      for (const t of ordered) t.appCutHold = undefined;
      release();
    }
  }

  /**
   * Resolves once the next log, made ahead after the last cut, is ready (at
   * once when none is being made). A cut waits for it before it holds the
   * writes: from then on every write recorded after `cut()` is called lands
   * behind the cut; during the wait, writes still go to the active log.
   */
  async nextLogReady(): Promise<void> {
    await this.spareMaking;
  }

  /**
   * Waits for the next logs being made ahead (prepareSpare; never rejects),
   * with no write held. Called only when one is being made: otherwise the
   * locks are queued synchronously with the cut() call.
   */
  private static async sparesReady(trackers: readonly ChangeTracker[]): Promise<void> {
    await Promise.all(trackers.map((t) => t.spareMaking));
  }

  /**
   * Takes the lock of every tracker, queued on all at once (synchronously:
   * a write recorded after the call lands behind it), in one global order
   * so two such calls cannot deadlock. `release` lets all of them go.
   */
  private static async holdAll(trackers: readonly ChangeTracker[]): Promise<{ ordered: ChangeTracker[]; release: () => void }> {
    const ordered = [...new Set(trackers)].sort((a, b) => (a.dir + a.diskId < b.dir + b.diskId ? -1 : 1));
    const releases: Release[] = [];
    const release = (): void => {
      for (const r of releases.reverse()) r();
    };
    try {
      const queued = ordered.map((t) => t.acquire());
      for (const q of queued) releases.push(await q);
    } catch (err) {
      release();
      throw err;
    }
    return { ordered, release };
  }

  /**
   * An app-consistent cut failed on another member: `info`, sealed by it,
   * becomes an ordinary crash-consistent log (its sidecar is written again
   * without the tag). If even that write fails the log volume is failing:
   * the logs are folded, so none keeps the tag. Called under the lock.
   */
  private async dropAppTag(info: SealedLogInfo): Promise<void> {
    const i = this.sealed.indexOf(info);
    if (i < 0 || info.appTag === undefined) return;
    const { name, path: logPath, sidecarPath, appTag: _dropped, ...sidecar } = info;
    await this.logIo(async () => {
      await writeFileAtomic(sidecarPath, JSON.stringify(sidecar satisfies LogSidecar, null, 2));
      this.sealed[i] = { ...sidecar, name, path: logPath, sidecarPath };
    });
  }

  /** Records a write the source made (call before or with the write to the disk). */
  async recordWrite(offset: number, data: Uint8Array): Promise<void> {
    this.checkRange(offset, data.length);
    // Fast path: nobody holds or waits for the lock (or only a cut holds it,
    // sealing its log while the next one takes writes) and the write is only
    // a copy into the log's buffers that cannot overflow, so it completes
    // synchronously, without the lock's promise round trip.
    const writer = this.writer;
    if ((this.lockDepth === 0 || (this.lockDepth === 1 && this.writesPassCut)) && !this.closed && writer !== undefined && writer.appendsInMemory(data.length) &&
        this.sealedBytes + this.sealingBytes + writer.sizeBytes + data.length + writer.metadataSizeBytes <= this.overflowRatio * this.diskSizeBytes) {
      this.markChanged(offset, data.length);
      return writer.append(offset, data);
    }
    return this.locked(async () => {
      if (data.length === 0) return;
      this.markChanged(offset, data.length);
      const w = this.writer;
      if (w !== undefined && (await this.logIo(() => w.append(offset, data)))) await this.checkOverflow();
    });
  }

  /**
   * Records that a range now reads as zeroes (write-zeroes or trim). [MS-HRL]
   * has only writes, so the range is logged as zero-filled entries of at most
   * `maxEntryBytes` each; the overflow rule bounds how much of it is logged.
   */
  async recordZeroes(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    return this.locked(async () => {
      if (length === 0) return;
      this.markChanged(offset, length);
      const w = this.writer;
      if (w === undefined) return;
      // A range that would take the logs past the overflow limit folds now
      // instead of after it is logged: a whole-disk TRIM (mkfs, fstrim)
      // would otherwise write the disk's size in zero entries first, up to
      // filling the log volume, only to drop them. The end state is the
      // same: the range is in the dirty map the fold moves to resync.
      if (this.unshippedBytes() + length > this.overflowRatio * this.diskSizeBytes) {
        await this.foldLogs('overflow');
        return;
      }
      if (await this.logIo(() => w.appendZeroes(offset, length))) await this.checkOverflow();
    });
  }

  /** A trim is logged like write-zeroes (a replica that reads zeroes there is correct). */
  recordTrim(offset: number, length: number): Promise<void> {
    return this.recordZeroes(offset, length);
  }

  /**
   * The source's FLUSH/FUA: persists the maps (so a torn tail is known) and
   * makes the active log durable up to here, both at once.
   *
   * The two syncs need no order. A crash that finds the new maps but not the
   * whole log sees a log shorter than their `pendingLogEndBytes`: a torn
   * tail, whose pending extents are resynced (tracker-recovery.ts). A crash
   * that finds the whole log but the previous maps recovers the log by its
   * own checksums to its durable end, at or past the previous maps' end, so
   * their pending writes are held; the writes after those maps are in the
   * log and, until a persist covers them, in durable write intents. Either
   * way every write recorded before an answered flush is in a durable log or
   * a persisted resync extent, and an unanswered flush promised nothing.
   *
   * Calls coalesce: a flush asked while a round waits for the lock, with no
   * other operation queued behind that round, joins it (the round covers
   * everything recorded before it starts); one asked while a round runs
   * waits for the next round, never a third. So N flushes arriving during
   * one round cost one more round, not N.
   */
  flush(): Promise<void> {
    const next = this.nextFlushRound;
    if (next !== undefined && next.ticket === this.lockTickets) return next.done;
    const done: Promise<void> = this.locked(async () => {
      // From here on a new flush needs a round of its own: this one's snapshot is taken now.
      if (this.nextFlushRound?.done === done) this.nextFlushRound = undefined;
      await this.flushRound();
    });
    const round = { done, ticket: this.lockTickets };
    this.nextFlushRound = round;
    // Also when the round fails before it starts (the lock's hold failed).
    const forget = (): void => {
      if (this.nextFlushRound === round) this.nextFlushRound = undefined;
    };
    done.then(forget, forget);
    return done;
  }

  private async flushRound(): Promise<void> {
    this.assertOpen();
    this.flushRounds++;
    // Native writes go on once the maps are snapshotted; what they record
    // meanwhile is not covered by this flush and stays pending.
    const since: number[] = [];
    this.nativeSince = since;
    try {
      const w = this.writer;
      // persistMaps snapshots the maps (and the log's end) before its first
      // await; the log sync starts after, so it reaches at least that end.
      const persisting = this.persistMaps(false, true);
      const syncing = w === undefined ? Promise.resolve() : w.flush();
      const [persisted, synced] = await Promise.allSettled([persisting, syncing]);
      if (persisted.status === 'rejected') {
        // The log's own failure must not be dropped with it: Linux reports a
        // writeback error to one fdatasync only, so a retried FLUSH would
        // find the log "durable". Fold now (everything unshipped into the
        // resync map); if even that persist fails, the writer stays poisoned
        // and every later flush fails or folds.
        if (synced.status === 'rejected') await this.logIo(() => Promise.reject(synced.reason)).catch(() => undefined);
        throw persisted.reason;
      }
      // A log I/O failure folds the logs (after the maps write, never beside it).
      const durable = w !== undefined && (synced.status === 'fulfilled' || (await this.logIo(() => Promise.reject(synced.reason))));
      if (durable && this.maps.pending.dirtyBlockCount > 0) {
        this.maps.pending.clearAll();
        if (this.mode === 'logging') for (let i = 0; i + 1 < since.length; i += 2) this.maps.pending.mark(since[i]!, since[i + 1]!);
        this.generation++;
      }
    } finally {
      this.nativeSince = undefined;
    }
  }

  /** Seals the active log and opens the next in one step; undefined in dirty-only mode. */
  async rotate(options: { appTag?: string } = {}): Promise<SealedLogInfo | undefined> {
    checkAppTag(options.appTag);
    if (this.spareMaking !== undefined) await this.nextLogReady();
    return this.locked(() => this.rotateHeld({ cutId: randomGuid(), cutTimeMs: this.clock.now(), appTag: options.appTag }, new SwitchBarrier(1)));
  }

  /** Sealed logs not yet acknowledged, in apply order. */
  sealedLogs(): SealedLogInfo[] {
    // A resync log being written comes before every log sealed after its
    // reservation: those wait, so logs always leave in sequence order.
    // So does an app-consistent log while its cut is undecided on another member.
    const held = this.reservations.reduce((min, r) => Math.min(min, r.sequence), this.appCutHold ?? Number.POSITIVE_INFINITY);
    return this.sealed.filter((s) => s.sequence < held);
  }

  /**
   * The receiver has made `name` durable: delete it and its sidecar, and
   * rebuild the dirty map from what is still unshipped, so nothing a newer
   * log (or the active log, or a pending resync) covers is cleared. Returns
   * false when the log is not (any longer) listed, e.g. dropped by overflow.
   */
  acknowledge(name: string): Promise<boolean> {
    return this.locked(async () => {
      const i = this.sealed.findIndex((s) => s.name === name);
      if (i < 0) return false;
      // Out of the overflow sum before the native writers go: the limit they
      // are handed then counts the room this log frees (nothing refreshes it
      // later, as they are no longer held when the lock is released).
      const [log] = this.sealed.splice(i, 1);
      this.sealedBytes -= log!.sizeBytes;
      // Nothing below depends on writes held: records arriving meanwhile mark
      // the maps as always (rebuildDirty runs without an await). Held, the
      // disk's writes waited for the unlinks and three syncs of every log.
      this.letNativeGo();
      // Recorded before the log is deleted: every log that left the source is at or below it (followsFor).
      if (this.shippedSequence === undefined || log!.sequence > this.shippedSequence) {
        const shippedBefore = this.shippedSequence;
        this.shippedSequence = log!.sequence;
        try {
          await this.writeState();
        } catch (err) {
          // Still listed: a later acknowledgement deletes it, and writes the
          // state again (it skips that while shippedSequence says it is done).
          this.shippedSequence = shippedBefore;
          this.sealed.splice(i, 0, log!);
          this.sealedBytes += log!.sizeBytes;
          // The writers went with a limit that does not count the log: held
          // again, the lock's release hands them one that does. Not a bare
          // releaseNative: the export counts holds, and one the tracker does
          // not hold would end another's (pauseNative's).
          await this.holdNativeAgain();
          throw err;
        }
      }
      this.logMaps.delete(log!.name);
      await unlinkIfPresent(log!.path);
      await unlinkIfPresent(log!.sidecarPath);
      await syncDirectory(this.dir);
      await this.rebuildDirty();
      await this.persistMaps(true);
      return true;
    });
  }

  /** Every extent that must be resynced. */
  resyncExtents(): Generator<DirtyExtent> {
    return this.maps.resync.extents();
  }

  /**
   * Starts a resync: returns a copy of the resync extents and, after an
   * overflow, goes back to logging (writes from now on are logged, so the
   * resync only needs the extents in the copy). Pass the copy to
   * `completeResync` once the replica holds those extents.
   */
  beginResync(): Promise<DirtyMap> {
    return this.locked(async () => {
      this.assertOpen();
      const snapshot = new DirtyMap(this.diskSizeBytes, this.granularityBytes);
      snapshot.merge(this.maps.resync);
      if (this.mode === 'dirty-only') {
        this.mode = 'logging';
        try {
          await this.openActiveLog();
        } catch (err) {
          this.mode = 'dirty-only';
          throw err;
        }
      }
      return snapshot;
    });
  }

  /**
   * One round of resync carried in the log stream: holds the next sequence
   * for a resync log, seals the active log before it and opens the next one
   * after it (so writes during the round are logged and applied after the
   * round's data), then reads up to `maxBytes` of resync extents from the
   * disk into the resync log and seals it. Each block is read after the
   * round began, so applying the resync log and then the logs after it
   * leaves the replica equal to the source; the resync log's own end is not
   * a crash-consistent point (its sidecar says `resync`).
   *
   * Returns undefined when nothing needs a resync. A round that fails to
   * read still fills its sequence with an empty log, and its extents stay
   * in the resync map.
   */
  async resyncRound(read: DiskReader, maxBytes: number): Promise<ResyncRoundResult | undefined> {
    if (!Number.isSafeInteger(maxBytes) || maxBytes < this.granularityBytes) throw new RangeError(`maxBytes must be a whole number of at least ${this.granularityBytes}, got ${maxBytes}`);
    const started = await this.locked(async () => {
      this.assertOpen();
      if (this.maps.resync.dirtyBytes() === 0) return undefined;
      const snapshot = new DirtyMap(this.diskSizeBytes, this.granularityBytes);
      let taken = 0;
      for (const e of this.maps.resync.extents()) {
        const length = Math.min(e.length, maxBytes - taken);
        if (length <= 0) break;
        snapshot.mark(e.offset, length);
        taken += length;
      }
      if (this.writer !== undefined) {
        const point: CutPoint = { cutId: randomGuid(), cutTimeMs: this.clock.now() };
        if (!(await this.logIo(async () => { await this.sealActive(point); }))) return undefined;
      }
      const sequence = this.nextSequence++;
      const reservation = withFollows({ sequence, uniqueId: randomGuid(), previousUniqueId: this.lastUniqueId }, this.followsFor(sequence, false));
      this.reservations.push(reservation);
      this.lastUniqueId = reservation.uniqueId;
      this.mode = 'logging';
      await this.writeState();
      if (!(await this.logIo(() => this.openActiveLog()))) {
        // The fold dropped every log; the held sequence is still filled below.
      }
      await this.persistMaps(true);
      return { reservation, snapshot, folds: this.folds };
    });
    if (started === undefined) return undefined;
    const { reservation, snapshot, folds } = started;
    const log = await this.sealResyncLog(reservation, snapshot, read).catch(async (err: unknown) => {
      // The disk could not be read: keep the sequence stream whole with an
      // empty log; the extents stay in the resync map for the next round.
      const empty = await this.sealResyncLog(reservation, undefined, undefined);
      throw Object.assign(wrapError(err, 'BR_IO', `resync round of ${this.diskId} could not read the disk`), { emptyLog: empty.name });
    });
    return this.locked(async () => {
      // A fold during the round put later writes of these extents into the
      // resync map as well: clearing the snapshot then could lose them.
      if (this.folds === folds) for (const e of snapshot.extents()) this.maps.resync.clear(e.offset, e.length);
      await this.rebuildDirty();
      await this.persistMaps(true);
      return { log, bytes: snapshot.dirtyBytes(), remainingBytes: this.maps.resync.dirtyBytes() };
    });
  }

  /**
   * Writes the resync log of `reservation` (empty when no snapshot) to a
   * temporary file, seals it, and publishes it with its sidecar under the
   * held sequence.
   */
  private async sealResyncLog(reservation: ResyncReservation, snapshot: DirtyMap | undefined, read: DiskReader | undefined): Promise<SealedLogInfo> {
    const tmp = this.logPath(reservation.sequence, RESYNC_LOG_TMP_SUFFIX);
    await unlinkIfPresent(tmp);
    const writer = await HrlWriter.create(tmp, {
      uniqueId: reservation.uniqueId,
      previousUniqueId: reservation.previousUniqueId,
      metadataSizeBytes: this.metadataSizeBytes,
      maxEntryBytes: this.maxEntryBytes,
      clock: this.clock,
      // A resync log is written once per extent, disjoint: nothing to coalesce.
      coalesceOverwrites: false,
    });
    let done;
    try {
      if (snapshot !== undefined && read !== undefined) {
        for (const e of snapshot.extents()) {
          for (let at = e.offset; at < e.offset + e.length; at += RESYNC_READ_CHUNK_BYTES) {
            const length = Math.min(RESYNC_READ_CHUNK_BYTES, e.offset + e.length - at);
            await writer.append(at, await read(at, length));
          }
        }
      }
      done = await writer.seal();
    } catch (err) {
      await writer.close().catch(() => undefined);
      await unlinkIfPresent(tmp);
      throw err;
    }
    await writer.close();
    return this.locked(async () => {
      const now = this.clock.now();
      // A fold while the log was written gave the reservation a new `follows` (the log it named was folded).
      const follows = (this.reservations.find((r) => r.sequence === reservation.sequence) ?? reservation).follows;
      const sidecar: LogSidecar = {
        version: 1, diskId: this.diskId, sequence: reservation.sequence, uniqueId: done.uniqueId, previousUniqueId: done.previousUniqueId, sizeBytes: done.sizeBytes, entryCount: done.entryCount,
        cutId: randomGuid(), cutTime: new Date(now).toISOString(), cutTimeMs: now, recovered: snapshot === undefined, resync: true,
        ...(follows === undefined ? {} : { follows }),
      };
      const sidecarPath = this.logPath(reservation.sequence, SIDECAR_SUFFIX);
      const sealedPath = this.logPath(reservation.sequence, SEALED_LOG_SUFFIX);
      try {
        await writeFileAtomic(sidecarPath, JSON.stringify(sidecar, null, 2));
        await fsp.rename(tmp, sealedPath);
        await syncDirectory(this.dir);
      } catch (err) {
        throw wrapError(err, 'BR_IO', `cannot publish resync log ${sealedPath}`);
      }
      const info: SealedLogInfo = { ...sidecar, name: path.basename(sealedPath), path: sealedPath, sidecarPath };
      this.sealed.push(info);
      this.sealed.sort((a, b) => a.sequence - b.sequence);
      this.sealedBytes += info.sizeBytes;
      const logMap = new DirtyMap(this.diskSizeBytes, this.granularityBytes);
      if (snapshot !== undefined) logMap.merge(snapshot);
      this.logMaps.set(info.name, logMap);
      this.reservations = this.reservations.filter((r) => r.sequence !== reservation.sequence);
      await this.writeState();
      return info;
    });
  }

  /** Clears the resynced extents of `snapshot` from the resync and dirty maps. */
  completeResync(snapshot: DirtyMap): Promise<void> {
    return this.locked(async () => {
      this.assertOpen();
      for (const e of snapshot.extents()) this.maps.resync.clear(e.offset, e.length);
      await this.rebuildDirty();
      await this.persistMaps(true);
    });
  }

  /** The active log's size in bytes (0 while none is open): what the source role's size cut reads, 40 times a second, without the rest of `status()`. */
  get activeLogBytes(): number {
    return this.writer?.sizeBytes ?? 0;
  }

  status(): TrackerStatus {
    const resyncBytes = this.maps.resync.dirtyBytes();
    return {
      diskId: this.diskId,
      mode: this.mode,
      resyncRequired: resyncBytes > 0,
      resyncBytes,
      dirtyBytes: this.maps.dirty.dirtyBytes(),
      unshippedBytes: this.unshippedBytes(),
      sealedLogs: this.sealed.length,
      activeLogEntries: this.writer?.entryCount ?? 0,
      activeLogBytes: this.activeLogBytes,
      activeLogRewrittenBytes: this.writer?.rewrittenBytes ?? 0,
      lastResyncReason: this.lastResyncReason,
      flushRounds: this.flushRounds,
    };
  }

  /** The dirty extents (everything not yet durably shipped, plus resync extents). */
  dirtyExtents(): Generator<DirtyExtent> {
    return this.maps.dirty.extents();
  }

  /**
   * Stops the tracker. With `seal` (default) the active log is sealed as a
   * last log; without, it is flushed and left open for recovery at the next
   * open. The maps are persisted either way.
   */
  close(options: { seal?: boolean } = {}): Promise<void> {
    return this.locked(async () => {
      if (this.closed) return;
      this.timer?.cancel();
      this.timer = undefined;
      try {
        await this.closeHeld(options);
      } catch (err) {
        // The slot files are not left open by a close that failed; a retried
        // close (or any persist) opens them again.
        await this.mapsWriter.close().catch(() => undefined);
        throw err;
      }
    });
  }

  /** The body of close(), under the lock. */
  private async closeHeld(options: { seal?: boolean }): Promise<void> {
    if (this.writer !== undefined) {
      if (options.seal ?? true) {
        if (await this.logIo(() => this.sealActive({ cutId: randomGuid(), cutTimeMs: this.clock.now() }).then(() => undefined))) {
          this.activeSequence = null;
          await this.writeState();
        }
      } else {
        await this.persistMaps(false);
        const w = this.writer;
        if (await this.logIo(() => w.flush())) {
          await w.close();
          this.writer = undefined;
          this.maps.pending.clearAll();
          this.generation++;
        }
      }
    }
    await this.persistMaps(false);
    await this.spareMaking;
    await this.discardSpare();
    // A clean stop: everything written is recorded and persisted.
    this.intents.clear();
    await this.writeIntents();
    this.closed = true;
    await this.mapsWriter.close();
  }

  // ---- internals ----

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.diskSizeBytes) {
      throw new BlockrelayError('BR_TARGET_OUT_OF_RANGE', `${this.diskId}: write [${offset}, +${length}) is outside the ${this.diskSizeBytes}-byte disk`, { details: { offset, length, diskSizeBytes: this.diskSizeBytes } });
    }
  }

  private assertOpen(): void {
    if (this.closed) throw new BlockrelayError('BR_HRL_CLOSED', `change tracker of ${this.diskId} is closed`);
  }

  private markChanged(offset: number, length: number): void {
    this.assertOpen();
    this.maps.dirty.mark(offset, length);
    if (this.mode === 'dirty-only') {
      this.maps.resync.mark(offset, length);
    } else {
      // `pending` only matters while a log can have a torn tail.
      this.maps.pending.mark(offset, length);
      this.activeMap.mark(offset, length);
    }
    this.generation++;
  }

  private acquire(): Promise<Release> {
    this.lockTickets++;
    const askedEpoch = this.intentEpoch;
    const previous = this.lockTail;
    let resolve!: () => void;
    this.lockTail = new Promise<void>((r) => { resolve = r; });
    // Counted from the moment of asking, so the write fast path also yields to waiters.
    this.lockDepth++;
    let released = false;
    const release: Release = () => {
      if (released) return;
      released = true;
      this.lockDepth--;
      this.lockHeld = false;
      if (this.nativeHeld) {
        this.nativeHeld = false;
        this.releaseNative();
      }
      resolve();
    };
    return previous.then(async () => {
      this.opQueuedEpoch = askedEpoch;
      this.lockHeld = true;
      if (this.native !== undefined) {
        // The locked section starts once no native write is in flight; the
        // wait for the disk is off the main thread.
        this.nativeHeld = true;
        this.applyNativeRecords(await this.native.hold());
      }
      return release;
    });
  }

  /**
   * Hands the native writers of the source tap to this tracker (see the
   * `native` field). The export starts held; this releases it into the
   * tracker's current mode. One export per tracker.
   */
  attachNative(exp: NativeTapExport): void {
    if (this.native !== undefined) throw new BlockrelayError('BR_INTERNAL', `${this.diskId}: a native tap export is already attached`);
    this.assertOpen();
    if (this.openLogFile !== undefined) throw new BlockrelayError('BR_INTERNAL', `${this.diskId}: logs on injected files cannot take native appends`);
    this.native = exp;
    exp.setDurableRegions(Float64Array.from(this.durableIntents));
    // Created held. An operation holding the lock now (it took it before
    // the export existed) takes that hold over and lets it go when it ends.
    // Otherwise it is let go here, even with operations waiting for the
    // lock: each takes its own hold when its turn comes, and keeping the
    // creation hold as well would leave one hold never released (every
    // native write blocked for good).
    if (this.lockHeld) this.nativeHeld = true;
    else this.releaseNative();
  }

  /**
   * Lets the native writers go on before the operation holding the lock
   * ends, once it has taken what it needs from them (a maps snapshot, a
   * closed log block): the fsyncs that follow then do not stall the disk's
   * writes. Their records are applied as they arrive.
   */
  private letNativeGo(): void {
    if (!this.nativeHeld) return;
    this.nativeHeld = false;
    this.releaseNative();
  }

  /**
   * Ends the native data path's attachment (its server closed): takes its
   * last records and leaves it held, so no write it still had queued can
   * bypass the tracker. A later server may attach a new export.
   */
  detachNative(exp: NativeTapExport): void {
    if (this.native !== exp) return;
    // Its records arrive once its queue is empty (at the latest when it is closed).
    exp.hold().then((records) => this.applyNativeRecords(records), () => undefined);
    this.native = undefined;
    this.nativeHeld = false;
  }

  /**
   * Holds the native writers (and takes their records) while the tap carries
   * out a mutation in TypeScript, so none overtakes it; `resumeNative` ends
   * the hold. Calls nest. No new native write starts from the call on; the
   * promise resolves once none is in flight either.
   */
  async pauseNative(): Promise<void> {
    if (this.native !== undefined) this.applyNativeRecords(await this.native.hold());
  }

  /**
   * Ends one `pauseNative` once every record queued so far has been logged:
   * a TypeScript record (recordZeroes) is appended when it gets the lock,
   * which may be after its disk operation, and no native write may be
   * logged before it.
   */
  resumeNative(): void {
    this.locked(async () => undefined)
      .catch(() => undefined)
      .finally(() => this.releaseNative());
  }

  /** Whether attachNative can work: the logs are real files the addon appends to. */
  get canAttachNative(): boolean {
    return this.openLogFile === undefined && this.native === undefined && !this.closed;
  }

  /**
   * The native export has records or needs attention (its log passed the
   * overflow limit or failed): takes the records, and lets a locked
   * operation fold or check the overflow.
   */
  onNativeNotify(): void {
    const exp = this.native;
    if (exp === undefined) return;
    this.applyNativeRecords(exp.drain());
    if (exp.attention()[0] === 0 || this.nativeAttentionQueued || this.closed) return;
    this.nativeAttentionQueued = true;
    this.locked(async () => {
      this.nativeAttentionQueued = false;
      // The kind dealt with here; the release at the end of this operation
      // clears it (and only it: one raised meanwhile stays for the next turn).
      const kind = this.native?.attention()[0] ?? 0;
      if (this.closed || this.writer === undefined) return;
      const appender = this.writer.nativeAppender;
      if (appender !== undefined && appender.state()[4] !== 0) await this.foldLogs('log-io-error');
      else await this.checkOverflow();
      this.nativeAttentionHandled = kind;
    }).catch(() => {
      this.nativeAttentionQueued = false;
    });
  }

  /** Write intent for a native write: resolves once its regions are durable and the native side knows it. */
  async intendNative(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    await this.intend(offset, length);
    this.native?.setDurableRegions(Float64Array.from(this.durableIntents));
  }

  private applyNativeRecords(pairs: Float64Array): void {
    if (pairs.length === 0 || this.closed) return;
    const epoch = ++this.intentEpoch;
    const since = this.nativeSince;
    for (let i = 0; i + 1 < pairs.length; i += 2) {
      const offset = pairs[i]!;
      const length = pairs[i + 1]!;
      this.markChanged(offset, length);
      since?.push(offset, length);
      const last = Math.floor((offset + length - 1) / WRITE_INTENT_REGION_BYTES);
      for (let r = Math.floor(offset / WRITE_INTENT_REGION_BYTES); r <= last; r++) this.intents.set(r, epoch);
    }
  }

  /** Lets the native writers go on in the tracker's current mode, with its current log and overflow limit. */
  private releaseNative(): void {
    const exp = this.native;
    if (exp === undefined) return;
    // Closed: writes fail from now on, as recordWrite does.
    const handled = this.nativeAttentionHandled;
    this.nativeAttentionHandled = 0;
    if (this.closed) exp.release(NATIVE_TAP_MODE.refuse, null, 0);
    else if (this.mode === 'logging' && this.writer !== undefined) {
      const limit = Math.max(0, this.overflowRatio * this.diskSizeBytes - this.sealedBytes - this.sealingBytes);
      exp.release(NATIVE_TAP_MODE.logging, this.writer.nativeAppender ?? null, limit, handled);
    } else {
      exp.release(NATIVE_TAP_MODE.dirtyOnly, null, 0);
    }
  }

  private async locked<T>(fn: () => Promise<T>): Promise<T> {
    const release = await this.acquire();
    try {
      return await fn();
    } finally {
      release();
    }
  }

  private logPath(sequence: number, suffix: string): string {
    return path.join(this.dir, logBaseName(this.diskId, sequence) + suffix);
  }

  /**
   * Opens the next log: the spare when there is one (a rename; writeState's
   * directory sync below makes the name durable), else a new file.
   */
  private async openActiveLog(): Promise<void> {
    const sequence = this.nextSequence++;
    const file = this.logPath(sequence, OPEN_LOG_SUFFIX);
    this.writer = (await this.useSpare(file)) ?? await HrlWriter.create(file, this.activeLogOptions(this.lastUniqueId));
    this.activeSequence = sequence;
    this.lastUniqueId = this.writer.uniqueId;
    await this.writeState();
    this.prepareSpare();
  }

  /**
   * Starts creating the log that will follow the active one, in the
   * background (logs on injected files are created in line, as tests that
   * count them expect, unless `spareOnInjectedFiles`). It follows `lastUniqueId`; one that no longer
   * follows it when taken (a resync log came in between) is discarded.
   */
  private prepareSpare(): void {
    if ((this.openLogFile !== undefined && !this.spareOnInjectedFiles) || this.closed || this.mode !== 'logging' || this.spare !== undefined || this.spareMaking !== undefined) return;
    const file = path.join(this.dir, `${this.diskId}.next-${++this.spareCount}${SPARE_LOG_SUFFIX}`);
    const previousUniqueId = this.lastUniqueId;
    this.spareMaking = (async () => {
      try {
        const w = await HrlWriter.create(file, this.activeLogOptions(previousUniqueId));
        this.spare = w;
        // Closed or folded meanwhile: a spare is kept only while logging.
        if (this.closed || this.mode !== 'logging') await this.discardSpare();
      } catch {
        // No spare: the next cut creates its log in line (and reports a failing volume then).
        await unlinkIfPresent(file).catch(() => undefined);
      } finally {
        this.spareMaking = undefined;
      }
    })();
  }

  /** How an active log (made in line or ahead as the spare) is written, following `previousUniqueId`. */
  private activeLogOptions(previousUniqueId: string): HrlWriterOptions {
    return {
      previousUniqueId,
      metadataSizeBytes: this.metadataSizeBytes,
      maxEntryBytes: this.maxEntryBytes,
      coalesceOverwrites: this.coalesceOverwrites,
      coalesceMinBytes: this.coalesceMinBytes,
      clock: this.clock,
      openFile: this.openLogFile,
    };
  }

  /** Takes the spare under `file` if it follows the active log; undefined (and discarded) otherwise, or when the rename fails. */
  private async useSpare(file: string): Promise<HrlWriter | undefined> {
    const w = this.spare;
    if (w === undefined) return undefined;
    if (w.previousUniqueId !== this.lastUniqueId) {
      // Off the caller's path (a resync round's held section): its name is unique.
      void this.discardSpare().catch(() => undefined);
      return undefined;
    }
    this.spare = undefined;
    try {
      await fsp.rename(w.path, file);
      w.renamed(file);
      return w;
    } catch {
      await closeAndDelete(w);
      return undefined;
    }
  }

  private async discardSpare(): Promise<void> {
    const w = this.spare;
    this.spare = undefined;
    if (w !== undefined) await closeAndDelete(w);
  }

  private async writeState(): Promise<void> {
    const state: TrackerState = {
      version: 1, diskId: this.diskId, diskSizeBytes: this.diskSizeBytes, granularityBytes: this.granularityBytes,
      mode: this.mode, nextSequence: this.nextSequence, lastUniqueId: this.lastUniqueId, activeSequence: this.activeSequence,
      ...(this.reservations.length > 0 ? { reservations: this.reservations } : {}),
      ...(this.shippedSequence === undefined ? {} : { shippedSequence: this.shippedSequence }),
    };
    await writeFileAtomic(path.join(this.dir, `${this.diskId}.tracker.json`), JSON.stringify(state, null, 2));
  }

  /** `releaseNative`: let the native writers go once the maps are encoded (see letNativeGo). */
  private async persistMaps(force: boolean, releaseNative = false): Promise<void> {
    // Nothing changed since the last persist: every recorded write is covered already.
    if (!force && this.generation === this.persistedGeneration) {
      if (releaseNative) this.letNativeGo();
      return this.clearIdleIntents();
    }
    const generation = this.generation;
    const pendingLogSequence = this.writer === undefined ? 0 : this.activeSequence ?? 0;
    const pendingLogEndBytes = this.writer?.sizeBytes ?? 0;
    const durableLogEndBytes = this.writer?.durableEndBytes ?? 0;
    // Encodes the maps before its first await.
    const writing = this.mapsWriter.write({ ...this.maps, pendingLogSequence, pendingLogEndBytes, durableLogEndBytes }, this.mapsGeneration + 1);
    if (releaseNative) this.letNativeGo();
    await writing;
    this.mapsGeneration++;
    this.persistedGeneration = generation;
    await this.clearIdleIntents();
  }

  /**
   * Called with the lock held once the maps on disk cover everything
   * recorded: an intent issued before this operation asked for the lock had
   * its record queued ahead of it, so that write is in persisted maps and
   * its region needs no resync after a crash. Regions are cleared only when
   * they also had no intent since the previous persist, and none for
   * `intentIdleClearMs`, so a region written every few cuts is not re-marked
   * (an fsync before its next write) after every persist.
   */
  private async clearIdleIntents(): Promise<void> {
    const coveredEpoch = this.opQueuedEpoch;
    // A region with no intent after the covered epoch of a persist at least
    // intentIdleClearMs old has been idle that long.
    let idleEpoch = Number.POSITIVE_INFINITY;
    if (this.intentIdleClearMs > 0) {
      const now = this.clock.now();
      while (this.persistEpochs.length > 0 && now - this.persistEpochs[0]!.atMs >= this.intentIdleClearMs) this.idleEpoch = this.persistEpochs.shift()!.epoch;
      // Forgetting the oldest entry only clears less, never too much.
      if (this.persistEpochs.length >= MAX_PERSIST_EPOCHS) this.persistEpochs.shift();
      this.persistEpochs.push({ epoch: coveredEpoch, atMs: now });
      idleEpoch = this.idleEpoch;
    }
    const idleSince = Math.min(coveredEpoch, this.lastPersistQueuedEpoch, idleEpoch);
    // The native writers are held for the decision (their queued records
    // count as intents after it), and their flags for cleared regions go
    // before the file is rewritten, so no write reaches a cleared region
    // without marking it again. Records only make intents newer, so with no
    // candidate now there is nothing to decide and no hold: a section that
    // let the writers go (a FLUSH) keeps them running through its fsyncs.
    let candidate = false;
    for (const epoch of this.intents.values()) {
      if (epoch <= idleSince) {
        candidate = true;
        break;
      }
    }
    if (candidate) {
      const hold = this.native !== undefined && !this.nativeHeld;
      if (hold) await this.pauseNative();
      try {
        for (const [region, epoch] of this.intents) if (epoch <= idleSince) this.intents.delete(region);
        if (this.native !== undefined) this.native.setDurableRegions(Float64Array.from([...this.durableIntents].filter((r) => this.intents.has(r))));
      } finally {
        // Let go at once, not through a queued lock turn (resumeNative),
        // which would wait for the rest of this section: the log's fdatasync.
        if (hold) this.releaseNative();
      }
    }
    this.lastPersistQueuedEpoch = coveredEpoch;
    if ([...this.durableIntents].some((r) => !this.intents.has(r))) await this.writeIntents();
  }

  /**
   * Call before a write reaches the protected disk (after recordWrite was
   * called for it). Returns undefined when the write's regions are already
   * marked durably, else a promise that resolves once they are: only then
   * may the write go to the disk. Persists are coalesced.
   */
  intend(offset: number, length: number): Promise<void> | undefined {
    if (length <= 0) return undefined;
    const epoch = ++this.intentEpoch;
    const first = Math.floor(offset / WRITE_INTENT_REGION_BYTES);
    const last = Math.floor((offset + length - 1) / WRITE_INTENT_REGION_BYTES);
    let durable = true;
    for (let r = first; r <= last; r++) {
      this.intents.set(r, epoch);
      if (!this.durableIntents.has(r)) durable = false;
    }
    if (durable) return undefined;
    return this.writeIntents();
  }

  /** Writes the intent file with every region marked now; callers sharing a write wait for the same one. */
  private writeIntents(): Promise<void> {
    const run = this.intentWrite.catch(() => undefined).then(async () => {
      const regions = [...this.intents.keys()].sort((a, b) => a - b);
      if (regions.length === this.durableIntents.size && regions.every((r) => this.durableIntents.has(r))) return;
      await writeFileAtomic(intentPath(this.dir, this.diskId), encodeIntents(WRITE_INTENT_REGION_BYTES, regions));
      this.durableIntents = new Set(regions);
      this.native?.setDurableRegions(Float64Array.from(regions));
    });
    this.intentWrite = run;
    return run;
  }

  /** Resync extents are left, or a resync log's sequence is held: the replica is not in step yet. */
  private owesResync(): boolean {
    return this.maps.resync.dirtyBytes() > 0 || this.reservations.length > 0;
  }

  private async sealActive(point: CutPoint): Promise<SealedLogInfo> {
    const writer = this.writer!;
    const sequence = this.activeSequence!;
    this.writer = undefined;
    const logMap = new DirtyMap(this.diskSizeBytes, this.granularityBytes);
    logMap.merge(this.activeMap);
    let info: SealedLogInfo;
    try {
      info = await this.publishSealed(writer, sequence, point, logMap);
    } catch (err) {
      // Unsealed (or sealed but not published): the fold that follows drops the file.
      await writer.close().catch(() => undefined);
      throw err;
    }
    // Everything in the sealed log is durable: its extents stay in `dirty` until acknowledged.
    this.activeMap.clearAll();
    this.maps.pending.clearAll();
    this.generation++;
    return info;
  }

  /**
   * Seals `writer` (log `sequence`, holding the extents of `logMap`), writes
   * its sidecar and gives it its sealed name, durably, and lists it for
   * shipping. The directory sync also makes durable a rename of the next
   * log made before it (rotateHeld).
   */
  private async publishSealed(writer: HrlWriter, sequence: number, point: CutPoint, logMap: DirtyMap): Promise<SealedLogInfo> {
    const done = await writer.seal();
    // While a resync is owed the replica at this cut would hold new blocks
    // beside stale ones in the extents still to resync: no point ends here.
    const tainted = this.owesResync();
    const sidecar: LogSidecar = {
      version: 1, diskId: this.diskId, sequence, uniqueId: done.uniqueId, previousUniqueId: done.previousUniqueId, sizeBytes: done.sizeBytes, entryCount: done.entryCount,
      cutId: point.cutId, cutTime: new Date(point.cutTimeMs).toISOString(), cutTimeMs: point.cutTimeMs, recovered: false,
      ...(point.appTag === undefined ? {} : { appTag: point.appTag }),
      ...(tainted ? { tainted: true } : {}),
    };
    const sidecarPath = this.logPath(sequence, SIDECAR_SUFFIX);
    await writeFileAtomic(sidecarPath, JSON.stringify(sidecar, null, 2));
    const sealedPath = this.logPath(sequence, SEALED_LOG_SUFFIX);
    try {
      await fsp.rename(this.logPath(sequence, OPEN_LOG_SUFFIX), sealedPath);
      await syncDirectory(this.dir);
    } catch (err) {
      throw wrapError(err, 'BR_IO', `cannot rename sealed log ${sealedPath}`);
    }
    const info: SealedLogInfo = { ...sidecar, name: path.basename(sealedPath), path: sealedPath, sidecarPath };
    this.sealed.push(info);
    this.sealedBytes += info.sizeBytes;
    this.logMaps.set(info.name, logMap);
    return info;
  }

  /**
   * Seals the active log at `point` and opens the next one. With a spare
   * (the usual case) the writes are held only while the spare takes the
   * active log's place (a rename) on every tracker of the cut (`switched`):
   * from then on they go to the new log while the old one is synced, sealed
   * and published. Without `switched` (a caller that cuts several trackers
   * its own way) they stay held until the log is sealed, as without a
   * spare, so no tracker lets a write through before all have switched.
   *
   * Crash safety is that of any write after the last persist: a write to
   * the new log before its name and the old log's seal are durable is
   * covered by its durable write intent (the old log and its `pending`
   * extents are recovered as an open log, the new one by its own checksums,
   * or dropped under its spare name and resynced by intent), and no flush is
   * answered on the new log before the cut ends (flushes wait for the lock).
   */
  private async rotateHeld(point: CutPoint, switched?: SwitchBarrier): Promise<SealedLogInfo | undefined> {
    try {
      this.assertOpen();
      if (this.writer === undefined) return undefined;
      const old = this.writer;
      const oldSequence = this.activeSequence!;
      // Made right after the previous cut, and cut()/rotate() wait for it before
      // they hold the writes; waited here only by cutAppConsistent, or when
      // one was discarded and the next is being made.
      if (this.spare === undefined) await this.spareMaking;
      const next = await this.useSpare(this.logPath(this.nextSequence, OPEN_LOG_SUFFIX));
      if (next === undefined) return await this.rotateInLine(point, switched);
      // The switch: the new log takes the writes, the old one its extents.
      const logMap = new DirtyMap(this.diskSizeBytes, this.granularityBytes);
      logMap.merge(this.activeMap);
      this.activeMap.clearAll();
      this.writer = next;
      this.activeSequence = this.nextSequence++;
      this.lastUniqueId = next.uniqueId;
      this.sealingBytes = old.sizeBytes;
      if (switched !== undefined) {
        await switched.arrive(this);
        this.writesPassCut = true;
        this.letNativeGo();
      }
      let info: SealedLogInfo;
      try {
        info = await this.publishSealed(old, oldSequence, point, logMap);
      } catch (err) {
        this.writesPassCut = false;
        this.sealingBytes = 0;
        await old.close().catch(() => undefined);
        // The fold runs with the writers held, as in any other operation.
        await this.holdNativeAgain();
        await this.logIo(() => Promise.reject(err));
        return undefined;
      }
      this.writesPassCut = false;
      this.sealingBytes = 0;
      // The old log is durable: what is pending now is the new log's writes.
      this.maps.pending.clearAll();
      this.maps.pending.merge(this.activeMap);
      this.generation++;
      await this.writeState();
      await this.persistMaps(false);
      this.prepareSpare();
      return info;
    } finally {
      this.writesPassCut = false;
      void switched?.arrive(this);
    }
  }

  /** rotateHeld without a spare: seal, then create the next log, with the writes held throughout. */
  private async rotateInLine(point: CutPoint, switched: SwitchBarrier | undefined): Promise<SealedLogInfo | undefined> {
    let info: SealedLogInfo | undefined;
    if (!(await this.logIo(async () => { info = await this.sealActive(point); }))) return undefined;
    // The log just sealed is dropped with the others if the next one cannot be created.
    if (!(await this.logIo(() => this.openActiveLog()))) return undefined;
    void switched?.arrive(this);
    await this.persistMaps(false);
    return info;
  }

  /** Takes the native writers' hold again after letNativeGo (released with the lock). */
  private async holdNativeAgain(): Promise<void> {
    if (this.native === undefined || this.nativeHeld) return;
    this.nativeHeld = true;
    this.applyNativeRecords(await this.native.hold());
  }

  private unshippedBytes(): number {
    return this.sealedBytes + this.sealingBytes + (this.writer?.sizeBytes ?? 0);
  }

  private async checkOverflow(): Promise<void> {
    if (this.unshippedBytes() <= this.overflowRatio * this.diskSizeBytes) return;
    await this.foldLogs('overflow');
  }

  /**
   * Runs an operation on the log files. A failure of the log volume (I/O
   * error, full disk) does not fail the caller: everything unshipped is
   * folded into the persisted resync map, as on overflow, so the durability
   * contract still holds; resolves false then. Only a failure to persist the
   * maps themselves is thrown.
   */
  private async logIo(fn: () => Promise<void>): Promise<boolean> {
    try {
      await fn();
      return true;
    } catch (err) {
      if (!(isBlockrelayError(err) && (err.code === 'BR_IO' || err.code === 'BR_DISK_FULL'))) throw err;
      await this.foldLogs('log-io-error', err);
      return false;
    }
  }

  /** Folds everything unshipped into the resync map, then drops the logs and keeps tracking in the maps only. */
  private async foldLogs(reason: ResyncReason, cause?: BlockrelayError): Promise<void> {
    this.folds++;
    // The logs a held resync log followed are being folded: it follows what is left (saved with the state below).
    this.reservations = this.reservations.map((r) => withFollows(r, this.followsFor(r.sequence, true)));
    this.maps.resync.merge(this.maps.dirty);
    this.mode = 'dirty-only';
    this.generation++;
    await this.persistMaps(true);
    await this.writeState();
    try {
      await this.dropAllLogs();
    } catch (err) {
      // The logs are already disowned by the persisted state; the next open drops what is left.
      if (!isBlockrelayError(err) || reason !== 'log-io-error') throw err;
      this.writer = undefined;
      this.activeSequence = null;
      this.sealed = [];
      this.sealedBytes = 0;
      this.logMaps.clear();
      this.activeMap.clearAll();
    }
    this.report(reason, cause);
  }

  /**
   * The sequence a resync log at `sequence` follows: the newest log before
   * it that is not folded, i.e. still sealed here, active or held for
   * another resync log (none of those when `folding`), or already
   * acknowledged (`shippedSequence`). Everything between it and `sequence`
   * was folded into the resync map, so a receiver may skip it; nothing
   * acknowledged is ever skipped, since a hop can hold a log its next hop
   * has not had yet. Undefined when no such log is known and the state
   * predates `shippedSequence`: the log is then sent without `follows`.
   */
  private followsFor(sequence: number, folding: boolean): number | undefined {
    let newest = this.shippedSequence;
    const consider = (s: number | null | undefined): void => {
      if (s !== null && s !== undefined && s < sequence && (newest === undefined || s > newest)) newest = s;
    };
    if (!folding) {
      for (const l of this.sealed) consider(l.sequence);
      consider(this.activeSequence);
    }
    for (const r of this.reservations) consider(r.sequence);
    return newest;
  }

  /** Deletes the active log, the spare and every sealed log with its sidecar. */
  private async dropAllLogs(): Promise<void> {
    await this.discardSpare();
    if (this.writer !== undefined) {
      await this.writer.close();
      await unlinkIfPresent(this.writer.path);
      this.writer = undefined;
      this.activeSequence = null;
    }
    for (const s of this.sealed) {
      await unlinkIfPresent(s.path);
      await unlinkIfPresent(s.sidecarPath);
    }
    this.sealed = [];
    this.sealedBytes = 0;
    this.logMaps.clear();
    for (const n of await listDir(this.dir)) {
      if (parseLogName(this.diskId, n, OPEN_LOG_SUFFIX) !== undefined) await unlinkIfPresent(path.join(this.dir, n));
    }
    this.activeMap.clearAll();
    await syncDirectory(this.dir);
  }

  /** dirty = extents of the remaining sealed logs ∪ active log ∪ resync (all held in memory). */
  private async rebuildDirty(): Promise<void> {
    const fresh = new DirtyMap(this.diskSizeBytes, this.granularityBytes);
    for (const s of this.sealed) {
      const m = this.logMaps.get(s.name);
      if (m === undefined) return; // unknown extents: keep the old map, a superset
      fresh.merge(m);
    }
    fresh.merge(this.activeMap);
    fresh.merge(this.maps.resync);
    this.maps.dirty.clearAll();
    this.maps.dirty.merge(fresh);
    this.generation++;
  }

  private report(reason: ResyncReason, cause?: BlockrelayError): void {
    this.lastResyncReason = reason;
    if (this.onResyncRequired === undefined) return;
    const extents: DirtyExtent[] = [];
    let truncated = false;
    for (const e of this.maps.resync.extents()) {
      if (extents.length >= CHANGE_TRACKER_DEFAULTS.reportExtentsMax) {
        truncated = true;
        break;
      }
      extents.push(e);
    }
    this.onResyncRequired({
      diskId: this.diskId, reason, resyncBytes: this.maps.resync.dirtyBytes(), extents, extentsTruncated: truncated,
      ...(cause === undefined ? {} : { cause: { code: cause.code, message: cause.message } }),
    });
  }

  private scheduleTimer(): void {
    if (this.persistIntervalMs <= 0 || this.closed) return;
    this.timer = this.clock.setTimer(() => {
      this.timer = undefined;
      if (this.closed) return;
      this.locked(async () => {
        if (!this.closed) await this.persistMaps(false, true);
      }).catch(() => undefined).finally(() => this.scheduleTimer());
    }, this.persistIntervalMs);
  }
}

/**
 * The trackers of one cut each arrive once they have switched to their next
 * log; `arrive` resolves when all have (later calls of a tracker that
 * arrived already count once). Their writers are let go only then, so no
 * write after the cut reaches any tracker's sealed log.
 */
class SwitchBarrier {
  private readonly all: Promise<void>;
  private open!: () => void;
  private readonly arrived = new Set<ChangeTracker>();

  constructor(private readonly count: number) {
    this.all = new Promise<void>((r) => { this.open = r; });
    if (count <= 0) this.open();
  }

  arrive(who: ChangeTracker): Promise<void> {
    if (!this.arrived.has(who)) {
      this.arrived.add(who);
      if (this.arrived.size >= this.count) this.open();
    }
    return this.all;
  }
}

/** Closes a log that never became one of the chain (a spare) and deletes its file. */
async function closeAndDelete(w: HrlWriter): Promise<void> {
  await w.close();
  await unlinkIfPresent(w.path).catch(() => undefined);
}

/** `r` with `follows` set, or without it when unknown. */
function withFollows(r: ResyncReservation, follows: number | undefined): ResyncReservation {
  const { follows: _old, ...rest } = r;
  return follows === undefined ? rest : { ...rest, follows };
}

function checkAppTag(appTag: string | undefined): void {
  if (appTag !== undefined && Buffer.byteLength(appTag) > MAX_APP_TAG_BYTES) {
    throw new BlockrelayError('BR_USAGE', `app tag is ${Buffer.byteLength(appTag)} bytes, more than ${MAX_APP_TAG_BYTES}`);
  }
}

async function listDir(dir: string): Promise<string[]> {
  try {
    return await fsp.readdir(dir);
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot list ${dir}`);
  }
}

async function unlinkIfPresent(file: string): Promise<void> {
  try {
    await fsp.unlink(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw wrapError(err, 'BR_IO', `cannot delete ${file}`);
  }
}
