import type { Logger } from '../daemon/logger';
import type { Metrics } from '../daemon/metrics';
import { resolvesWithin, type Clock, type TimerHandle } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import { DiskHealth } from '../retry/health';
import type { RetryPolicy } from '../retry/retry-policy';
import { ChangeTracker, type DiskReader } from '../tracking/change-tracker';
import type { PeerOptions } from './log-client';
import { LogShipper } from './log-shipper';
import type { LogStageSink } from './log-stage-events';
import { trackerShippingSource } from './tracker-shipping';

/** Defaults, units in the names. */
export const SOURCE_SHIPPING_DEFAULTS = {
  /**
   * An idle disk still gets a (empty) cut this often, so the target side
   * sees a fresh recovery point and the RPO of a disk that simply has no
   * writes stays low instead of raising a false Warning. Well under the
   * 15-minute RPO threshold.
   */
  heartbeatMs: 5 * 60_000,
  /** How often each disk is checked for a pending resync. */
  resyncCheckMs: 1_000,
  /** Most bytes one resync round carries (also capped at a quarter of the disk). */
  resyncRoundMaxBytes: 256 * 1024 * 1024,
} as const;

export interface SourceShippingOptions {
  readonly trackers: ReadonlyMap<string, ChangeTracker>;
  readonly peer: PeerOptions;
  readonly clock: Clock;
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly retryPolicy?: RetryPolicy;
  readonly heartbeatMs?: number;
  /** Replication group of every disk here (one group per source process). */
  readonly group?: string;
  /**
   * Readers of the protected disks. With them, a disk whose tracker needs a
   * resync (overflow, torn tail, lost map) is resynced through the log
   * stream at once, round by round; without them it waits in Warning for
   * an operator's `blockrelay resync`.
   */
  readonly readers?: ReadonlyMap<string, DiskReader>;
  readonly resyncCheckMs?: number;
  readonly resyncRoundMaxBytes?: number;
  /** Told when each log's shipping starts and ends (the e2e bench's timeline). */
  readonly onStage?: LogStageSink;
}

export interface SourceDiskStatus {
  readonly diskId: string;
  readonly health: string;
  readonly reasons: string[];
  readonly state: string;
  readonly mode: string;
  readonly resyncRequired: boolean;
  readonly resyncBytes: number;
  readonly pendingBytes: number;
  readonly sealedLogs: number;
  readonly shippedBytesTotal: number;
  readonly recentErrors: ReadonlyArray<{ code: string; message: string; atMs: number }>;
}

/**
 * The source's side of replication: one shipper per tracked disk, woken
 * after every cut; app-consistent cuts carrying a tag; and an idle
 * heartbeat cut. Attaches to the trackers of a running source tap.
 */
export class SourceShipping {
  private readonly shippers = new Map<string, { shipper: LogShipper; health: DiskHealth }>();
  private heartbeat: TimerHandle | undefined;
  private resyncTimer: TimerHandle | undefined;
  private readonly resyncing = new Set<string>();
  private resyncRounds: Promise<unknown> = Promise.resolve();
  private stopped = false;
  private lastCutMs: number;

  constructor(private readonly options: SourceShippingOptions) {
    this.lastCutMs = options.clock.now();
    for (const [diskId, tracker] of options.trackers) {
      const health = new DiskHealth(diskId);
      const shipper = new LogShipper(trackerShippingSource(tracker, options.group === undefined ? {} : { group: options.group }), {
        peer: options.peer,
        clock: options.clock,
        logger: options.logger,
        metrics: options.metrics,
        health,
        ...(options.retryPolicy ? { retryPolicy: options.retryPolicy } : {}),
        ...(options.onStage ? { onStage: options.onStage } : {}),
      });
      this.shippers.set(diskId, { shipper, health });
    }
  }

  start(): void {
    for (const { shipper } of this.shippers.values()) shipper.start();
    this.scheduleHeartbeat();
    this.scheduleResync();
  }

  /** Logs were sealed (a cut): ship them. */
  sealed(): void {
    this.lastCutMs = this.options.clock.now();
    for (const { shipper } of this.shippers.values()) shipper.wake();
  }

  /**
   * Cuts the given disks at one point carrying an app-consistent tag (empty
   * logs included: the tag itself is the point), then ships.
   */
  async cutWithTag(diskIds: readonly string[], appTag: string): Promise<{ cutId: string; cutTimeMs: number }> {
    const trackers = diskIds.map((id) => {
      const t = this.options.trackers.get(id);
      if (t === undefined) throw new BlockrelayError('BR_DISK_UNKNOWN', `disk ${id} is not protected here`);
      return t;
    });
    try {
      return await ChangeTracker.cutAppConsistent(trackers, appTag, { clock: this.options.clock });
    } finally {
      this.sealed();
    }
  }

  /** Resolves when every sealed log is shipped (or its disk went Critical). */
  async drain(): Promise<void> {
    await Promise.all([...this.shippers.values()].map(({ shipper }) => shipper.whenIdle()));
  }

  /**
   * After the source role stopped (which seals every active log without a
   * cut callback): ship what is sealed, within `timeoutMs` when given, then
   * stop. Resolves true when everything was shipped; what is left stays in
   * the log directory and goes out at the next start.
   */
  async finish(timeoutMs?: number): Promise<boolean> {
    this.sealed();
    const shipped = timeoutMs === undefined ? await this.drain().then(() => true) : await resolvesWithin(this.drain(), timeoutMs);
    await this.stop();
    return shipped;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.heartbeat?.cancel();
    this.heartbeat = undefined;
    this.resyncTimer?.cancel();
    this.resyncTimer = undefined;
    await this.resyncRounds;
    await Promise.all([...this.shippers.values()].map(({ shipper }) => shipper.stop()));
  }

  status(): SourceDiskStatus[] {
    return [...this.shippers.entries()].map(([diskId, { shipper, health }]) => {
      const t = this.options.trackers.get(diskId)!.status();
      return {
        diskId,
        health: health.state,
        reasons: health.reasons.map((r) => `${r.code}: ${r.message}`),
        state: shipper.drain.state,
        mode: t.mode,
        resyncRequired: t.resyncRequired,
        resyncBytes: t.resyncBytes,
        pendingBytes: t.unshippedBytes,
        sealedLogs: t.sealedLogs,
        shippedBytesTotal: shipper.shippedBytesTotal,
        recentErrors: health.recentErrors.map((e) => ({ code: e.code, message: e.message, atMs: e.atMs })),
      };
    });
  }

  /**
   * Every `resyncCheckMs`: each disk's health learns whether its tracker
   * needs a resync, and with readers a round starts where one is due.
   */
  private scheduleResync(): void {
    if (this.stopped) return;
    this.resyncTimer = this.options.clock.setTimer(() => {
      for (const [diskId, { health }] of this.shippers) {
        if (!this.resyncing.has(diskId)) health.reportResync(this.options.trackers.get(diskId)!.status().resyncRequired ? 'pending' : 'none', this.options.clock.now());
      }
      const rounds = [...this.options.trackers.keys()].map((diskId) => this.resyncOnce(diskId));
      this.resyncRounds = Promise.all(rounds).finally(() => this.scheduleResync());
    }, this.options.resyncCheckMs ?? SOURCE_SHIPPING_DEFAULTS.resyncCheckMs);
  }

  /** Runs one resync round for a disk when it needs one and its shipping has room. */
  private async resyncOnce(diskId: string): Promise<void> {
    const tracker = this.options.trackers.get(diskId)!;
    const read = this.options.readers?.get(diskId);
    if (read === undefined || this.resyncing.has(diskId) || this.stopped) return;
    const status = tracker.status();
    // A round is bounded by a quarter of the disk as well, so its log alone
    // never comes near the tracker's overflow threshold (half the disk).
    const roundMax = Math.max(64 * 1024, Math.min(this.options.resyncRoundMaxBytes ?? SOURCE_SHIPPING_DEFAULTS.resyncRoundMaxBytes, Math.floor(tracker.diskSizeBytes / 4)));
    if (!status.resyncRequired || status.unshippedBytes > roundMax) return;
    this.resyncing.add(diskId);
    const entry = this.shippers.get(diskId)!;
    try {
      entry.health.reportResync('running', this.options.clock.now());
      const round = await tracker.resyncRound(read, roundMax);
      if (round !== undefined) {
        this.options.metrics.resyncBytesTotal.inc({ disk: diskId }, round.bytes);
        this.options.logger.info({ disk: diskId, log: round.log.name, bytes: round.bytes, remainingBytes: round.remainingBytes }, 'resync round sealed');
        entry.health.reportSuccess('resync');
      }
      entry.health.reportResync(tracker.status().resyncRequired ? 'pending' : 'none', this.options.clock.now());
      this.sealed();
    } catch (err) {
      const coded = err instanceof BlockrelayError ? err : new BlockrelayError('BR_IO', String(err), { cause: err });
      entry.health.reportError('resync', coded, this.options.clock.now());
      this.options.logger.warn({ disk: diskId, code: coded.code }, `resync round failed: ${coded.message}`);
      this.sealed();
    } finally {
      this.resyncing.delete(diskId);
    }
  }

  private scheduleHeartbeat(): void {
    const heartbeatMs = this.options.heartbeatMs ?? SOURCE_SHIPPING_DEFAULTS.heartbeatMs;
    if (heartbeatMs <= 0) return;
    this.heartbeat = this.options.clock.setTimer(() => {
      const idleMs = this.options.clock.now() - this.lastCutMs;
      const beat = idleMs >= heartbeatMs ? ChangeTracker.cut([...this.options.trackers.values()], { clock: this.options.clock }).then(() => this.sealed()) : Promise.resolve();
      beat
        .catch((err: unknown) => this.options.logger.warn({ err }, 'heartbeat cut failed'))
        .finally(() => this.scheduleHeartbeat());
    }, Math.max(1000, heartbeatMs - (this.options.clock.now() - this.lastCutMs)));
  }
}
