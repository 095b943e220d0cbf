import { BlockrelayError } from '../retry/blockrelay-error';
import { InFlightLimit } from './in-flight-limit';

/**
 * Thread-pool jobs one target file may have in flight (see
 * {@link PoolJobLimit}). 4 is what the whole process had before roles
 * sized the pool (src/daemon/thread-pool.ts), so a caller that fans out
 * (a resync's writes, thousands of small runs at once) keeps the
 * parallelism it was measured with, while a hung file holds at most 4 of
 * the role's 16 threads.
 */
export const TARGET_POOL_JOBS = 4;

/**
 * A bound on the libuv thread-pool jobs one target file has running at
 * once: each job on a device that stops answering keeps a pool thread until
 * the device answers, and the pool is shared by every disk of the process.
 * Jobs past the bound wait here, in order, holding no thread; the waiters
 * are bounded by the callers' own bounds (a request's runs, a log's span).
 */
export class PoolJobLimit {
  private readonly slots: InFlightLimit;

  constructor(readonly limit: number = TARGET_POOL_JOBS) {
    if (!Number.isSafeInteger(limit) || limit < 1 || limit > 1024) {
      throw new BlockrelayError('BR_USAGE', `a pool job limit must be 1 to 1024, got ${limit}`, { details: { limit } });
    }
    this.slots = new InFlightLimit(limit);
  }

  /** Jobs running now (at most `limit`). */
  get inFlight(): number {
    return this.slots.inFlight;
  }

  /** Jobs waiting for one of the running ones to finish. */
  get queued(): number {
    return this.slots.waiting;
  }

  /** Runs `job` once fewer than `limit` run; its slot passes to the next waiter when it settles. */
  async run<T>(job: () => Promise<T>): Promise<T> {
    const release = await this.slots.acquire();
    try {
      return await job();
    } finally {
      release();
    }
  }
}
