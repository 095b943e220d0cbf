/**
 * Time is injected wherever it matters, so tests simulate hours in
 * milliseconds instead of sleeping.
 */
export interface TimerHandle {
  cancel(): void;
}

export interface Clock {
  /** Milliseconds since the Unix epoch. */
  now(): number;
  /** Runs `fn` once after `delayMs`; the handle cancels it. */
  setTimer(fn: () => void, delayMs: number): TimerHandle;
}

/**
 * Whether `work` resolves within `timeoutMs` on `clock`: true when it does,
 * false when it is still pending then (it is left to run, not cancelled).
 * A rejection before the deadline rejects. The timer goes either way.
 */
export async function resolvesWithin(work: Promise<unknown>, timeoutMs: number, clock: Clock = systemClock): Promise<boolean> {
  let timer: TimerHandle | undefined;
  try {
    return await Promise.race([
      work.then(() => true),
      new Promise<boolean>((resolve) => {
        timer = clock.setTimer(() => resolve(false), timeoutMs);
      }),
    ]);
  } finally {
    timer?.cancel();
  }
}

export const systemClock: Clock = {
  now: () => Date.now(),
  setTimer(fn, delayMs) {
    const t = setTimeout(fn, delayMs);
    return { cancel: () => clearTimeout(t) };
  },
};

interface PendingTimer {
  readonly dueMs: number;
  readonly seq: number;
  readonly fn: () => void;
  cancelled: boolean;
}

/**
 * A clock that moves only when told to. `advance()` fires due timers in due
 * order (ties in creation order), letting promise callbacks settle between
 * them so async code driven by timers behaves as it would in real time.
 */
export class SimulatedClock implements Clock {
  private nowMs: number;
  private seq = 0;
  private timers: PendingTimer[] = [];

  constructor(startMs = Date.UTC(2026, 0, 1)) {
    this.nowMs = startMs;
  }

  now(): number {
    return this.nowMs;
  }

  setTimer(fn: () => void, delayMs: number): TimerHandle {
    const timer: PendingTimer = { dueMs: this.nowMs + Math.max(0, delayMs), seq: this.seq++, fn, cancelled: false };
    this.timers.push(timer);
    return { cancel: () => { timer.cancelled = true; } };
  }

  /** Number of timers not yet fired or cancelled. */
  pendingTimers(): number {
    return this.timers.filter((t) => !t.cancelled).length;
  }

  /** Moves time forward by `ms`, firing every timer that falls due. */
  async advance(ms: number): Promise<void> {
    const endMs = this.nowMs + ms;
    for (;;) {
      await settle();
      const next = this.nextDue();
      if (next === undefined || next.dueMs > endMs) break;
      this.timers = this.timers.filter((t) => t !== next);
      this.nowMs = next.dueMs;
      next.fn();
    }
    this.nowMs = endMs;
    await settle();
  }

  /** Fires timers one after another until none is left (or `maxTimers` fired). */
  async runAll(maxTimers = 10_000): Promise<void> {
    for (let i = 0; i < maxTimers; i++) {
      await settle();
      const next = this.nextDue();
      if (next === undefined) return;
      await this.advance(next.dueMs - this.nowMs);
    }
    throw new Error(`SimulatedClock.runAll: more than ${maxTimers} timers fired`);
  }

  private nextDue(): PendingTimer | undefined {
    this.timers = this.timers.filter((t) => !t.cancelled);
    let best: PendingTimer | undefined;
    for (const t of this.timers) {
      if (best === undefined || t.dueMs < best.dueMs || (t.dueMs === best.dueMs && t.seq < best.seq)) best = t;
    }
    return best;
  }
}

/** Lets queued promise callbacks and I/O callbacks run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}
