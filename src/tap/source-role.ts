import { NbdServer, type NbdServerAddress } from './nbd-server';
import type { NbdConnectionLimits } from './nbd-connection';
import { resolvesWithin, systemClock, type Clock, type TimerHandle } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import type { DiskTarget } from '../targets/disk-target';
import { ChangeTracker, type ChangeTrackerOptions, type ResyncReport, type SealedLogInfo } from '../tracking/change-tracker';
import { DISK_ID_PATTERN } from '../platform/disk-id';

/** Defaults of the source role, units in the names. */
export const SOURCE_ROLE_DEFAULTS = {
  /** How often all disks' logs are sealed at one cut. */
  intervalMs: 30_000,
  /**
   * A cut starts as soon as any disk's active log holds this many bytes,
   * before the interval ends. Every hop (seal, ship, spool, forward, apply,
   * journal) takes time in proportion to a log's size and a log counts only
   * once applied whole, so at 200 MB/s of churn the RPO p99 stays under 2 s
   * only with logs of about 50 MB (1 s cuts made ~200 MB logs and a p99 of
   * 3.4-5.1 s; 250 ms cuts, ~50 MB logs, 1.1-1.9 s: session 9 e2e bench).
   */
  cutBytes: 48 * 1024 * 1024,
  /**
   * How often the active logs' sizes are read for `cutBytes`. Reading is a
   * field (or one native call) per disk; at 25 ms a log overshoots
   * `cutBytes` by at most 5 MB at 200 MB/s.
   */
  sizeCheckIntervalMs: 25,
  /** How long shutdown waits for NBD requests in flight. */
  shutdownGraceMs: 10_000,
  /**
   * The most a whole stop may take (requests, seals, disk flushes). A disk
   * that hangs must not keep the process from ending: what is left undone
   * by then is reported (BR_TAP_STOP_TIMEOUT) instead of waited for.
   */
  stopTimeoutMs: 30_000,
} as const;

/** The role's own cuts are logged at most this often (each line counts the cuts since the last). */
export const CUT_LOG_INTERVAL_MS = 60_000;

/** Bounds of `SourceRoleOptions.cutBytes`. */
export const SOURCE_ROLE_CUT_BYTES_MIN = 1024 * 1024;
export const SOURCE_ROLE_CUT_BYTES_MAX = 4 * 1024 * 1024 * 1024;

/** What started a cut: the interval ran out, or a disk's active log reached `cutBytes`. */
export type CutTrigger = 'interval' | 'size';

/** What a stop had not finished when its time ran out. */
export interface SourceStopLeftovers {
  /** The step it was in: 'cut' (a cut under way), 'nbd' (requests in flight) or 'seal' (sealing logs, closing disks). */
  readonly step: 'cut' | 'nbd' | 'seal';
  /** Disks whose active log was not sealed (their tracker did not close). */
  readonly unsealedDisks: readonly string[];
  /** Disks not flushed and closed. */
  readonly unclosedDisks: readonly string[];
  /** NBD requests that got no reply. */
  readonly unansweredRequests: number;
  /** Exports whose writer thread is still in a disk write. */
  readonly exportsStillWriting: readonly string[];
}

/** What the role reports; pino loggers fit. */
export interface SourceRoleLogger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

export interface SourceRoleOptions {
  /** The protected disks, opened writable; the role closes them on stop. */
  readonly disks: readonly { readonly id: string; readonly target: DiskTarget }[];
  /** Where every disk's tracker keeps its logs, sidecars, state and maps. */
  readonly logDir: string;
  readonly listenHost: string;
  readonly listenPort: number;
  readonly intervalMs?: number;
  /**
   * Cut as soon as any disk's active log holds this many bytes (all disks
   * still at one cut), or when the interval ends, whichever comes first
   * (default SOURCE_ROLE_DEFAULTS.cutBytes; from 1 MiB to 4 GiB).
   */
  readonly cutBytes?: number;
  readonly clock?: Clock;
  readonly logger?: SourceRoleLogger;
  /** Passed to every disk's ChangeTracker (e.g. `overflowRatio`). */
  readonly tracker?: Partial<Omit<ChangeTrackerOptions, 'dir' | 'diskId' | 'diskSizeBytes' | 'clock'>>;
  readonly nbdLimits?: Partial<NbdConnectionLimits>;
  /** Leave READ and WRITE to the native data path (default true; see NbdServerOptions.nativeDataPath). */
  readonly nativeDataPath?: boolean;
  /** Told after every cut with the logs it sealed (the hook shipping attaches to). */
  readonly onSealed?: (logs: readonly SealedLogInfo[]) => void;
}

const quietLogger: SourceRoleLogger = { info: () => {}, warn: () => {} };

/**
 * The source tap: one NBD export per protected disk, named by disk id, whose
 * every write goes to the disk and to the disk's ChangeTracker. Every
 * interval all disks' active logs are sealed at one cut (the trackers hold
 * new records for the instant of the cut), so the sealed logs end at a
 * crash-consistent point common to all disks.
 *
 * Sealed logs stay in `logDir` as `ID-SEQUENCE.hrl` with a `.hrl.json`
 * sidecar; per disk, lexical order is apply order. Shipping them to a
 * process server attaches through `onSealed` and the trackers.
 */
export class SourceRole {
  readonly address: NbdServerAddress;
  /** `nbd://HOST:PORT/ID` per disk id. */
  readonly exportUris: Readonly<Record<string, string>>;
  readonly trackers: ReadonlyMap<string, ChangeTracker>;
  private readonly server: NbdServer;
  private readonly disks: readonly { readonly id: string; readonly target: DiskTarget }[];
  private readonly clock: Clock;
  private readonly logger: SourceRoleLogger;
  private readonly intervalMs: number;
  private readonly cutBytes: number;
  private readonly onSealed: ((logs: readonly SealedLogInfo[]) => void) | undefined;
  private timer: TimerHandle | undefined;
  /** The poll of the active logs' sizes (see SOURCE_ROLE_DEFAULTS.sizeCheckIntervalMs). */
  private sizeTimer: TimerHandle | undefined;
  /** Whether a scheduled cut (interval or size) is under way; the size poll does not start another. */
  private scheduledCutRunning = false;
  /**
   * Set when a scheduled cut fails, cleared when one succeeds: a full log
   * whose cut keeps failing (say the log volume refuses the next log) would
   * otherwise be retried at every poll, 40 times a second. The interval
   * timer retries it instead, as before the size trigger.
   */
  private sizeCutsPaused = false;
  private readonly cutCounts: Record<CutTrigger, number> = { interval: 0, size: 0 };
  private cutInProgress: Promise<unknown> = Promise.resolve();
  /** When the last 'sealed logs at a cut' line was written, and the cuts since (see logCut). */
  private lastCutLogMs: number | undefined;
  private cutsSinceLogLine = 0;
  private stopped = false;

  private constructor(init: {
    address: NbdServerAddress;
    server: NbdServer;
    trackers: Map<string, ChangeTracker>;
    options: SourceRoleOptions;
  }) {
    const { options } = init;
    this.address = init.address;
    this.server = init.server;
    this.trackers = init.trackers;
    this.disks = options.disks;
    this.clock = options.clock ?? systemClock;
    this.logger = options.logger ?? quietLogger;
    this.intervalMs = options.intervalMs ?? SOURCE_ROLE_DEFAULTS.intervalMs;
    this.cutBytes = options.cutBytes ?? SOURCE_ROLE_DEFAULTS.cutBytes;
    this.onSealed = options.onSealed;
    const host = init.address.host.includes(':') ? `[${init.address.host}]` : init.address.host;
    this.exportUris = Object.fromEntries(options.disks.map((d) => [d.id, `nbd://${host}:${init.address.port}/${encodeURIComponent(d.id)}`]));
  }

  /** Opens every disk's tracker, starts the NBD server and the cut timer. */
  static async start(options: SourceRoleOptions): Promise<SourceRole> {
    const ids = new Set<string>();
    for (const d of options.disks) {
      if (!DISK_ID_PATTERN.test(d.id)) throw new BlockrelayError('BR_USAGE', `disk id '${d.id}' must match ${DISK_ID_PATTERN}`);
      if (ids.has(d.id)) throw new BlockrelayError('BR_USAGE', `disk id '${d.id}' is given twice`);
      if (d.target.capabilities.readOnly) throw new BlockrelayError('BR_USAGE', `protected disk '${d.id}' (${d.target.spec}) is open read-only`);
      ids.add(d.id);
    }
    if (options.disks.length === 0) throw new BlockrelayError('BR_USAGE', 'the source role needs at least one disk');
    const intervalMs = options.intervalMs ?? SOURCE_ROLE_DEFAULTS.intervalMs;
    if (!Number.isInteger(intervalMs) || intervalMs < 1) throw new BlockrelayError('BR_USAGE', `intervalMs must be a positive whole number, got ${intervalMs}`);
    const cutBytes = options.cutBytes ?? SOURCE_ROLE_DEFAULTS.cutBytes;
    if (!Number.isSafeInteger(cutBytes) || cutBytes < SOURCE_ROLE_CUT_BYTES_MIN || cutBytes > SOURCE_ROLE_CUT_BYTES_MAX) {
      throw new BlockrelayError('BR_USAGE', `cutBytes must be a whole number of bytes from ${SOURCE_ROLE_CUT_BYTES_MIN} (1 MiB) to ${SOURCE_ROLE_CUT_BYTES_MAX} (4 GiB), got ${cutBytes}`, { details: { cutBytes: String(cutBytes) } });
    }
    const logger = options.logger ?? quietLogger;
    const trackers = new Map<string, ChangeTracker>();
    try {
      for (const d of options.disks) {
        const tracker = await ChangeTracker.open({
          ...options.tracker,
          dir: options.logDir,
          diskId: d.id,
          diskSizeBytes: d.target.sizeBytes,
          clock: options.clock,
          onResyncRequired: (report: ResyncReport) => {
            logger.warn({ disk: report.diskId, reason: report.reason, resyncBytes: report.resyncBytes }, 'change tracker needs a resync of this disk');
            options.tracker?.onResyncRequired?.(report);
          },
        });
        trackers.set(d.id, tracker);
      }
      const server = new NbdServer({
        exports: options.disks.map((d) => ({ name: d.id, description: `protected disk ${d.id} (${d.target.spec})`, readOnly: false, source: d.target, recorder: trackers.get(d.id)! })),
        limits: options.nbdLimits,
        nativeDataPath: options.nativeDataPath,
        clock: options.clock,
        warn: (message, details) => logger.warn(details ?? {}, message),
      });
      const address = await server.listen(options.listenHost, options.listenPort);
      const role = new SourceRole({ address, server, trackers, options });
      role.schedule();
      role.watchSize();
      logger.info({ listen: `${address.host}:${address.port}`, disks: [...ids], intervalMs, cutBytes }, 'source tap ready');
      return role;
    } catch (err) {
      for (const t of trackers.values()) await t.close({ seal: false }).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Seals every disk's active log at one cut and opens the next ones, unless
   * no disk logged anything since the last cut (empty logs would only add
   * points without changes). Cuts never overlap. `trigger` is what the log
   * line names as the cut's cause (the role's own cuts pass theirs).
   */
  cutNow(trigger: CutTrigger | 'call' = 'call'): Promise<readonly SealedLogInfo[]> {
    const run = this.cutInProgress.then(async () => {
      const trackers = [...this.trackers.values()];
      if (!trackers.some((t) => t.status().activeLogEntries > 0)) return [];
      const sealed = (await ChangeTracker.cut(trackers, { clock: this.clock })).filter((s): s is SealedLogInfo => s !== undefined);
      if (sealed.length > 0) {
        this.logCut(sealed, trigger);
        this.onSealed?.(sealed);
      }
      return sealed;
    });
    this.cutInProgress = run.catch(() => undefined);
    return run;
  }

  /**
   * Stops: no more cuts, the NBD server finishes the requests in flight and
   * closes, every tracker seals its active log as the last one, and the
   * disks are flushed and closed; trackers and disks side by side, so one
   * hung disk does not keep the others' logs unsealed.
   *
   * The whole stop takes at most `timeoutMs` (the NBD grace is cut to a
   * third of it, leaving time to seal). When that runs out it rejects with
   * BR_TAP_STOP_TIMEOUT naming what was not sealed, flushed or answered
   * (details: SourceStopLeftovers, lists comma-joined); the steps still
   * waiting (a disk that never answers) are left behind, and the caller
   * should end the process. `boundMs` is the bound the error names: a caller
   * that spent part of its own stop bound before this call passes what is
   * left as `timeoutMs` and its whole bound here.
   */
  async stop(graceMs: number = SOURCE_ROLE_DEFAULTS.shutdownGraceMs, timeoutMs: number = SOURCE_ROLE_DEFAULTS.stopTimeoutMs, boundMs: number = timeoutMs): Promise<void> {
    if (!Number.isSafeInteger(timeoutMs) || timeoutMs <= 0) throw new BlockrelayError('BR_USAGE', `the stop timeout must be a positive whole number of milliseconds, got ${timeoutMs}`);
    if (this.stopped) return;
    this.stopped = true;
    this.timer?.cancel();
    this.timer = undefined;
    this.sizeTimer?.cancel();
    this.sizeTimer = undefined;
    const unsealed = new Set(this.trackers.keys());
    const unclosed = new Set(this.disks.map((d) => d.id));
    let step: SourceStopLeftovers['step'] = 'cut';
    const errors: unknown[] = [];
    const work = (async () => {
      await this.cutInProgress;
      step = 'nbd';
      await this.server.close(Math.min(graceMs, Math.floor(timeoutMs / 3)));
      // Per disk: seal its log, then flush and close it; the disks side by side.
      step = 'seal';
      await Promise.all(
        this.disks.map(async (d) => {
          const tracker = this.trackers.get(d.id);
          if (tracker !== undefined) {
            await tracker.close({ seal: true }).then(
              () => unsealed.delete(d.id),
              (err: unknown) => errors.push(err),
            );
          }
          await d.target.close().then(
            () => unclosed.delete(d.id),
            (err: unknown) => errors.push(err),
          );
        }),
      );
    })();
    const inTime = await resolvesWithin(work, timeoutMs, this.clock);
    if (!inTime) {
      const nbd = this.server.shutdownLeftovers();
      const left: SourceStopLeftovers = {
        step,
        unsealedDisks: [...unsealed].sort(),
        unclosedDisks: [...unclosed].sort(),
        unansweredRequests: nbd.unansweredRequests,
        exportsStillWriting: nbd.exportsStillWriting,
      };
      const parts = [
        left.unsealedDisks.length > 0 ? `active log not sealed for disk ${left.unsealedDisks.join(', ')} (recovered at the next start)` : 'every active log sealed',
        left.unclosedDisks.length > 0 ? `not flushed and closed: disk ${left.unclosedDisks.join(', ')}` : undefined,
        left.unansweredRequests > 0 ? `${left.unansweredRequests} NBD request(s) never answered` : undefined,
        left.exportsStillWriting.length > 0 ? `a write still stuck in disk ${left.exportsStillWriting.join(', ')}` : undefined,
      ].filter((p) => p !== undefined);
      this.logger.warn({ ...left }, 'source tap stop timed out');
      throw new BlockrelayError('BR_TAP_STOP_TIMEOUT', `source tap did not stop within ${boundMs} ms (waiting at step '${step}'): ${parts.join('; ')}`, { details: { step, unsealedDisks: left.unsealedDisks.join(','), unclosedDisks: left.unclosedDisks.join(','), unansweredRequests: left.unansweredRequests, exportsStillWriting: left.exportsStillWriting.join(','), timeoutMs: boundMs } });
    }
    const sealed = [...this.trackers.values()].flatMap((t) => t.sealedLogs().map((s) => s.name));
    this.logger.info({ sealedLogs: sealed.length }, 'source tap stopped');
    if (errors.length > 0) throw errors[0];
  }

  /**
   * One info line per cut a caller asked for through `cutNow`, but for the
   * role's own cuts at most one per CUT_LOG_INTERVAL_MS, counting
   * the cuts since the last: a busy disk cuts several times a second
   * (cutBytes), which would be hundreds of thousands of lines a day.
   */
  private logCut(sealed: readonly SealedLogInfo[], trigger: CutTrigger | 'call'): void {
    const nowMs = this.clock.now();
    this.cutsSinceLogLine++;
    if (trigger !== 'call' && this.lastCutLogMs !== undefined && nowMs - this.lastCutLogMs < CUT_LOG_INTERVAL_MS) return;
    this.logger.info({ logs: sealed.map((s) => s.name), cutId: sealed[0]!.cutId, trigger, cutsSinceLastLine: this.cutsSinceLogLine }, 'sealed logs at a cut');
    this.lastCutLogMs = nowMs;
    this.cutsSinceLogLine = 0;
  }

  /** Scheduled cuts that sealed logs so far, by what started them (cutNow calls not counted). */
  cutsByTrigger(): Readonly<Record<CutTrigger, number>> {
    return { ...this.cutCounts };
  }

  /**
   * Cuts start `intervalMs` apart, not `intervalMs` after the previous cut
   * ended: a cut now holds the writes only for its switch to the next log
   * and spends the rest sealing the old one while the writes go on, so
   * waiting a whole interval after it would stretch every log by the seal's
   * time (at 250 ms cuts under 200 MB/s, logs of about 80 MB instead of 50)
   * and the RPO with it. A cut longer than the interval is followed at once
   * by the next (cuts never overlap). A cut the size poll starts restarts
   * the interval from its own start.
   */
  private schedule(delayMs: number = this.intervalMs): void {
    if (this.stopped) return;
    this.timer = this.clock.setTimer(() => {
      this.timer = undefined;
      this.startScheduledCut('interval');
    }, delayMs);
  }

  private startScheduledCut(trigger: CutTrigger): void {
    this.timer?.cancel();
    this.timer = undefined;
    this.scheduledCutRunning = true;
    const startedMs = this.clock.now();
    this.cutNow(trigger)
      .then((sealed) => {
        if (sealed.length > 0) this.cutCounts[trigger]++;
        this.sizeCutsPaused = false;
      })
      .catch((err: unknown) => {
        this.sizeCutsPaused = true;
        this.logger.warn({ err, trigger }, 'cut failed; retrying at the next interval');
      })
      .finally(() => {
        this.scheduledCutRunning = false;
        this.schedule(Math.max(0, this.intervalMs - (this.clock.now() - startedMs)));
      });
  }

  /**
   * Polls the active logs' sizes and starts a cut once any holds `cutBytes`,
   * so a busy disk replicates more often rather than in bigger lumps. A poll,
   * not an event from the trackers: the native data path appends on its
   * connection threads, and a size check there would need a new notification
   * from the addon. It reads only each tracker's `activeLogBytes` (a field,
   * or one native call), not the whole `status()` (3-7 µs with its map
   * counts, measured on the shared test VM), 40 times a second. While a cut
   * runs the poll waits; a
   * log that grew past `cutBytes` meanwhile is cut by the first poll after.
   */
  private watchSize(): void {
    if (this.stopped) return;
    this.sizeTimer = this.clock.setTimer(() => {
      this.sizeTimer = undefined;
      if (!this.stopped && !this.scheduledCutRunning && !this.sizeCutsPaused && this.anyLogFull()) this.startScheduledCut('size');
      this.watchSize();
    }, SOURCE_ROLE_DEFAULTS.sizeCheckIntervalMs);
  }

  private anyLogFull(): boolean {
    for (const t of this.trackers.values()) if (t.activeLogBytes >= this.cutBytes) return true;
    return false;
  }
}
