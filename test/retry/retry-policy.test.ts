import { describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { decideRetry, retryOffsetMs, RetryLoop, withRetry } from '../../src/retry/retry-policy';

const MIN = 60_000;
const transient = () => new BlockrelayError('BR_IO', 'disk hiccup');
const fatal = () => new BlockrelayError('BR_CONFIG_INVALID', 'broken');

describe('retry schedule', () => {
  it('retries at 1, 2, 4, 8 and 10 minutes from the first failure, then every 30', () => {
    const offsets = Array.from({ length: 9 }, (_, i) => retryOffsetMs(i) / MIN);
    expect(offsets).toEqual([1, 2, 4, 8, 10, 40, 70, 100, 130]);
  });

  it('never retries a non-recoverable error', () => {
    expect(decideRetry(fatal(), 0, 0, 0)).toEqual({ retry: false, reason: 'not-recoverable' });
    expect(decideRetry(new Error('uncoded'), 0, 0, 0)).toEqual({ retry: false, reason: 'not-recoverable' });
  });

  it('skips slots that a slow attempt overran instead of firing them back to back', () => {
    // Retry #1 ran at 2 min and took until 5 min: the 4-minute slot is gone, next is 8.
    const decision = decideRetry(transient(), 0, 2, 5 * MIN);
    expect(decision).toMatchObject({ retry: true, retryIndex: 3, atMs: 8 * MIN, delayMs: 3 * MIN });
  });

  it('stops after the bounded number of retries', () => {
    const policy = { scheduleOffsetsMs: [1000], steadyIntervalMs: 1000, maxRetries: 3 } as const;
    expect(decideRetry(transient(), 0, 3, 0, policy)).toEqual({ retry: false, reason: 'exhausted' });
  });
});

describe('RetryLoop', () => {
  it('follows the exact schedule over simulated hours', async () => {
    const clock = new SimulatedClock(0);
    const attemptsAt: number[] = [];
    const loop = new RetryLoop(async (attempt) => {
      attemptsAt.push(clock.now());
      if (attempt < 9) throw transient();
      return 'done';
    }, { clock });
    const result = loop.run();
    await clock.runAll();
    await expect(result).resolves.toBe('done');
    expect(attemptsAt.map((t) => t / MIN)).toEqual([0, 1, 2, 4, 8, 10, 40, 70, 100]);
  });

  it('anchors on the first failure even when attempts take time', async () => {
    const clock = new SimulatedClock(0);
    const attemptsAt: number[] = [];
    const loop = new RetryLoop(async (attempt) => {
      attemptsAt.push(clock.now());
      // Each attempt takes 90 s of simulated time before failing.
      await new Promise<void>((resolve) => clock.setTimer(resolve, 90_000));
      if (attempt < 5) throw transient();
      return attempt;
    }, { clock });
    const result = loop.run();
    await clock.runAll();
    await expect(result).resolves.toBe(5);
    // First failure at 1.5 min, so slots are 2.5, 3.5, 5.5, 9.5, 11.5. The attempt at
    // 2.5 fails at 4.0, past the 3.5 slot, which is skipped.
    expect(attemptsAt.map((t) => t / MIN)).toEqual([0, 2.5, 5.5, 9.5, 11.5]);
  });

  it('gives up at once on a non-recoverable error and reports it', async () => {
    const clock = new SimulatedClock(0);
    const events: string[] = [];
    const loop = new RetryLoop(async () => { throw fatal(); }, { clock, onFailure: (e) => events.push(`${e.error.code}@${e.nextAttemptAtMs}`) });
    await expect(loop.run()).rejects.toMatchObject({ code: 'BR_CONFIG_INVALID' });
    expect(events).toEqual(['BR_CONFIG_INVALID@undefined']);
  });

  it('wraps uncoded failures and treats them as not recoverable', async () => {
    const clock = new SimulatedClock(0);
    const { result } = withRetry(async () => { throw new TypeError('bug'); }, { clock });
    await expect(result).rejects.toMatchObject({ code: 'BR_INTERNAL', recoverable: false });
  });

  it('maps ENOSPC from Node to a recoverable disk-full error', async () => {
    const clock = new SimulatedClock(0);
    let calls = 0;
    const { result } = withRetry(async () => {
      calls++;
      if (calls === 1) throw Object.assign(new Error('no space left'), { code: 'ENOSPC' });
      return 'ok';
    }, { clock });
    await clock.runAll();
    await expect(result).resolves.toBe('ok');
    expect(clock.now()).toBe(1 * MIN);
  });

  it('can be cancelled while waiting', async () => {
    const clock = new SimulatedClock(0);
    const { result, cancel } = withRetry(async () => { throw transient(); }, { clock });
    await clock.advance(30_000);
    cancel();
    await expect(result).rejects.toMatchObject({ code: 'BR_RETRY_CANCELLED' });
    expect(clock.pendingTimers()).toBe(0);
  });
});
