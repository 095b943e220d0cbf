import { describe, expect, it } from 'vitest';
import { threadCpu } from '../../src/transport/hop-worker';

describe('thread CPU of a hop', () => {
  it('counts the calling thread\'s own CPU time, and only its own (Linux)', async () => {
    if (process.platform !== 'linux') {
      expect(threadCpu()).toBeUndefined();
      return;
    }
    const before = threadCpu()!;
    // Sleeping costs this thread nothing.
    await new Promise((r) => setTimeout(r, 300));
    const slept = threadCpu()!;
    expect(slept.userMs + slept.systemMs - before.userMs - before.systemMs).toBeLessThan(150);
    // Spinning costs it CPU: the figure grows while this thread spins (bounded in wall time: the machine may be busy).
    const deadline = Date.now() + 10_000;
    let x = 0;
    let spun = threadCpu()!;
    while (Date.now() < deadline && spun.userMs + spun.systemMs - slept.userMs - slept.systemMs < 200) {
      for (let i = 0; i < 100_000; i++) x += Math.sqrt(x + i);
      spun = threadCpu()!;
    }
    expect(x).toBeGreaterThan(0);
    expect(spun.userMs + spun.systemMs - slept.userMs - slept.systemMs).toBeGreaterThanOrEqual(200);
  });
});
