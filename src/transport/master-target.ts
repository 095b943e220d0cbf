import * as path from 'node:path';
import type { BlockrelayConfig } from '../daemon/config';
import { createLogger, type Logger } from '../daemon/logger';
import { createMetrics, HEALTH_GAUGE_VALUE, type Metrics } from '../daemon/metrics';
import { StateLock } from '../daemon/state-lock';
import { systemClock, type Clock } from '../platform/clock';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import { removeStrayTemporaries } from '../platform/durable-file';
import { DiskHealth, HEALTH_DEFAULTS } from '../retry/health';
import type { RetryPolicy } from '../retry/retry-policy';
import type { DiskTarget } from '../targets/disk-target';
import { DiskDrain, spoolQueue } from './disk-drain';
import { HttpApi, sendJson, type Route } from './http-api';
import type { LogOps } from './log-ops';
import { LogReceiver } from './log-receiver';
import { HELD_LOG_MEMORY_MAX_BYTES, LogMemory } from './held-log';
import type { LogStageSink } from './log-stage-events';
import { LogSpool, type SpoolEntry } from './log-spool';
import { SequenceLedger } from './sequence-ledger';
import { openOrCreateTarget } from './target-opener';
import { AttachedDisks } from '../targets/attached-disks';
import { observabilityRoutes } from '../daemon/status-page';
import { PROTOCOL_VERSION, validateDiskId } from './transport-protocol';
import { ResyncSessions, type ResyncDiskAccess, type ResyncJournalProvider, type ResyncStatus } from './resync-route';
import { resyncJournalFor } from '../retention/resync-journal';

/**
 * Hooks the retention volume plugs into the apply path: pre-images are made
 * durable before a log overwrites anything, and a recovery point is recorded
 * once the log is applied and the target flushed.
 */
export interface ApplyHooks {
  beforeApply?(diskId: string, entry: SpoolEntry, target: DiskTarget): Promise<void>;
  afterApply?(diskId: string, entry: SpoolEntry, target: DiskTarget): Promise<void>;
  /**
   * Called once at start: lets the hooks raise a recoverable Warning on a
   * disk's health (e.g. BR_RETENTION_VOLUME_FULL) and clear it again,
   * without failing the apply.
   */
  attachHealth?(sink: { warn(diskId: string, err: BlockrelayError): void; clear(diskId: string): void }): void;
  /** The disk's recovery points as the status page shows them, when the hooks keep points. */
  pointsSummary?(diskId: string): PointsSummary | undefined;
}

/** Newest crash- and app-consistent points of a disk (ISO-8601 times), and how many are kept. */
export interface PointsSummary {
  readonly newestCrash: string | null;
  readonly newestApp: string | null;
  readonly count: number;
}

export interface DiskApplyStatus {
  readonly diskId: string;
  readonly target: string;
  readonly health: string;
  readonly reasons: string[];
  readonly state: string;
  readonly appliedSeq: number | null;
  readonly nextSeq: number | null;
  readonly pendingLogs: number;
  readonly pendingBytes: number;
  readonly appliedBytesTotal: number;
  readonly lastPointTimeMs: number | null;
  readonly rpoSeconds: number | null;
  readonly recentErrors: ReadonlyArray<{ code: string; message: string; atMs: number }>;
  readonly points?: PointsSummary | undefined;
  /** The disk's networked resync: a session holding it now, and whether its points are held back (resync-route.ts). */
  readonly resync?: ResyncStatus | undefined;
}

export interface ApplyingHopOptions {
  readonly stateDir: string;
  readonly listen: string;
  readonly secret: string | undefined;
  readonly tls?: BlockrelayConfig['tls'];
  /** Spool size bound (inbox of a master target, cache of a process server). */
  readonly spoolDir: string;
  readonly spoolMaxBytes: number;
  readonly rpoThresholdSeconds: number;
  /** One log's apply (or forward) running longer than this warns APPLY_STALLED (default 60 s). */
  readonly applyStallSeconds?: number;
  readonly logOps: LogOps;
  readonly clock?: Clock;
  readonly logger?: Logger;
  readonly metrics?: Metrics;
  readonly retryPolicy?: RetryPolicy;
  readonly hooks?: ApplyHooks;
  readonly hopName: string;
  /** Networked resync sessions: idle expiry (default 120 s) and journal (default: the retention hooks'). */
  readonly resyncIdleTimeoutMs?: number;
  /** How long opening a resync session waits for the logs up to its anchor (default 30 s). */
  readonly resyncReadyTimeoutMs?: number;
  readonly resyncJournal?: ResyncJournalProvider;
  /** Told when each log's apply (or forward, on a process server) starts and ends; the e2e bench's timeline. */
  readonly onStage?: LogStageSink;
  /**
   * Apply a log as it arrives, before answering, when its disk has nothing
   * else queued (the master target; see the class comment). Off: every log
   * is spooled durably first.
   */
  readonly applyOnReceive?: boolean;
  /**
   * Bytes of logs applied on receipt that may be held in memory at once
   * instead of temp files (default HELD_LOG_MEMORY_MAX_BYTES; 0 stages every
   * log to a file).
   */
  readonly heldLogMaxBytes?: number;
}

/** Per-disk apply state kept in memory. */
interface AppliedDisk {
  readonly diskId: string;
  readonly spec: string;
  readonly health: DiskHealth;
  drain: DiskDrain;
  target: DiskTarget | undefined;
  appliedBytesTotal: number;
  lastPointTimeMs: number | null;
}

/**
 * The master target role (and the apply side of an Azure-side process
 * server): receives logs, verifies and spools them, and applies each exactly
 * once, in order per disk, to the disk's target.
 *
 * Apply on receipt (master target): a log that arrives while its disk has
 * nothing queued is held in memory (up to `heldLogMaxBytes` for all disks;
 * past that, in a temp file that is never fsynced nor made visible),
 * verified there, applied at once, and only then answered 201. The sender
 * keeps the log until that answer, so the master target needs no durable
 * copy of its own: a crash before the answer leaves the log with the
 * sender, which sends it again, and applying it again finishes whatever
 * part was applied. Durably spooled first, and applied by the disk's drain
 * under the retry policy as before, is every log that arrives while the
 * disk has logs queued, is held by a resync session, is retrying or
 * stopped, is larger than APPLY_ON_RECEIVE_MAX_LOG_BYTES, or whose apply on
 * receipt failed (the answer then waits for the spooling).
 *
 * Exactly once: the ledger's `appliedSeq` is written only after the log is
 * applied and the target flushed. A crash before that re-applies the whole
 * log on restart, which finishes a half-applied log: entries are applied in
 * order and each overwrites its range, so applying the complete log again
 * yields the same content as applying it once. A log at or below
 * `appliedSeq` is never applied again.
 */
export class ApplyingHop {
  readonly clock: Clock;
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly spool: LogSpool;
  readonly ledger: SequenceLedger;
  protected readonly disks = new Map<string, AppliedDisk>();
  /** The product's limit of 60 disks attached to one master target, enforced where targets are attached. */
  private readonly attached = new AttachedDisks();
  protected readonly lock: StateLock;
  protected api: HttpApi | undefined;
  protected readonly receiver: LogReceiver;
  /** `POST /v1/disks/:disk/resync`: networked resync sessions (resync-route.ts). */
  readonly resyncSessions: ResyncSessions;
  private readonly resyncJournal: ResyncJournalProvider | undefined;

  constructor(
    protected readonly options: ApplyingHopOptions,
    private readonly diskSpecs: ReadonlyMap<string, string>,
  ) {
    this.clock = options.clock ?? systemClock;
    this.logger = options.logger ?? createLogger({ name: options.hopName });
    this.metrics = options.metrics ?? createMetrics();
    this.lock = new StateLock(options.stateDir);
    this.spool = new LogSpool(options.spoolDir, options.spoolMaxBytes);
    this.ledger = new SequenceLedger(options.stateDir);
    this.receiver = new LogReceiver({
      spool: this.spool,
      ledger: this.ledger,
      verify: (file, envelope) => options.logOps.verify(file, envelope.diskSizeBytes),
      acceptsDisk: (diskId) => this.acceptsDisk(diskId),
      isCritical: (diskId) => this.disks.get(diskId)?.drain.state === 'critical',
      onAccepted: (entry) => this.onAccepted(entry),
      ...(options.applyOnReceive === true
        ? { applyOnReceive: (entry: SpoolEntry) => this.applyOnReceive(entry), clock: this.clock, memory: new LogMemory(options.heldLogMaxBytes ?? HELD_LOG_MEMORY_MAX_BYTES) }
        : {}),
      logger: this.logger,
      metrics: this.metrics,
      hop: options.hopName,
    });
    this.resyncJournal = options.resyncJournal ?? resyncJournalFor(options.hooks);
    this.resyncSessions = new ResyncSessions({
      clock: this.clock,
      logger: this.logger,
      access: (diskId) => this.resyncAccess(diskId),
      journal: this.resyncJournal,
      stateDir: options.stateDir,
      ...(options.resyncIdleTimeoutMs === undefined ? {} : { idleTimeoutMs: options.resyncIdleTimeoutMs }),
      ...(options.resyncReadyTimeoutMs === undefined ? {} : { readyTimeoutMs: options.resyncReadyTimeoutMs }),
    });
  }

  /** How a resync session reaches a disk applied here. */
  protected resyncAccess(diskId: string): ResyncDiskAccess | undefined {
    const disk = this.disks.get(diskId);
    if (disk === undefined) return undefined;
    const ledger = (): { appliedSeq: number | null; nextSeq: number | null } => this.ledger.get(diskId);
    return {
      kind: 'local',
      diskId,
      drain: disk.drain,
      appliedSeq: () => ledger().appliedSeq,
      receivedSeq: () => (ledger().nextSeq === null ? null : ledger().nextSeq! - 1),
      openTarget: async (sizeBytes) => (disk.target ??= await openOrCreateTarget(disk.spec, sizeBytes)),
    };
  }

  get url(): string {
    if (this.api === undefined) throw new Error('not started');
    return this.api.url;
  }

  protected acceptsDisk(diskId: string): boolean {
    return this.diskSpecs.has(diskId);
  }

  protected onAccepted(entry: SpoolEntry): void {
    this.disks.get(entry.envelope.diskId)?.drain.wake();
  }

  /** Applies a log on receipt if its disk's drain is free (false: it is spooled instead). */
  private async applyOnReceive(entry: SpoolEntry): Promise<boolean> {
    const disk = this.disks.get(entry.envelope.diskId);
    if (disk === undefined) return false;
    return disk.drain.runNow(entry);
  }

  async start(): Promise<void> {
    this.lock.acquire();
    try {
      // The ledgers and resync session states are replaced through
      // temporaries; a process killed mid-save leaves them behind (the spool
      // sweeps its own on open).
      for (const dir of ['disks', 'resync']) {
        await removeStrayTemporaries(path.join(this.options.stateDir, dir)).catch((err: unknown) => {
          throw wrapError(err, 'BR_IO', `sweeping temporaries in ${path.join(this.options.stateDir, dir)}`);
        });
      }
      await this.spool.open();
      this.receiver.reconcile();
      for (const [diskId, spec] of this.diskSpecs) this.addApplier(diskId, spec);
      this.options.hooks?.attachHealth?.({
        warn: (diskId, err) => this.disks.get(diskId)?.health.reportError('retention', err, this.clock.now()),
        clear: (diskId) => this.disks.get(diskId)?.health.reportSuccess('retention'),
      });
      this.api = new HttpApi({ secret: this.options.secret, routes: this.routes(), tls: this.options.tls, logger: this.logger });
      const [host, port] = splitHostPort(this.options.listen);
      await this.api.listen(host, port);
      for (const disk of this.disks.values()) disk.drain.start();
      this.logger.info({ url: this.api.url, disks: [...this.disks.keys()] }, `${this.options.hopName} listening`);
    } catch (err) {
      this.lock.release();
      throw err;
    }
  }

  /** Waits until every disk's spooled logs are applied (or the disk went Critical). */
  async drain(): Promise<void> {
    await Promise.all([...this.disks.values()].map((d) => d.drain.whenIdle()));
  }

  async stop(): Promise<void> {
    await this.api?.close();
    await this.resyncSessions.close();
    await Promise.all([...this.disks.values()].map((d) => d.drain.stop()));
    for (const d of this.disks.values()) {
      await d.target?.close();
      d.target = undefined;
    }
    this.lock.release();
  }

  protected addApplier(diskId: string, spec: string): void {
    validateDiskId(diskId);
    this.attached.attach(diskId, spec);
    const health = this.newDiskHealth(diskId);
    const disk: AppliedDisk = { diskId, spec, health, drain: undefined as unknown as DiskDrain, target: undefined, appliedBytesTotal: 0, lastPointTimeMs: null };
    disk.drain = new DiskDrain({
      diskId,
      queue: spoolQueue(this.spool, diskId, () => this.ledger.persist(diskId)),
      stage: 'apply',
      handle: (entry) => this.apply(disk, entry),
      clock: this.clock,
      logger: this.logger,
      metrics: this.metrics,
      health,
      ...(this.options.retryPolicy ? { retryPolicy: this.options.retryPolicy } : {}),
    });
    this.disks.set(diskId, disk);
  }

  private async apply(disk: AppliedDisk, entry: SpoolEntry): Promise<void> {
    const { seq } = entry.envelope;
    const ledger = this.ledger.get(disk.diskId);
    if (ledger.appliedSeq !== null && seq <= ledger.appliedSeq) {
      // The log applied last, still held: its afterApply failed (a page
      // blob's snapshot refused: for an app tag that point would never
      // exist) or the hop died before it ran. It is idempotent: run it again.
      if (seq === ledger.appliedSeq && this.options.hooks?.afterApply !== undefined) {
        disk.target ??= await openOrCreateTarget(disk.spec, entry.envelope.diskSizeBytes);
        // Tainted as the apply was, so a log of an unfinished resync does not become a selectable point.
        await this.options.hooks.afterApply(disk.diskId, this.resyncSessions.markTainted(disk.diskId, entry), disk.target);
      }
      return;
    }
    // Logs apply in unbroken sequence; only a resync log may follow a gap (it carries the folded logs' extents).
    if (ledger.appliedSeq !== null && seq !== ledger.appliedSeq + 1 && entry.envelope.resync !== true) {
      throw new BlockrelayError('BR_SEQ_GAP', `disk ${disk.diskId}: log ${seq} is next in the inbox but ${ledger.appliedSeq + 1} was never received`, { details: { expectedSeq: ledger.appliedSeq + 1 } });
    }
    // And only past logs it skips: everything up to the log it follows must
    // be applied. The ledger admits it only then, so the spool keeps this
    // order already; this keeps a spool that lost a log (or a ledger that
    // went ahead of it) from applying the resync log over the missing one,
    // whose writes would then be on no target. A resync log without
    // `follows` (older sender) is applied as before.
    const follows = entry.envelope.resync === true ? entry.envelope.follows : undefined;
    if (ledger.appliedSeq !== null && follows !== undefined && follows > ledger.appliedSeq) {
      throw new BlockrelayError('BR_SEQ_GAP', `disk ${disk.diskId}: resync log ${seq} follows log ${follows}, but only logs up to ${ledger.appliedSeq} are applied`, { details: { expectedSeq: ledger.appliedSeq + 1, follows } });
    }
    // A log applied while a resync is unfinished (or sealed during its reads) ends no consistent point.
    entry = this.resyncSessions.markTainted(disk.diskId, entry);
    const started = process.hrtime.bigint();
    this.reportStage('apply', 'start', entry);
    disk.target ??= await openOrCreateTarget(disk.spec, entry.envelope.diskSizeBytes);
    await this.resyncJournal?.beforeApply?.(disk.diskId, entry, disk.target);
    await this.options.hooks?.beforeApply?.(disk.diskId, entry, disk.target);
    const applied = await this.options.logOps.apply(entry.file, disk.target);
    await disk.target.flush();
    await this.ledger.applied(disk.diskId, seq, entry.envelope.xxhash64);
    await this.options.hooks?.afterApply?.(disk.diskId, entry, disk.target);
    disk.appliedBytesTotal += applied.bytes;
    // A resync log ends no recovery point: its blocks were read while the source changed.
    if (entry.envelope.resync !== true) disk.lastPointTimeMs = entry.envelope.cutTimeMs;
    this.metrics.appliedBytesTotal.inc({ disk: disk.diskId }, applied.bytes);
    this.metrics.applySeconds.observe({ disk: disk.diskId }, Number(process.hrtime.bigint() - started) / 1e9);
    this.updateGauges(disk);
    this.reportStage('apply', 'done', entry);
  }

  protected reportStage(stage: 'apply' | 'forward', phase: 'start' | 'done', entry: SpoolEntry): void {
    const { diskId, seq, cutTimeMs } = entry.envelope;
    this.options.onStage?.({ diskId, seq, stage, phase, atMs: this.clock.now(), cutTimeMs, sizeBytes: entry.sizeBytes });
  }

  /** A disk's health, with this hop's RPO threshold and stall bound. */
  protected newDiskHealth(diskId: string): DiskHealth {
    return new DiskHealth(diskId, this.options.rpoThresholdSeconds * 1000, (this.options.applyStallSeconds ?? HEALTH_DEFAULTS.applyStallMs / 1000) * 1000);
  }

  /** How long the log in hand at `drain` has been running, into its health (APPLY_STALLED) and the in-hand gauge. */
  protected reportInHand(diskId: string, stage: 'apply' | 'forward', drain: DiskDrain, health: DiskHealth): void {
    const now = this.clock.now();
    const inHand = drain.inHand();
    const runningMs = inHand === undefined ? undefined : Math.max(0, now - inHand.sinceMs);
    health.reportInHand(stage, inHand?.description, runningMs, now);
    this.metrics.inHandSeconds.set({ disk: diskId, stage }, (runningMs ?? 0) / 1000);
  }

  protected updateGauges(disk: AppliedDisk): void {
    const now = this.clock.now();
    this.reportInHand(disk.diskId, 'apply', disk.drain, disk.health);
    const rpoMs = disk.lastPointTimeMs === null ? undefined : Math.max(0, now - disk.lastPointTimeMs);
    disk.health.reportRpo(rpoMs, now);
    if (rpoMs !== undefined) this.metrics.rpoSeconds.set({ disk: disk.diskId }, rpoMs / 1000);
    this.metrics.pendingBytes.set({ disk: disk.diskId, hop: this.options.hopName }, this.spool.pendingBytes(disk.diskId));
    this.metrics.health.set({ disk: disk.diskId }, HEALTH_GAUGE_VALUE[disk.health.state]);
  }

  /** Per-disk status for the JSON endpoint, the status page and `blockrelay status`. */
  diskStatus(): DiskApplyStatus[] {
    return [...this.disks.values()].map((d) => {
      this.updateGauges(d);
      const ledger = this.ledger.get(d.diskId);
      const now = this.clock.now();
      return {
        diskId: d.diskId,
        target: d.spec,
        health: d.health.state,
        reasons: d.health.reasons.map((r) => `${r.code}: ${r.message}`),
        state: d.drain.state,
        appliedSeq: ledger.appliedSeq,
        nextSeq: ledger.nextSeq,
        pendingLogs: this.spool.list(d.diskId).length,
        pendingBytes: this.spool.pendingBytes(d.diskId),
        appliedBytesTotal: d.appliedBytesTotal,
        lastPointTimeMs: d.lastPointTimeMs,
        rpoSeconds: d.lastPointTimeMs === null ? null : Math.max(0, now - d.lastPointTimeMs) / 1000,
        recentErrors: d.health.recentErrors.map((e) => ({ code: e.code, message: e.message, atMs: e.atMs })),
        points: this.options.hooks?.pointsSummary?.(d.diskId),
        resync: this.resyncSessions.status(d.diskId),
      };
    });
  }

  protected routes(): Route[] {
    return [
      ...this.receiver.routes(),
      ...this.resyncSessions.routes(),
      ...observabilityRoutes(() => ({ role: this.options.hopName, disks: this.diskStatus() }), this.metrics),
      {
        method: 'POST',
        pattern: `/${PROTOCOL_VERSION}/disks/:disk/resume`,
        handler: async (ctx) => {
          const disk = this.disks.get(validateDiskId(ctx.params.disk!));
          if (disk === undefined) throw new BlockrelayError('BR_DISK_UNKNOWN', `disk ${ctx.params.disk} is not served here`);
          disk.drain.resume();
          sendJson(ctx.res, 200, { diskId: disk.diskId, state: disk.drain.state });
        },
      },
    ];
  }
}

/** `blockrelay master-target --config FILE`: VMDK targets on a datastore directory by default. */
export function masterTargetFromConfig(config: BlockrelayConfig, logOps: LogOps, extra: Partial<ApplyingHopOptions> = {}): ApplyingHop {
  const specs = new Map(config.disks.map((d) => [d.id, d.target]));
  return new ApplyingHop(
    {
      stateDir: config.stateDir,
      listen: config.listen,
      secret: config.secret,
      tls: config.tls,
      spoolDir: path.join(config.stateDir, 'inbox'),
      spoolMaxBytes: config.cache?.maxBytes ?? 64 * 1024 ** 3,
      rpoThresholdSeconds: config.rpoThresholdSeconds,
      applyStallSeconds: config.applyStallSeconds,
      logOps,
      hopName: 'master-target',
      applyOnReceive: true,
      ...extra,
    },
    specs,
  );
}

export function splitHostPort(listen: string): [string, number] {
  const i = listen.lastIndexOf(':');
  return [listen.slice(0, i), Number(listen.slice(i + 1))];
}
