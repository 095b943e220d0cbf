import { describe, expect, it } from 'vitest';
import { threadCpu, threadGc } from '../../src/transport/hop-worker';

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

  it('counts the calling thread\'s garbage collections from its first call on', async () => {
    const before = threadGc();
    // Some hundred thousand short-lived objects force scavenges.
    let keep: unknown[] = [];
    for (let round = 0; round < 40; round++) keep = Array.from({ length: 20_000 }, (_, i) => ({ i, s: `x${i}` }));
    expect(keep.length).toBe(20_000);
    // Entries arrive on a later turn of the event loop.
    await new Promise((r) => setTimeout(r, 50));
    const after = threadGc();
    expect(after.minorCount).toBeGreaterThan(before.minorCount);
    expect(after.minorMs).toBeGreaterThan(before.minorMs);
    expect(after.majorCount).toBeGreaterThanOrEqual(before.majorCount);
  });
});
