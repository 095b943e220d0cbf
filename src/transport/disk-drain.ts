import type { Clock } from '../platform/clock';
import type { Logger } from '../daemon/logger';
import type { Metrics } from '../daemon/metrics';
import { HEALTH_GAUGE_VALUE } from '../daemon/metrics';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import type { DiskHealth } from '../retry/health';
import { RetryLoop, type RetryPolicy } from '../retry/retry-policy';
import type { LogSpool, SpoolEntry } from './log-spool';

/** Where a drain takes its work from, oldest first. */
export interface DrainQueue<T> {
  /** The oldest item not yet handled, if any. */
  next(): Promise<T | undefined>;
  /** Called once `handle` succeeded for the item: drop it from the queue. */
  complete(item: T): Promise<void>;
  /**
   * What the queue holds now in `item`'s place, or undefined once it left
   * the queue. Each attempt (a retry too) handles what this returns, so a
   * retry sends what the queue holds then, not what it held at the first
   * attempt: a spool may take a log again under a spooled log's number
   * (its ledger lost), which replaces that log and its file. Absent: items
   * never change in place.
   */
  current?(item: T): T | undefined;
  /** A short name of the item for logs, e.g. its sequence number. */
  describe(item: T): string;
  /** What the queue holds for this drain and how full its store is (a hold's bound is measured against it). */
  usage?(): QueueUsage;
  /**
   * The store the queue lives in, shared by the drains of every disk in it
   * (a spool). A log arriving for any of them re-checks the bounds of the
   * others' holds, so a hold yields when other disks fill the store.
   */
  readonly store?: object;
}

/** Bytes a drain's queue holds, against its store's bound. */
export interface QueueUsage {
  readonly queuedBytes: number;
  /** Everything in the store (all disks). */
  readonly storeUsedBytes: number;
  readonly storeCapacityBytes: number;
}

/**
 * A disk's logs in a spool, as a drain queue. `beforeRemove` runs before a
 * handled log leaves the spool (the receiving hop saves its sequence
 * ledger then: until that moment the spool was the record of the log).
 */
export function spoolQueue(spool: LogSpool, diskId: string, beforeRemove?: () => Promise<void>): DrainQueue<SpoolEntry> {
  return {
    next: async () => spool.list(diskId)[0],
    // A commit makes a new entry object: identity tells a replacement from the log handled.
    current: (entry) => spool.get(diskId, entry.envelope.seq),
    complete: async (entry) => {
      await beforeRemove?.();
      // Replaced while it was handled: the replacement was not, and stays
      // queued (it is the oldest, so it goes next). remove() checks that
      // under the log's lock, so a replacement committed meanwhile stays too.
      await spool.remove(diskId, entry.envelope.seq, entry);
    },
    describe: (entry) => `log ${entry.envelope.seq}`,
    usage: () => ({ queuedBytes: spool.pendingBytes(diskId), storeUsedBytes: spool.bytesUsed, storeCapacityBytes: spool.maxBytes }),
    store: spool,
  };
}

/** Per store, the drains whose hold has a bound (limitHold) now. */
const boundedHolds = new WeakMap<object, Set<DiskDrain<never>>>();

/**
 * Checks the bounds of every bounded hold on `store` (a spool) now, except
 * `besides`'s. Waking a drain does this. A receiver that refuses an upload
 * of `neededBytes` for want of room (BR_SPOOL_FULL) should call it too,
 * with that size: every hold holding anything then ends, so the held logs
 * go on and the refused log finds room when it is sent again.
 */
export function checkBoundedHolds(store: object, besides?: DiskDrain<never>, neededBytes = 0): void {
  for (const drain of boundedHolds.get(store) ?? []) if (drain !== besides) drain.checkHoldLimit(neededBytes);
}

/**
 * Drains one disk's queue of logs, oldest first, one at a time: ships them
 * from the source, forwards them to the next hop (process server) or
 * applies them to the target (master target). Each log is handled under the
 * retry policy; a log leaves the queue only after `handle` succeeded, so a
 * crash at any moment leaves it to be handled again. A non-recoverable error
 * stops this disk in state Critical and leaves every other disk running.
 */
export interface DiskDrainOptions<T> {
  readonly diskId: string;
  readonly queue: DrainQueue<T>;
  /** 'ship', 'forward' or 'apply': the health source and metric label. */
  readonly stage: string;
  readonly handle: (item: T) => Promise<void>;
  readonly clock: Clock;
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly health: DiskHealth;
  readonly retryPolicy?: RetryPolicy;
}

export type DrainState = 'idle' | 'busy' | 'retrying' | 'critical' | 'stopped';

export class DiskDrain<T = SpoolEntry> {
  private stateValue: DrainState = 'busy';
  private wakeUp: (() => void) | undefined;
  private woken = false;
  private loopDone: Promise<void> | undefined;
  private retry: RetryLoop<void> | undefined;
  private idleWaiters: Array<() => void> = [];
  private stopping = false;
  /** Items this accepts stay queued (a resync session holds them back); see hold(). */
  private holdBack: ((item: T) => boolean) | undefined;
  /** The bound of the current hold, if limitHold() set one. */
  private holdLimit: { maxBytes: number; maxShare: number; reserveShare: number; onExceeded: (queuedBytes: number) => void } | undefined;
  /** A runNow() in progress: the loop waits for it before taking the next item. */
  private direct: Promise<void> | undefined;
  lastError: BlockrelayError | undefined;
  /** The item whose `handle` runs now (one at a time: the loop waits for a runNow()), and since when. */
  private handling: { readonly item: T; readonly sinceMs: number } | undefined;

  constructor(private readonly options: DiskDrainOptions<T>) {}

  /**
   * The item being handled now (its apply or forward running, not a retry
   * wait), described as the queue names it, and when that attempt began
   * (the injected clock): a hung target shows as one attempt that never
   * ends (DiskHealth.reportInHand).
   */
  inHand(): { readonly description: string; readonly sinceMs: number } | undefined {
    const h = this.handling;
    return h === undefined ? undefined : { description: this.options.queue.describe(h.item), sinceMs: h.sinceMs };
  }

  /** Runs `handle` on `item`, recorded as in hand while it runs. */
  private async handleTracked(item: T): Promise<void> {
    const mine = { item, sinceMs: this.options.clock.now() };
    this.handling = mine;
    try {
      await this.options.handle(item);
    } finally {
      if (this.handling === mine) this.handling = undefined;
    }
  }

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

  /**
   * A new log arrived: handle it now if the loop is waiting. The log takes
   * room in the store every disk shares, so the bounds of the other disks'
   * holds in that store are checked too (their own drains are not woken by
   * it, and a hold must yield before the store refuses this disk's logs).
   */
  wake(): void {
    const store = this.options.queue.store;
    if (store !== undefined) checkBoundedHolds(store, this as unknown as DiskDrain<never>);
    this.woken = true;
    // Marked busy at once, so whenIdle() called right after cannot see a stale idle.
    if (this.stateValue === 'idle') this.stateValue = 'busy';
    this.wakeUp?.();
  }

  /** An operator cleared a Critical state: acknowledge it and start again. */
  resume(): void {
    this.options.health.acknowledgeCritical();
    if (this.stateValue === 'critical') this.stateValue = 'idle';
    this.start();
  }

  /**
   * Holds back the oldest queued item while `holdBack` accepts it: the loop
   * treats it as if the queue were empty (whenIdle resolves once everything
   * before it is handled), and it stays queued until release().
   */
  hold(holdBack: (item: T) => boolean): void {
    this.holdBack = holdBack;
    this.wake();
  }

  /** Whether a hold() keeps `item` back now (a sender looking ahead must not pass it on either). */
  holds(item: T): boolean {
    return this.holdBack?.(item) === true;
  }

  /** Ends a hold(): held items are handled again, in order. */
  release(): void {
    this.holdBack = undefined;
    this.setHoldLimit(undefined);
    this.wake();
  }

  private setHoldLimit(limit: DiskDrain<T>['holdLimit']): void {
    this.holdLimit = limit;
    const store = this.options.queue.store;
    if (store === undefined) return;
    let holds = boundedHolds.get(store);
    if (limit === undefined) {
      holds?.delete(this as unknown as DiskDrain<never>);
      return;
    }
    if (holds === undefined) boundedHolds.set(store, (holds = new Set()));
    holds.add(this as unknown as DiskDrain<never>);
  }

  /**
   * Bounds the current hold, once everything before the held items is
   * handled (so what stays queued is held): when the queue holds more than
   * `maxBytes`, or more than `maxShare` of its store's bound, or the store
   * has less than `reserveShare` of its bound free while this holds
   * anything, `onExceeded` is called once (it is expected to release).
   * Checked whenever this drain wakes (as each of its items arrives), and
   * whenever the drain of another disk in the same store wakes (as other
   * disks' logs take room in it).
   */
  limitHold(maxBytes: number, maxShare: number, reserveShare: number, onExceeded: (queuedBytes: number) => void): void {
    if (this.holdBack === undefined) return;
    this.setHoldLimit({ maxBytes, maxShare, reserveShare, onExceeded });
    this.wake();
  }

  /** Ends the hold (onExceeded) if it passed its bound, or the store lacks `neededBytes` for another disk's log; see limitHold. */
  checkHoldLimit(neededBytes = 0): void {
    const limit = this.holdLimit;
    const usage = this.options.queue.usage?.();
    if (limit === undefined || usage === undefined || usage.queuedBytes === 0) return;
    const bound = Math.min(limit.maxBytes, usage.storeCapacityBytes * limit.maxShare);
    const free = usage.storeCapacityBytes - usage.storeUsedBytes;
    if (usage.queuedBytes > bound || free < usage.storeCapacityBytes * limit.reserveShare || free < neededBytes) {
      this.setHoldLimit(undefined);
      limit.onExceeded(usage.queuedBytes);
    }
  }

  /**
   * Handles `item` at once, outside the queue, when the drain has nothing
   * else to do: started, idle with an empty queue, not woken, holding
   * nothing, not stopping and no other runNow() in progress. Returns false
   * and does nothing otherwise. One attempt, no retry: a failure is reported
   * to the health and thrown, and the caller queues the item for the
   * retrying path (the master target applying a log as it arrives,
   * master-target.ts). While it runs the drain counts as busy (whenIdle()
   * waits for it) and the loop takes nothing from the queue.
   */
  async runNow(item: T): Promise<boolean> {
    if (this.wakeUp === undefined || this.woken || this.stopping || this.direct !== undefined || this.holdBack !== undefined || this.stateValue !== 'idle') return false;
    this.stateValue = 'busy';
    const run = this.handleTracked(item);
    this.direct = run.then(() => undefined, () => undefined);
    try {
      await run;
      this.options.health.reportSuccess(this.options.stage);
      return true;
    } catch (err) {
      const coded = isBlockrelayError(err) ? err : new BlockrelayError('BR_INTERNAL', String(err), { cause: err });
      this.lastError = coded;
      this.options.metrics.errorsTotal.inc({ disk: this.options.diskId, code: coded.code });
      this.options.health.reportError(this.options.stage, coded, this.options.clock.now());
      throw coded;
    } finally {
      this.direct = undefined;
      // Still parked (nothing woke the loop meanwhile): idle again.
      if (this.wakeUp !== undefined && !this.woken && this.stateValue === 'busy') {
        this.stateValue = 'idle';
        this.notifyIdle();
      }
    }
  }

  /** Resolves when the queue holds nothing for this disk, or the disk went Critical or stopped. */
  whenIdle(): Promise<void> {
    if (this.stateValue === 'idle' || this.stateValue === 'critical' || this.stateValue === 'stopped') return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Stops after the log in hand; a pending retry wait ends at once. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.setHoldLimit(undefined);
    this.retry?.cancel();
    this.wakeUp?.();
    await this.loopDone;
    await this.direct;
    if (this.stateValue !== 'critical') this.stateValue = 'stopped';
    this.notifyIdle();
  }

  private notifyIdle(): void {
    for (const w of this.idleWaiters.splice(0)) w();
  }

  private async loop(): Promise<void> {
    const { queue, diskId, logger } = this.options;
    while (!this.stopping) {
      // An item handled by runNow() comes before anything queued after it.
      if (this.direct !== undefined) await this.direct;
      this.woken = false;
      this.stateValue = 'busy';
      const queued = await queue.next();
      const next = queued !== undefined && this.holdBack?.(queued) === true ? undefined : queued;
      if (next === undefined && queued !== undefined) this.checkHoldLimit();
      if (next === undefined) {
        if (this.woken) continue;
        this.stateValue = 'idle';
        this.notifyIdle();
        await new Promise<void>((resolve) => {
          this.wakeUp = resolve;
          if (this.woken || this.stopping) resolve();
        });
        this.wakeUp = undefined;
        continue;
      }
      try {
        const handled = await this.handleWithRetry(next);
        if (handled !== undefined) await queue.complete(handled);
        this.options.health.reportSuccess(this.options.stage);
      } catch (err) {
        const coded = isBlockrelayError(err) ? err : new BlockrelayError('BR_INTERNAL', String(err), { cause: err });
        if (coded.code === 'BR_RETRY_CANCELLED') break;
        this.lastError = coded;
        this.options.health.reportError(this.options.stage, coded, this.options.clock.now());
        this.stateValue = 'critical';
        this.options.metrics.health.set({ disk: diskId }, HEALTH_GAUGE_VALUE.Critical);
        logger.error({ disk: diskId, stage: this.options.stage, code: coded.code, item: queue.describe(next) }, `disk ${diskId} stopped in state Critical: ${coded.message}`);
        this.notifyIdle();
        return;
      }
    }
  }

  /**
   * Handles `item` under the retry policy; returns what was handled (the
   * queue's item in its place at the last attempt, see DrainQueue.current),
   * or undefined when it left the queue before an attempt.
   */
  private async handleWithRetry(item: T): Promise<T | undefined> {
    const { diskId, clock, logger, metrics, health, stage, queue } = this.options;
    let handled: T | undefined = item;
    this.retry = new RetryLoop(async () => {
      handled = queue.current === undefined ? item : queue.current(item);
      if (handled !== undefined) await this.handleTracked(handled);
    }, {
      clock,
      ...(this.options.retryPolicy ? { policy: this.options.retryPolicy } : {}),
      onFailure: (event) => {
        this.lastError = event.error;
        metrics.errorsTotal.inc({ disk: diskId, code: event.error.code });
        if (event.nextAttemptAtMs === undefined) return;
        this.stateValue = 'retrying';
        metrics.retriesTotal.inc({ disk: diskId, code: event.error.code });
        health.reportError(stage, event.error, clock.now());
        logger.warn({ disk: diskId, stage, code: event.error.code, item: queue.describe(item), retryAtMs: event.nextAttemptAtMs }, `${stage} of ${queue.describe(item)} failed, retrying: ${event.error.message}`);
      },
    });
    try {
      await this.retry.run();
    } finally {
      this.retry = undefined;
    }
    return handled;
  }
}
