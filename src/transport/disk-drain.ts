import type { Clock } from '../platform/clock';
import type { Logger } from '../daemon/logger';
import type { Metrics } from '../daemon/metrics';
import { HEALTH_GAUGE_VALUE } from '../daemon/metrics';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import type { DiskHealth } from '../retry/health';
import { RetryLoop, type RetryPolicy } from '../retry/retry-policy';
import type { LogSpool, SpoolEntry } from './log-spool';

/**
 * Drains one disk's spooled logs, oldest first, one at a time: forwards
 * them to the next hop (process server) or applies them to the target
 * (master target). Each log is handled under the retry policy; a log is
 * removed from the spool only after `handle` succeeded, so a crash at any
 * moment leaves it to be handled again. A non-recoverable error stops this
 * disk in state Critical and leaves every other disk running.
 */
export interface DiskDrainOptions {
  readonly diskId: string;
  readonly spool: LogSpool;
  /** 'forward' or 'apply': the health source and metric label. */
  readonly stage: string;
  readonly handle: (entry: SpoolEntry) => Promise<void>;
  readonly clock: Clock;
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly health: DiskHealth;
  readonly retryPolicy?: RetryPolicy;
}

export type DrainState = 'idle' | 'busy' | 'retrying' | 'critical' | 'stopped';

export class DiskDrain {
  private stateValue: DrainState = 'idle';
  private wakeUp: (() => void) | undefined;
  private loopDone: Promise<void> | undefined;
  private retry: RetryLoop<void> | undefined;
  private idleWaiters: Array<() => void> = [];
  private stopping = false;
  lastError: BlockrelayError | undefined;

  constructor(private readonly options: DiskDrainOptions) {}

  get state(): DrainState {
    return this.stateValue;
  }

  get diskId(): string {
    return this.options.diskId;
  }

  start(): void {
    if (this.loopDone !== undefined) return;
    this.stopping = false;
    this.loopDone = this.loop().finally(() => {
      this.loopDone = undefined;
    });
  }

  /** A new log arrived: handle it now if the loop is waiting. */
  wake(): void {
    this.wakeUp?.();
  }

  /** An operator cleared a Critical state: acknowledge it and start again. */
  resume(): void {
    this.options.health.acknowledgeCritical();
    if (this.stateValue === 'critical') this.stateValue = 'idle';
    this.start();
  }

  /** Resolves when the spool holds nothing for this disk, or the disk went Critical. */
  whenIdle(): Promise<void> {
    if (this.options.spool.list(this.options.diskId).length === 0 || this.stateValue === 'critical' || this.stateValue === 'stopped') return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Stops after the log in hand; a pending retry wait ends at once. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.retry?.cancel();
    this.wakeUp?.();
    await this.loopDone;
    if (this.stateValue !== 'critical') this.stateValue = 'stopped';
    this.notifyIdle();
  }

  private notifyIdle(): void {
    for (const w of this.idleWaiters.splice(0)) w();
  }

  private async loop(): Promise<void> {
    const { spool, diskId, logger } = this.options;
    while (!this.stopping) {
      const next = spool.list(diskId)[0];
      if (next === undefined) {
        this.stateValue = 'idle';
        this.notifyIdle();
        await new Promise<void>((resolve) => {
          this.wakeUp = resolve;
        });
        this.wakeUp = undefined;
        continue;
      }
      this.stateValue = 'busy';
      try {
        await this.handleWithRetry(next);
        await spool.remove(diskId, next.envelope.seq);
        this.options.health.reportSuccess(this.options.stage);
      } catch (err) {
        const coded = isBlockrelayError(err) ? err : new BlockrelayError('BR_INTERNAL', String(err), { cause: err });
        if (coded.code === 'BR_RETRY_CANCELLED') break;
        this.lastError = coded;
        this.options.health.reportError(this.options.stage, coded, this.options.clock.now());
        this.stateValue = 'critical';
        this.options.metrics.health.set({ disk: diskId }, HEALTH_GAUGE_VALUE.Critical);
        logger.error({ disk: diskId, stage: this.options.stage, code: coded.code, seq: next.envelope.seq }, `disk ${diskId} stopped in state Critical: ${coded.message}`);
        this.notifyIdle();
        return;
      }
    }
  }

  private async handleWithRetry(entry: SpoolEntry): Promise<void> {
    const { diskId, clock, logger, metrics, health, stage } = this.options;
    this.retry = new RetryLoop(() => this.options.handle(entry), {
      clock,
      ...(this.options.retryPolicy ? { policy: this.options.retryPolicy } : {}),
      onFailure: (event) => {
        this.lastError = event.error;
        metrics.errorsTotal.inc({ disk: diskId, code: event.error.code });
        if (event.nextAttemptAtMs === undefined) return;
        this.stateValue = 'retrying';
        metrics.retriesTotal.inc({ disk: diskId, code: event.error.code });
        health.reportError(stage, event.error, clock.now());
        logger.warn({ disk: diskId, stage, code: event.error.code, seq: entry.envelope.seq, retryAtMs: event.nextAttemptAtMs }, `${stage} of log ${entry.envelope.seq} failed, retrying: ${event.error.message}`);
      },
    });
    try {
      await this.retry.run();
    } finally {
      this.retry = undefined;
    }
  }
}
