import { NbdServer, type NbdServerAddress } from './nbd-server';
import type { NbdConnectionLimits } from './nbd-connection';
import { systemClock, type Clock, type TimerHandle } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import type { DiskTarget } from '../targets/disk-target';
import { ChangeTracker, type ChangeTrackerOptions, type ResyncReport, type SealedLogInfo } from '../tracking/change-tracker';
import { DISK_ID_PATTERN } from '../platform/disk-id';

/** Defaults of the source role, units in the names. */
export const SOURCE_ROLE_DEFAULTS = {
  /** How often all disks' logs are sealed at one cut. */
  intervalMs: 30_000,
  /** How long shutdown waits for NBD requests in flight. */
  shutdownGraceMs: 10_000,
} as const;

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
  private readonly onSealed: ((logs: readonly SealedLogInfo[]) => void) | undefined;
  private timer: TimerHandle | undefined;
  private cutInProgress: Promise<unknown> = Promise.resolve();
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
      logger.info({ listen: `${address.host}:${address.port}`, disks: [...ids], intervalMs }, 'source tap ready');
      return role;
    } catch (err) {
      for (const t of trackers.values()) await t.close({ seal: false }).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Seals every disk's active log at one cut and opens the next ones, unless
   * no disk logged anything since the last cut (empty logs would only add
   * points without changes). Cuts never overlap.
   */
  cutNow(): Promise<readonly SealedLogInfo[]> {
    const run = this.cutInProgress.then(async () => {
      const trackers = [...this.trackers.values()];
      if (!trackers.some((t) => t.status().activeLogEntries > 0)) return [];
      const sealed = (await ChangeTracker.cut(trackers, { clock: this.clock })).filter((s): s is SealedLogInfo => s !== undefined);
      if (sealed.length > 0) {
        this.logger.info({ logs: sealed.map((s) => s.name), cutId: sealed[0]!.cutId }, 'sealed logs at a cut');
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
   * disks are flushed and closed.
   */
  async stop(graceMs: number = SOURCE_ROLE_DEFAULTS.shutdownGraceMs): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.timer?.cancel();
    this.timer = undefined;
    await this.cutInProgress;
    await this.server.close(graceMs);
    const errors: unknown[] = [];
    for (const tracker of this.trackers.values()) {
      await tracker.close({ seal: true }).catch((err: unknown) => errors.push(err));
    }
    for (const d of this.disks) await d.target.close().catch((err: unknown) => errors.push(err));
    const sealed = [...this.trackers.values()].flatMap((t) => t.sealedLogs().map((s) => s.name));
    this.logger.info({ sealedLogs: sealed.length }, 'source tap stopped');
    if (errors.length > 0) throw errors[0];
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = this.clock.setTimer(() => {
      this.timer = undefined;
      this.cutNow()
        .catch((err: unknown) => this.logger.warn({ err }, 'cut failed; retrying at the next interval'))
        .finally(() => this.schedule());
    }, this.intervalMs);
  }
}
