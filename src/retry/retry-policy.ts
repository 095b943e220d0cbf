import type { Clock, TimerHandle } from '../platform/clock';
import { BlockrelayError, wrapError } from './blockrelay-error';
import type { ErrorCode } from './error-codes';

/**
 * When recoverable errors are retried, counted from the first failure:
 * 1, 2, 4, 8 and 10 minutes, then every 30 minutes for as long as the error
 * persists (40, 70, 100 … minutes). The schedule is anchored on the first
 * failure, not on each attempt, so a slow attempt does not stretch it.
 */
export interface RetryPolicy {
  /** Offsets of the first retries from the first failure. */
  readonly scheduleOffsetsMs: readonly number[];
  /** Interval between retries after the fixed offsets. */
  readonly steadyIntervalMs: number;
  /** Retries after which the loop gives up. */
  readonly maxRetries: number;
}

export const RETRY_POLICY_DEFAULTS: RetryPolicy = {
  scheduleOffsetsMs: [1, 2, 4, 8, 10].map((m) => m * 60_000),
  steadyIntervalMs: 30 * 60_000,
  /**
   * A bound on attempts so no loop runs forever unobserved: 1,000 steady
   * retries is three weeks of trying, after which the disk goes Critical.
   */
  maxRetries: 1_000,
};

/**
 * Offset from the first failure of retry number `retryIndex` (0-based).
 * Pure; the heart of the policy.
 */
export function retryOffsetMs(retryIndex: number, policy: RetryPolicy = RETRY_POLICY_DEFAULTS): number {
  if (!Number.isInteger(retryIndex) || retryIndex < 0) throw new RangeError(`retryIndex must be a whole number, got ${retryIndex}`);
  const fixed = policy.scheduleOffsetsMs;
  if (retryIndex < fixed.length) return fixed[retryIndex]!;
  const last = fixed[fixed.length - 1] ?? 0;
  return last + (retryIndex - fixed.length + 1) * policy.steadyIntervalMs;
}

/**
 * The decision after a failed attempt, as a pure function of the error, the
 * time of the first failure, how many retries already ran, and now.
 *
 * Non-recoverable errors never retry. A recoverable one retries at the first
 * slot of the schedule that is still ahead of `nowMs`; slots an attempt
 * overran are skipped rather than fired back to back.
 */
export type RetryDecision =
  | { readonly retry: true; readonly retryIndex: number; readonly atMs: number; readonly delayMs: number }
  | { readonly retry: false; readonly reason: 'not-recoverable' | 'exhausted' };

export function decideRetry(
  err: unknown,
  firstFailureMs: number,
  retriesDone: number,
  nowMs: number,
  policy: RetryPolicy = RETRY_POLICY_DEFAULTS,
): RetryDecision {
  if (!isRecoverable(err)) return { retry: false, reason: 'not-recoverable' };
  let index = retriesDone;
  while (index < policy.maxRetries && firstFailureMs + retryOffsetMs(index, policy) <= nowMs) index++;
  if (index >= policy.maxRetries) return { retry: false, reason: 'exhausted' };
  const atMs = firstFailureMs + retryOffsetMs(index, policy);
  return { retry: true, retryIndex: index, atMs, delayMs: atMs - nowMs };
}

/** Only coded recoverable errors are retried; anything uncoded is a defect, not a transient. */
export function isRecoverable(err: unknown): boolean {
  return err instanceof BlockrelayError && err.recoverable;
}

/** What the loop reports after each failed attempt (for health, metrics and logs). */
export interface RetryEvent {
  readonly error: BlockrelayError;
  readonly attempt: number;
  readonly firstFailureMs: number;
  readonly nextAttemptAtMs: number | undefined;
}

export interface RetryLoopOptions {
  readonly clock: Clock;
  readonly policy?: RetryPolicy;
  /** Called after every failed attempt, before waiting. */
  readonly onFailure?: (event: RetryEvent) => void;
  /** The code used to wrap uncoded errors thrown by the operation. */
  readonly fallbackCode?: ErrorCode;
}

/**
 * Runs `operation` until it succeeds, waiting between attempts as the policy
 * says. Resolves with the operation's result; rejects with the last error when
 * it is not recoverable, when retries are exhausted, or with
 * BR_RETRY_CANCELLED when `cancel()` is called while waiting.
 */
export class RetryLoop<T> {
  private cancelled = false;
  private timer: TimerHandle | undefined;
  private wake: ((value: void) => void) | undefined;

  constructor(
    private readonly operation: (attempt: number) => Promise<T>,
    private readonly options: RetryLoopOptions,
  ) {}

  async run(): Promise<T> {
    const { clock } = this.options;
    const policy = this.options.policy ?? RETRY_POLICY_DEFAULTS;
    let firstFailureMs: number | undefined;
    let retriesDone = 0;
    for (let attempt = 1; ; attempt++) {
      if (this.cancelled) throw new BlockrelayError('BR_RETRY_CANCELLED', 'retry loop cancelled');
      try {
        return await this.operation(attempt);
      } catch (raw) {
        const error = wrapError(raw, this.options.fallbackCode ?? 'BR_INTERNAL', 'operation failed');
        const nowMs = clock.now();
        firstFailureMs ??= nowMs;
        const decision = decideRetry(error, firstFailureMs, retriesDone, nowMs, policy);
        this.options.onFailure?.({ error, attempt, firstFailureMs, nextAttemptAtMs: decision.retry ? decision.atMs : undefined });
        if (!decision.retry) throw error;
        retriesDone = decision.retryIndex + 1;
        await this.sleep(decision.delayMs);
      }
    }
  }

  /** Stops the loop; a pending wait ends at once with BR_RETRY_CANCELLED. */
  cancel(): void {
    this.cancelled = true;
    this.timer?.cancel();
    this.wake?.();
  }

  private sleep(delayMs: number): Promise<void> {
    return new Promise<void>((resolve) => {
      this.wake = resolve;
      this.timer = this.options.clock.setTimer(resolve, delayMs);
    }).finally(() => {
      this.wake = undefined;
      this.timer = undefined;
    });
  }
}

/** Convenience: run `operation` under the policy with a new loop. */
export function withRetry<T>(operation: (attempt: number) => Promise<T>, options: RetryLoopOptions): { result: Promise<T>; cancel: () => void } {
  const loop = new RetryLoop(operation, options);
  return { result: loop.run(), cancel: () => loop.cancel() };
}
