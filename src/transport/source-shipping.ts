import type { Logger } from '../daemon/logger';
import type { Metrics } from '../daemon/metrics';
import type { Clock, TimerHandle } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import { DiskHealth } from '../retry/health';
import type { RetryPolicy } from '../retry/retry-policy';
import { ChangeTracker } from '../tracking/change-tracker';
import type { PeerOptions } from './log-client';
import { LogShipper } from './log-shipper';
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
      });
      this.shippers.set(diskId, { shipper, health });
    }
  }

  start(): void {
    for (const { shipper } of this.shippers.values()) shipper.start();
    this.scheduleHeartbeat();
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
    const sealed = (await ChangeTracker.cut(trackers, { clock: this.options.clock, appTag })).filter((s) => s !== undefined);
    this.sealed();
    const first = sealed[0];
    if (first === undefined) throw new BlockrelayError('BR_INTERNAL', 'the app-consistent cut sealed no log (a disk in dirty-map-only mode needs a resync first)');
    return { cutId: first.cutId, cutTimeMs: first.cutTimeMs };
  }

  /** Resolves when every sealed log is shipped (or its disk went Critical). */
  async drain(): Promise<void> {
    await Promise.all([...this.shippers.values()].map(({ shipper }) => shipper.whenIdle()));
  }

  async stop(): Promise<void> {
    this.heartbeat?.cancel();
    this.heartbeat = undefined;
    await Promise.all([...this.shippers.values()].map(({ shipper }) => shipper.stop()));
  }

  status(): SourceDiskStatus[] {
    return [...this.shippers.entries()].map(([diskId, { shipper, health }]) => {
      const t = this.options.trackers.get(diskId)!.status();
      if (t.resyncRequired) health.reportResync('pending', this.options.clock.now());
      else health.reportResync('none', this.options.clock.now());
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
