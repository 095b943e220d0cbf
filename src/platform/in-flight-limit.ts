/**
 * A bound on concurrent requests: `acquire()` resolves when fewer than
 * `maxInFlight` slots are taken. Waiters are served in arrival order. The
 * number of waiters is bounded by the callers, each of which waits for a slot
 * before it creates its next request.
 */
export class InFlightLimit {
  private active = 0;
  private readonly waiters: Array<() => void> = [];

  constructor(readonly maxInFlight: number) {
    if (!Number.isInteger(maxInFlight) || maxInFlight < 1) throw new RangeError(`maxInFlight must be a whole number >= 1, got ${maxInFlight}`);
  }

  /** Requests in flight now. */
  get inFlight(): number {
    return this.active;
  }

  /** Callers waiting for a slot. */
  get waiting(): number {
    return this.waiters.length;
  }

  /** Waits for a slot; the returned function gives it back (once). */
  async acquire(): Promise<() => void> {
    if (this.active >= this.maxInFlight) {
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    } else {
      this.active++;
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.waiters.shift();
      // The slot passes straight to the next waiter, so `active` stays put.
      if (next !== undefined) next();
      else this.active--;
    };
  }
}

/**
 * Runs `task` for each item with at most `limit.maxInFlight` in flight across
 * every user of `limit`. Stops starting new tasks after the first failure and
 * rethrows it once all started tasks have settled, so no request is left
 * running behind the caller's back.
 */
export async function runBounded<T>(limit: InFlightLimit, items: Iterable<T>, task: (item: T) => Promise<void>): Promise<void> {
  const running = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  for (const item of items) {
    if (failure !== undefined) break;
    const release = await limit.acquire();
    if (failure !== undefined) {
      release();
      break;
    }
    const p: Promise<void> = task(item)
      .catch((error: unknown) => {
        failure ??= { error };
      })
      .finally(() => {
        release();
        running.delete(p);
      });
    running.add(p);
  }
  await Promise.all(running);
  if (failure !== undefined) throw failure.error;
}
