import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { AggregatorRegistry, Registry, type MetricObjectWithValues, type MetricValue } from 'prom-client';
import { systemClock, type Clock } from '../platform/clock';
import { writeFileDurably } from '../platform/durable-file';
import { SourceRole } from '../tap/source-role';
import { openDisk } from '../targets/disk-spec';
import type { DiskTarget } from '../targets/disk-target';
import { HopWorker } from '../transport/hop-worker';
import type { LogStageSink } from '../transport/log-stage-events';
import { splitHostPort, type DiskApplyStatus } from '../transport/master-target';
import { SourceShipping } from '../transport/source-shipping';
import { buildDemoHop, DEMO_HOP_WORKER_ENTRY, type DemoHopInit } from './demo-hops';
import { createLogger, type Logger } from './logger';
import { createMetrics, type Metrics } from './metrics';
import { SourceControl } from './source-control';
import { CONTROL_SECRET_ENV } from './tag-command';

/**
 * The starting old generation `npm start` gives the demo's main isolate
 * (node --initial-old-space-size), where the source role runs; the hop
 * workers get the same from hop-worker.ts. With V8's small default the
 * source thread ran 9-11 major GCs per GB of churn (session 6).
 */
export const DEMO_INITIAL_OLD_SPACE_MB = 256;

/** Defaults of `blockrelay demo`, units in the names. */
export const DEMO_DEFAULTS = {
  sizeBytes: 1024 ** 3,
  nbdListen: '127.0.0.1:10809',
  /**
   * Cuts every second: the RPO (age of the newest point at the target) is
   * the interval plus the time a log takes through the chain, so a 2 s
   * interval alone kept it over issue 6's 2 s goal. Shorter cuts no longer
   * cost the source much: a cut holds the guest's writes only while the
   * next log, made ahead, is renamed into place (1-3% of the time at 250 ms
   * cuts, against 25-40% when each cut sealed and created logs with the
   * writes held; docs/transport.md, "The source at short cuts"). At 250 ms
   * the RPO is then bounded by the chain carrying the whole churn; the
   * default moves there once three e2e bench runs (--interval-ms 250) on a
   * quiet machine give churn >= 200 MB/s with RPO p99 < 2 s.
   */
  intervalMs: 1_000,
  diskId: 'disk0',
} as const;

export interface DemoOptions {
  readonly dataDir: string;
  readonly sizeBytes: number;
  readonly nbdListen: string;
  readonly intervalMs?: number;
  /** Cut once the active log holds this many bytes, before the interval ends (default SOURCE_ROLE_DEFAULTS.cutBytes). */
  readonly cutBytes?: number;
  readonly clock?: Clock;
  readonly logger?: Logger;
  /**
   * Run the process server and the master target each in a worker thread
   * of this process (default: yes, unless a clock is injected, which only
   * the main thread can share), so the chain uses more than one core.
   */
  readonly hopsInWorkers?: boolean;
  /** Told when each log's ship, forward and apply stage starts and ends (the e2e bench's timeline). */
  readonly onStage?: LogStageSink;
  /** The process server forwards a log while it still arrives (ForwardOptions.cutThrough; off by default). */
  readonly cutThrough?: boolean;
}

/** A hop of the demo, in this thread or in a worker: what the demo calls on it. */
interface DemoHop {
  readonly url: string;
  start(): Promise<void>;
  drain(): Promise<void>;
  stop(): Promise<void>;
  diskStatus(): DiskApplyStatus[];
  metricsJson?(): Promise<MetricObjectWithValues<MetricValue<string>>[]>;
}

/**
 * The demo's registry: its own metrics (source side, process) together with
 * those of hops running in worker threads, aggregated at each scrape.
 */
class DemoRegistry extends Registry {
  constructor(private readonly own: Registry, private readonly hops: () => DemoHop[]) {
    super();
  }

  override async metrics(): Promise<string> {
    const parts = await Promise.all([this.own.getMetricsAsJSON(), ...this.hops().map((h) => h.metricsJson?.() ?? Promise.resolve([]))]);
    // Counters add up across the roles; a gauge two roles both set (a disk's
    // health) shows the worse value, not the sum. Process gauges keep theirs.
    const merged = parts.map((metrics) => metrics.map((m) => (String(m.type) === 'gauge' && m.name.startsWith('blockrelay_') && !m.name.startsWith('blockrelay_process_') ? { ...m, aggregator: 'max' as const } : m)));
    return AggregatorRegistry.aggregate(merged).metrics();
  }
}

/** The file `demo` writes for tools and people: where to connect. */
export interface DemoManifest {
  readonly nbd: string;
  readonly control: string;
  readonly metrics: string;
}

/**
 * `blockrelay demo`: a whole replication chain in one process, talking over
 * real loopback HTTP — a source tap with change tracking in front of
 * `DIR/source/disk0.img`, a process server spooling in `DIR/cache/`, and a
 * master target applying to `DIR/target/disk0.vmdk` with its undo journal and
 * recovery points in `DIR/retention/`. Started on an existing DIR it resumes
 * where it stopped (trackers, spools and ledgers are all on disk).
 */
export class Demo {
  readonly metrics: Metrics;
  readonly logger: Logger;
  private readonly clock: Clock;
  private mt: DemoHop | undefined;
  private ps: DemoHop | undefined;
  private source: SourceRole | undefined;
  private shipping: SourceShipping | undefined;
  private control: SourceControl | undefined;
  /** Open until the source role takes it over (it closes the disks on stop). */
  private protectedDisk: DiskTarget | undefined;
  manifest: DemoManifest | undefined;

  constructor(private readonly options: DemoOptions) {
    this.clock = options.clock ?? systemClock;
    this.logger = options.logger ?? createLogger({ level: 'warn', name: 'demo' });
    this.metrics = createMetrics();
  }

  get layout() {
    const dir = path.resolve(this.options.dataDir);
    return {
      dir,
      sourceDisk: path.join(dir, 'source', 'disk0.img'),
      logDir: path.join(dir, 'source', 'logs'),
      cache: path.join(dir, 'cache'),
      target: path.join(dir, 'target', 'disk0.vmdk'),
      retention: path.join(dir, 'retention'),
      state: path.join(dir, 'state'),
      manifest: path.join(dir, 'demo.json'),
    };
  }

  async start(): Promise<DemoManifest> {
    try {
      return await this.startRoles();
    } catch (err) {
      // A role that failed to start (a port in use, a damaged state file)
      // must not leave the others running: the process would never exit.
      await this.stopStarted();
      throw err;
    }
  }

  private async stopStarted(): Promise<void> {
    this.control?.tagger.stop();
    const steps: Array<() => Promise<void> | undefined> = [
      () => this.shipping?.stop(),
      () => this.source?.stop(),
      () => this.control?.close(),
      () => this.ps?.stop(),
      () => this.mt?.stop(),
      () => this.protectedDisk?.close(),
    ];
    for (const step of steps) await Promise.resolve(step()).catch(() => undefined);
  }

  private async startRoles(): Promise<DemoManifest> {
    const l = this.layout;
    for (const d of [path.dirname(l.sourceDisk), l.logDir, l.cache, path.dirname(l.target), l.retention, l.state]) fs.mkdirSync(d, { recursive: true });
    // The roles talk over loopback inside this process: a fresh secret per run is enough.
    const secret = crypto.randomBytes(24).toString('hex');
    const quiet = { logger: this.logger, metrics: this.metrics, clock: this.clock };

    await this.ensureTarget();
    const mtInit: DemoHopInit = {
      role: 'master-target',
      config: {
        stateDir: path.join(l.state, 'master-target'),
        listen: '127.0.0.1:0',
        secret,
        retention: { dir: l.retention },
        disks: [{ id: DEMO_DEFAULTS.diskId, target: `vmdk:${l.target}` }],
      },
      retentionDir: l.retention,
      logLevel: this.logger.level,
    };
    this.mt = this.hop(mtInit);
    await this.mt.start();

    this.ps = this.hop({
      role: 'process-server',
      config: { stateDir: path.join(l.state, 'process-server'), listen: '127.0.0.1:0', secret, cache: { dir: l.cache }, forward: { url: this.mt.url, secret } },
      logLevel: this.logger.level,
      cutThrough: this.options.cutThrough === true,
    });
    await this.ps.start();

    const disk = await this.openProtectedDisk();
    this.protectedDisk = disk;
    const [host, port] = splitHostPort(this.options.nbdListen);
    this.source = await SourceRole.start({
      disks: [{ id: DEMO_DEFAULTS.diskId, target: disk }],
      logDir: l.logDir,
      listenHost: host,
      listenPort: port,
      intervalMs: this.options.intervalMs ?? DEMO_DEFAULTS.intervalMs,
      cutBytes: this.options.cutBytes,
      clock: this.clock,
      logger: this.logger,
      onSealed: () => this.shipping?.sealed(),
    });
    this.protectedDisk = undefined;
    this.shipping = new SourceShipping({
      trackers: this.source.trackers,
      peer: { url: this.ps.url, secret },
      // After an overflow the demo resyncs at once, through the log stream.
      readers: new Map([[DEMO_DEFAULTS.diskId, (offset: number, length: number) => disk.read(offset, length)]]),
      ...quiet,
      ...(this.options.onStage ? { onStage: this.options.onStage } : {}),
    });
    this.shipping.start();
    this.control = new SourceControl({
      diskIds: [DEMO_DEFAULTS.diskId],
      cut: (disks, appTag) => this.shipping!.cutWithTag(disks, appTag),
      status: () => this.status(),
      hook: undefined,
      appIntervalMs: 60 * 60_000,
      secret: process.env[CONTROL_SECRET_ENV],
      ...quiet,
      metrics: { ...this.metrics, registry: new DemoRegistry(this.metrics.registry, () => [this.ps, this.mt].filter((h): h is DemoHop => h !== undefined)) },
    });
    await this.control.listen('127.0.0.1', 0);
    this.manifest = {
      nbd: this.source.exportUris[DEMO_DEFAULTS.diskId]!,
      control: this.control.url,
      metrics: `${this.control.url}/metrics`,
    };
    // Replaced whole (temp, rename): a tool polling for the file never reads it half-written.
    await writeFileDurably(l.manifest, `${JSON.stringify(this.manifest, null, 2)}\n`);
    return this.manifest;
  }

  /**
   * SIGTERM: seal the active logs, ship everything, forward everything,
   * apply everything, then stop. Nothing written before the signal is left
   * behind on the way to the target.
   */
  async drainAndStop(): Promise<void> {
    // No scheduled app-consistent cut may start while the trackers close.
    this.control?.tagger.stop();
    await this.source?.stop();
    await this.shipping?.finish();
    await this.ps?.drain();
    await this.mt?.drain();
    await this.control?.close();
    await this.ps?.stop();
    await this.mt?.stop();
  }

  /** Source, process-server and master-target view of the disk, for the status page and the live line. */
  status() {
    const source = this.shipping?.status() ?? [];
    const ps = this.ps?.diskStatus() ?? [];
    const mt = this.mt?.diskStatus() ?? [];
    return {
      role: 'demo (source + process server + master target)',
      disks: mt.map((m) => {
        const s = source.find((d) => d.diskId === m.diskId);
        const p = ps.find((d) => d.diskId === m.diskId);
        const healths = [m.health, s?.health, p?.health];
        const health = healths.includes('Critical') ? 'Critical' : healths.includes('Warning') ? 'Warning' : 'OK';
        return {
          ...m,
          health,
          reasons: [...(s?.reasons ?? []), ...(p?.reasons ?? []), ...m.reasons],
          pendingBytes: (s?.pendingBytes ?? 0) + (p?.pendingBytes ?? 0) + m.pendingBytes,
          pendingBytesByHop: { source: s?.pendingBytes ?? 0, 'process-server': p?.pendingBytes ?? 0, 'master-target': m.pendingBytes },
          resync: s?.resyncRequired ? { state: 'required', bytes: s.resyncBytes } : undefined,
          recentErrors: [...(s?.recentErrors ?? []), ...(p?.recentErrors ?? []), ...m.recentErrors].sort((a, b) => a.atMs - b.atMs).slice(-20),
        };
      }),
    };
  }

  /** Builds a hop in a worker thread, or in this thread when a clock is injected or workers are off. */
  private hop(init: DemoHopInit): DemoHop {
    const inWorker = this.options.hopsInWorkers ?? this.options.clock === undefined;
    if (inWorker) return new HopWorker({ entry: DEMO_HOP_WORKER_ENTRY, init, logger: this.logger, clock: this.clock, name: init.role, ...(this.options.onStage ? { onStage: this.options.onStage } : {}) });
    const hop = buildDemoHop(init, { logger: this.logger, metrics: this.metrics, clock: this.clock, onStage: this.options.onStage });
    return hop;
  }

  /**
   * Creates `DIR/target/disk0.vmdk` at start when it is missing, as the
   * layout promises: the master target would otherwise make it only when it
   * applies the first log, so an idle demo had no target to inspect. Same
   * size as the protected disk (the existing one when resuming); a target
   * that exists is left to the master target, which checks its size.
   */
  private async ensureTarget(): Promise<void> {
    const l = this.layout;
    if (fs.existsSync(l.target)) return;
    const sizeBytes = fs.existsSync(l.sourceDisk) ? fs.statSync(l.sourceDisk).size : this.options.sizeBytes;
    const target = await openDisk(`vmdk:${l.target}`, { create: { sizeBytes } });
    await target.close();
  }

  private async openProtectedDisk(): Promise<DiskTarget> {
    const file = this.layout.sourceDisk;
    if (fs.existsSync(file)) {
      const disk = await openDisk(`raw:${file}`);
      if (disk.sizeBytes !== this.options.sizeBytes) this.logger.warn({ sizeBytes: disk.sizeBytes }, `resuming with the existing ${disk.sizeBytes}-byte disk; --size is ignored`);
      return disk;
    }
    return openDisk(`raw:${file}`, { create: { sizeBytes: this.options.sizeBytes } });
  }
}
