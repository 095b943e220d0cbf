import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import type { Extent } from '../targets/disk-target';
import type { BlockHasher } from './block-hasher';
import { boundExtents } from './extent-list';
import { decodeState, encodeState, MAX_NOTED_EXTENTS, type ResyncState, type ResyncTotals } from './resync-state-format';
import { removeStrayTemporaries, syncDirectory, writeFileDurably } from '../platform/durable-file';
import { FileLock } from '../platform/file-lock';

/** What a resync is, for deciding whether saved progress belongs to it. */
export interface ResyncIdentity {
  readonly pairFingerprint: bigint;
  readonly sizeBytes: number;
  readonly blockSizeBytes: number;
  readonly guided: boolean;
  readonly workFingerprint: bigint;
}

/** Where a resync starts: from zero or from saved progress. */
export interface ResyncStart {
  readonly cursorBytes: number;
  /** Totals of the earlier attempts (zero when starting over). */
  readonly previous: ResyncTotals;
  /** Why saved progress was not used, when a state file existed but did not fit. */
  readonly restartReason?: string;
}

const ZERO_TOTALS: ResyncTotals = { blocksCompared: 0, blocksSent: 0, bytesSent: 0, bytesReceived: 0, hashBytes: 0 };

/** Granularity at which noted writes are kept: fine enough to re-compare little, coarse enough to stay small. */
const NOTED_GRANULARITY_BYTES = 4096;

/**
 * One resync's persisted progress and the writes reported during it.
 *
 * Progress is a cursor: every work byte below it was compared and its fixes
 * flushed on the target before the cursor was saved, so resuming at the
 * cursor never skips an unfixed block. The state file is replaced
 * atomically (temp file, fsync, rename, fsync of the directory) and carries
 * a checksum, so a crash leaves either the old or the new state, never a mix.
 * Without a state path the job keeps everything in memory (nothing to resume).
 */
export class ResyncJob {
  private noted: Extent[] = [];
  private identity: ResyncIdentity | undefined;
  private startedAtMs = 0;

  private lock: FileLock | undefined;

  private constructor(
    readonly statePath: string | undefined,
    private readonly hasher: BlockHasher,
    private saved: ResyncState | undefined,
  ) {
    if (saved !== undefined) this.noted = [...saved.notedWrites];
  }

  /**
   * Opens a job, loading the state file when one exists. A damaged file is
   * refused (BR_RESYNC_STATE_CORRUPT, naming the byte offset): it cannot
   * come from a crash, since the file is only ever replaced by rename.
   */
  static async open(statePath: string | undefined, hasher: BlockHasher): Promise<ResyncJob> {
    if (statePath === undefined) return new ResyncJob(undefined, hasher, undefined);
    const lock = acquireLock(`${statePath}${LOCK_SUFFIX}`);
    try {
      // Progress saved by a process that died mid-save left a temporary beside the state file.
      await removeStrayTemporaries(path.dirname(statePath), [path.basename(statePath)]).catch((err: unknown) => {
        throw wrapError(err, 'BR_IO', `sweeping temporaries beside ${statePath}`);
      });
      let bytes: Buffer | undefined;
      try {
        bytes = await fsp.readFile(statePath);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw wrapError(err, 'BR_IO', `cannot read resync state ${statePath}`);
      }
      const job = new ResyncJob(statePath, hasher, bytes === undefined ? undefined : decodeState(bytes, statePath, hasher));
      job.lock = lock;
      return job;
    } catch (err) {
      lock.release();
      throw err;
    }
  }

  /** Releases the state file's lock. Idempotent; the state file itself stays for a later resume. */
  async close(): Promise<void> {
    const lock = this.lock;
    this.lock = undefined;
    lock?.release();
  }

  /** The saved state this job was opened with, if any. */
  get savedState(): ResyncState | undefined {
    return this.saved;
  }

  /**
   * Binds the job to a resync and says where to start. Saved progress is
   * used only when size, block size and work list all match; a state file
   * of another source/target pair is refused (BR_RESYNC_STATE_MISMATCH)
   * rather than overwritten, since it may be another resync's progress.
   */
  begin(identity: ResyncIdentity, nowMs: number): ResyncStart {
    this.identity = identity;
    const s = this.saved;
    if (s === undefined) {
      this.startedAtMs = nowMs;
      return { cursorBytes: 0, previous: ZERO_TOTALS };
    }
    if (s.pairFingerprint !== identity.pairFingerprint) {
      throw new BlockrelayError('BR_RESYNC_STATE_MISMATCH', `resync state ${this.statePath} belongs to another source/target pair; remove it or choose another state file`, { details: { path: this.statePath } });
    }
    let reason: string | undefined;
    if (s.sizeBytes !== identity.sizeBytes) reason = `disk size changed from ${s.sizeBytes} to ${identity.sizeBytes}`;
    else if (s.blockSizeBytes !== identity.blockSizeBytes) reason = `block size changed from ${s.blockSizeBytes} to ${identity.blockSizeBytes}`;
    else if (s.guided !== identity.guided || s.workFingerprint !== identity.workFingerprint) reason = 'the list of extents to compare changed';
    if (reason !== undefined) {
      this.startedAtMs = nowMs;
      return { cursorBytes: 0, previous: ZERO_TOTALS, restartReason: reason };
    }
    this.startedAtMs = s.startedAtMs;
    return { cursorBytes: s.cursorBytes, previous: s.totals };
  }

  /**
   * Reports a write to the source that happened while the resync ran (the
   * tap or tracker calls this). The write is also in the delta logs, which
   * are applied after the resync and carry the final data; noting it lets a
   * resync that has no logs behind it re-compare the range (`settleRounds`),
   * and it is kept in the state file (as of the next saved cursor) so a
   * restarted resync still knows it.
   */
  noteWrite(offset: number, length: number): void {
    if (length <= 0) return;
    this.noted.push({ offset, length });
    if (this.noted.length > 2 * MAX_NOTED_EXTENTS) this.compactNoted();
  }

  /** The noted writes, merged, at most MAX_NOTED_EXTENTS of them. */
  notedWrites(): Extent[] {
    this.compactNoted();
    return [...this.noted];
  }

  /** Hands the noted writes to a settle round and forgets them. */
  takeNotedWrites(): Extent[] {
    const out = this.notedWrites();
    this.noted = [];
    return out;
  }

  private compactNoted(): void {
    const sizeBytes = this.identity?.sizeBytes ?? Number.MAX_SAFE_INTEGER;
    const clipped = this.noted
      .map((e) => ({ offset: Math.min(e.offset, sizeBytes), length: Math.max(0, Math.min(e.offset + e.length, sizeBytes) - Math.min(e.offset, sizeBytes)) }));
    this.noted = boundExtents(clipped, NOTED_GRANULARITY_BYTES, sizeBytes, MAX_NOTED_EXTENTS);
  }

  /**
   * Saves progress atomically. The caller must have flushed the target for
   * every write below `cursorBytes` first.
   */
  async checkpoint(cursorBytes: number, totals: ResyncTotals, nowMs: number): Promise<void> {
    const id = this.identity;
    if (id === undefined) throw new Error('ResyncJob.checkpoint before begin');
    if (this.statePath === undefined) return;
    const state: ResyncState = {
      guided: id.guided,
      blockSizeBytes: id.blockSizeBytes,
      sizeBytes: id.sizeBytes,
      pairFingerprint: id.pairFingerprint,
      workFingerprint: id.workFingerprint,
      cursorBytes,
      startedAtMs: this.startedAtMs,
      updatedAtMs: nowMs,
      totals,
      notedWrites: this.notedWrites(),
    };
    const bytes = encodeState(state, this.hasher);
    // Assert right before writing: what goes to disk must read back as is.
    decodeState(bytes, this.statePath, this.hasher);
    await writeFileAtomic(this.statePath, bytes);
    this.saved = state;
  }

  /** The resync finished: nothing is left to resume, so the state file goes. */
  async complete(): Promise<void> {
    this.saved = undefined;
    if (this.statePath === undefined) return;
    try {
      await fsp.rm(this.statePath, { force: true });
      await syncDirectory(path.dirname(this.statePath));
    } catch (err) {
      throw wrapError(err, 'BR_IO', `cannot remove resync state ${this.statePath}`);
    }
  }
}

/** The lock file next to a state file: `STATE.lock`, holding the owner's process id. */
export const LOCK_SUFFIX = '.lock';

/**
 * Takes the lock file exclusively, so two resyncs never share one state file
 * (their cursors would overwrite each other). The lock is flock(2) on an open
 * descriptor (FileLock): a process that died holds nothing.
 */
function acquireLock(lockPath: string): FileLock {
  return FileLock.acquire(lockPath, (pid) => `resync state ${lockPath.slice(0, -LOCK_SUFFIX.length)} is in use by ${pid === undefined ? 'another process' : `process ${pid}`}`);
}

/** Replaces the state file whole: readers see the old or the new one (platform/durable-file). */
async function writeFileAtomic(file: string, bytes: Buffer): Promise<void> {
  try {
    await writeFileDurably(file, bytes);
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot save resync state ${file}`);
  }
}
