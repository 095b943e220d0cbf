import * as path from 'node:path';
import { constants as perfConstants, PerformanceObserver } from 'node:perf_hooks';
import * as v8 from 'node:v8';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import type { MetricObjectWithValues, MetricValue } from 'prom-client';
import type { Logger } from '../daemon/logger';
import { systemClock, type Clock } from '../platform/clock';
import { cpuTimeFromProcStat, type CpuTime } from '../platform/cpu-time';
import { BlockrelayError } from '../retry/blockrelay-error';
import type { LogStageEvent, LogStageSink } from './log-stage-events';
import type { ApplyingHop, DiskApplyStatus } from './master-target';

/**
 * A receiving hop (process server or master target) run in a worker thread
 * of this process, so that in a one-process deployment (the demo) the roles
 * use more than one core: the source tap keeps the main thread, each hop
 * gets its own event loop, heap and garbage collector. The roles still talk
 * over real loopback HTTP, and every durability promise is the hop's own:
 * the worker runs the very same ApplyingHop.
 *
 * The worker module (`entry`) calls `serveHopInWorker` with a function that
 * builds the hop from the plain `init` data; the parent drives it with a
 * few calls (start, drain, stop, metrics) and keeps the hop's newest disk
 * status, which the worker pushes after every log it finishes and every
 * `statusPushMs`.
 */
export interface HopWorkerOptions {
  /** Absolute path of the worker module (`.ts` under tsx, `.js` when built). */
  readonly entry: string;
  /** Structured-cloneable data the entry builds its hop from. */
  readonly init: unknown;
  readonly logger: Logger;
  readonly clock?: Clock;
  readonly onStage?: LogStageSink;
  /** Name for logs and errors, e.g. `master-target`. */
  readonly name: string;
}

/** How often a worker pushes its disks' status when nothing else happens. */
const STATUS_PUSH_MS = 250;

type Call = 'start' | 'drain' | 'stop' | 'metrics' | 'cpu' | 'gc';

/** CPU time one thread has used, in ms. */
export type ThreadCpu = CpuTime;

/**
 * CPU time of the calling thread (Linux: /proc/thread-self/stat);
 * undefined where that is not available. Node 20 has no per-thread figure
 * of its own, and process.cpuUsage() sums every thread: the e2e bench
 * splits the chain's CPU between the source and the hops with this.
 */
export function threadCpu(): ThreadCpu | undefined {
  return cpuTimeFromProcStat('/proc/thread-self/stat');
}

/** Garbage collections of one thread's isolate since it first called threadGc(): counts and pause time in ms. */
export interface ThreadGc {
  readonly majorCount: number;
  readonly majorMs: number;
  readonly minorCount: number;
  readonly minorMs: number;
}

let gcSeen: { majorCount: number; majorMs: number; minorCount: number; minorMs: number } | undefined;

/**
 * The calling thread's garbage collections (each isolate has its own
 * collector, and a PerformanceObserver sees only its own isolate's), counted
 * from the first call on. Major collections scale with the live heap, and
 * their marking runs on V8's helper threads too, so their count per GB is a
 * steadier figure of a hop's allocation than CPU time on a shared machine.
 * Entries arrive asynchronously: a count lags by at most one turn of the
 * event loop.
 */
export function threadGc(): ThreadGc {
  if (gcSeen === undefined) {
    const seen = (gcSeen = { majorCount: 0, majorMs: 0, minorCount: 0, minorMs: 0 });
    const observer = new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) {
        const kind = (entry as { detail?: { kind?: number } }).detail?.kind;
        if (kind === perfConstants.NODE_PERFORMANCE_GC_MAJOR) {
          seen.majorCount++;
          seen.majorMs += entry.duration;
        } else if (kind === perfConstants.NODE_PERFORMANCE_GC_MINOR) {
          seen.minorCount++;
          seen.minorMs += entry.duration;
        }
      }
    });
    observer.observe({ entryTypes: ['gc'] });
  }
  return { ...gcSeen };
}

type ToWorker = { readonly id: number; readonly call: Call };

type FromWorker =
  | { readonly kind: 'reply'; readonly id: number; readonly value?: unknown; readonly error?: { code: string; message: string } }
  | { readonly kind: 'status'; readonly disks: DiskApplyStatus[] }
  | { readonly kind: 'stage'; readonly event: LogStageEvent };

/** Marks the workerData of a hop worker. */
const HOP_WORKER_MARK = 'blockrelayHopWorker';

/**
 * Old generation a hop worker's heap starts with, in MiB. V8 starts it
 * small (a limit near 45 MB), so a hop streaming logs through it started a
 * major GC every 200-400 ms whatever it allocated: 30-48 per GB applied,
 * about a fifth of the chain's CPU on helper threads. With 256 MiB, two
 * per GB (E7, session 6: whole chain 5.5 -> 4.3 CPU-s per GB, 236 -> 280
 * MB/s, medians of interleaved `bench/e2e.bench.ts --chain-only --warm`
 * runs). The cost is up to this much garbage held per worker before its
 * first major GC.
 */
export const HOP_WORKER_INITIAL_OLD_SPACE_MB = 256;

let heapFlagSet = false;

/**
 * V8 takes heap flags per isolate at its creation, and a Worker has no
 * option for the initial old space (resourceLimits only caps it), so the
 * flag is set once in this isolate before the first hop worker starts; it
 * applies to isolates made afterwards, which are only hop workers here.
 * The standalone roles run on the main isolate: their systemd units pass
 * the same flag to node (docs/deploy).
 */
function setHopHeapFlag(): void {
  if (heapFlagSet) return;
  heapFlagSet = true;
  v8.setFlagsFromString(`--initial-old-space-size=${HOP_WORKER_INITIAL_OLD_SPACE_MB}`);
}

/**
 * Under tsx (the sources run as TypeScript) a worker does not inherit the
 * loader: the worker is started from a small CommonJS shim that registers
 * tsx first. Built JavaScript runs directly.
 */
function workerFor(entry: string, data: unknown): Worker {
  setHopHeapFlag();
  if (path.extname(entry) !== '.ts') return new Worker(entry, { workerData: data });
  const tsxApi = require.resolve('tsx/cjs/api');
  const shim = `require(${JSON.stringify(tsxApi)}).register(); require(${JSON.stringify(entry)});`;
  return new Worker(shim, { eval: true, workerData: data });
}

export class HopWorker {
  private readonly worker: Worker;
  private readonly calls = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private disks: DiskApplyStatus[] = [];
  private urlValue: string | undefined;
  private exited = false;
  private readonly clock: Clock;

  constructor(private readonly options: HopWorkerOptions) {
    this.clock = options.clock ?? systemClock;
    this.worker = workerFor(options.entry, { [HOP_WORKER_MARK]: true, init: options.init });
    this.worker.on('message', (m: FromWorker) => this.receive(m));
    this.worker.on('error', (err) => {
      // The hop died of an uncaught error, as it would have taken the whole
      // process down when run in the main thread: do the same, loudly.
      options.logger.fatal({ err, role: options.name }, `${options.name} worker failed`);
      setImmediate(() => {
        throw err;
      });
    });
    this.worker.on('exit', () => {
      this.exited = true;
      for (const c of this.calls.values()) c.reject(new BlockrelayError('BR_INTERNAL', `${options.name} worker exited`));
      this.calls.clear();
    });
  }

  get url(): string {
    if (this.urlValue === undefined) throw new Error(`${this.options.name} not started`);
    return this.urlValue;
  }

  async start(): Promise<void> {
    this.urlValue = (await this.call('start')) as string;
  }

  /** Waits until the hop has passed on (or applied) everything it holds. */
  async drain(): Promise<void> {
    await this.call('drain');
  }

  /** Stops the hop and ends its thread. */
  async stop(): Promise<void> {
    if (this.exited) return;
    try {
      await this.call('stop');
    } finally {
      await this.worker.terminate();
    }
  }

  /** CPU time the hop's thread has used so far (undefined where the platform does not say). */
  async threadCpu(): Promise<ThreadCpu | undefined> {
    if (this.exited) return undefined;
    return (await this.call('cpu')) as ThreadCpu | undefined;
  }

  /** The hop's garbage collections since it started (threadGc() in its thread). */
  async threadGc(): Promise<ThreadGc | undefined> {
    if (this.exited) return undefined;
    return (await this.call('gc')) as ThreadGc;
  }

  /** The hop's registry as prom-client JSON, for a parent registry to aggregate. */
  async metricsJson(): Promise<MetricObjectWithValues<MetricValue<string>>[]> {
    if (this.exited) return [];
    return (await this.call('metrics')) as MetricObjectWithValues<MetricValue<string>>[];
  }

  /**
   * The hop's disks as of its newest push, with the RPO taken at the time
   * of this call from the newest applied point the hop reported: a pushed
   * status is never younger than the truth, so the RPO is never understated.
   */
  diskStatus(): DiskApplyStatus[] {
    const now = this.clock.now();
    return this.disks.map((d) => ({ ...d, rpoSeconds: d.lastPointTimeMs === null ? null : Math.max(0, now - d.lastPointTimeMs) / 1000 }));
  }

  private call(call: Call): Promise<unknown> {
    if (this.exited) return Promise.reject(new BlockrelayError('BR_INTERNAL', `${this.options.name} worker has exited`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.calls.set(id, { resolve, reject });
      this.worker.postMessage({ id, call } satisfies ToWorker);
    });
  }

  private receive(m: FromWorker): void {
    if (m.kind === 'status') {
      this.disks = m.disks;
    } else if (m.kind === 'stage') {
      this.options.onStage?.(m.event);
    } else {
      const pending = this.calls.get(m.id);
      this.calls.delete(m.id);
      if (pending === undefined) return;
      if (m.error === undefined) pending.resolve(m.value);
      else pending.reject(new BlockrelayError(m.error.code as never, m.error.message));
    }
  }
}

/** What a worker entry builds: a hop, told where to report stage events. */
export type HopBuilder = (init: unknown, onStage: LogStageSink) => ApplyingHop;

/**
 * The worker side: builds the hop and serves the parent's calls. A no-op
 * when this module is not running as a hop worker (so an entry module can
 * also be imported normally).
 */
export function serveHopInWorker(build: HopBuilder): void {
  if (isMainThread || parentPort === null || (workerData as Record<string, unknown> | null)?.[HOP_WORKER_MARK] !== true) return;
  const port = parentPort;
  threadGc();
  const post = (m: FromWorker): void => port.postMessage(m);
  const pushStatus = (): void => post({ kind: 'status', disks: hop.diskStatus() });
  const hop = build((workerData as { init: unknown }).init, (event) => {
    post({ kind: 'stage', event });
    // A finished log changes what the parent shows: push at once, not at the next tick.
    if (event.phase === 'done') pushStatus();
  });
  let pusher: NodeJS.Timeout | undefined;
  port.on('message', (m: ToWorker) => {
    const run = async (): Promise<unknown> => {
      switch (m.call) {
        case 'start':
          await hop.start();
          pushStatus();
          pusher = setInterval(pushStatus, STATUS_PUSH_MS);
          return hop.url;
        case 'drain':
          await hop.drain();
          pushStatus();
          return undefined;
        case 'stop':
          clearInterval(pusher);
          await hop.stop();
          pushStatus();
          return undefined;
        case 'metrics':
          return hop.metrics.registry.getMetricsAsJSON();
        case 'cpu':
          return threadCpu();
        case 'gc':
          return threadGc();
      }
    };
    run().then(
      (value) => post({ kind: 'reply', id: m.id, value }),
      (err: unknown) => {
        const coded = err instanceof BlockrelayError ? err : new BlockrelayError('BR_INTERNAL', String((err as Error)?.message ?? err), { cause: err });
        post({ kind: 'reply', id: m.id, error: { code: coded.code, message: coded.message } });
      },
    );
  });
}
