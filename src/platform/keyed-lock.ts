/**
 * Serialises async work per key (one disk's uploads, one disk's applies)
 * while different keys run concurrently. Waiters are bounded so a stuck
 * holder cannot pile up unbounded work behind it.
 */
export class KeyedLock {
  private readonly tails = new Map<string, { promise: Promise<void>; waiters: number }>();

  constructor(private readonly maxWaitersPerKey = 64) {}

  async run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prior = this.tails.get(key);
    if (prior !== undefined && prior.waiters >= this.maxWaitersPerKey) {
      throw new Error(`KeyedLock: more than ${this.maxWaitersPerKey} waiters for '${key}'`);
    }
    let release!: () => void;
    const mine = new Promise<void>((resolve) => { release = resolve; });
    const entry = { promise: mine, waiters: (prior?.waiters ?? 0) + 1 };
    this.tails.set(key, entry);
    try {
      await prior?.promise;
      return await fn();
    } finally {
      release();
      entry.waiters--;
      if (this.tails.get(key) === entry) this.tails.delete(key);
    }
  }
}
