import { describe, expect, it } from 'vitest';
import { InFlightLimit, runBounded } from '../../src/platform/in-flight-limit';

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('in-flight request bound', () => {
  it('never runs more than the limit at once, across callers', async () => {
    const limit = new InFlightLimit(3);
    let active = 0;
    let most = 0;
    const task = async (): Promise<void> => {
      active++;
      most = Math.max(most, active);
      for (let i = 0; i < 3; i++) await tick();
      active--;
    };
    await Promise.all([runBounded(limit, Array.from({ length: 20 }), task), runBounded(limit, Array.from({ length: 20 }), task)]);
    expect(most).toBe(3);
    expect(limit.inFlight).toBe(0);
  });

  it('starts nothing after a failure and rethrows it once started tasks settle', async () => {
    const limit = new InFlightLimit(2);
    const started: number[] = [];
    let settled = 0;
    const run = runBounded(limit, [0, 1, 2, 3, 4, 5], async (i) => {
      started.push(i);
      await tick();
      settled++;
      if (i === 1) throw new Error('boom');
    });
    await expect(run).rejects.toThrow('boom');
    expect(started.length).toBeLessThanOrEqual(3);
    expect(settled).toBe(started.length);
    expect(limit.inFlight).toBe(0);
  });

  it('refuses a limit below one', () => {
    expect(() => new InFlightLimit(0)).toThrow(RangeError);
  });
});
