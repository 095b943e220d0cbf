import { describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';

describe('SimulatedClock', () => {
  it('fires timers in due order as time advances', async () => {
    const clock = new SimulatedClock(0);
    const fired: string[] = [];
    clock.setTimer(() => fired.push('b'), 200);
    clock.setTimer(() => fired.push('a'), 100);
    const c = clock.setTimer(() => fired.push('c'), 150);
    c.cancel();
    await clock.advance(150);
    expect(fired).toEqual(['a']);
    expect(clock.now()).toBe(150);
    await clock.advance(100);
    expect(fired).toEqual(['a', 'b']);
    expect(clock.pendingTimers()).toBe(0);
  });

  it('lets async code scheduled by a timer set further timers', async () => {
    const clock = new SimulatedClock(0);
    const times: number[] = [];
    const tick = async (): Promise<void> => {
      times.push(clock.now());
      await Promise.resolve();
      if (times.length < 3) clock.setTimer(() => void tick(), 1000);
    };
    clock.setTimer(() => void tick(), 1000);
    await clock.runAll();
    expect(times).toEqual([1000, 2000, 3000]);
  });
});
