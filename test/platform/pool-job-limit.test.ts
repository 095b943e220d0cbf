import { describe, expect, it } from 'vitest';
import { PoolJobLimit, TARGET_POOL_JOBS } from '../../src/platform/pool-job-limit';

/** A job that runs until `release()` is called. */
function gatedJob(): { job: () => Promise<number>; release: (value: number) => void; started: () => boolean } {
  let release!: (value: number) => void;
  let started = false;
  const done = new Promise<number>((r) => { release = r; });
  return { job: () => { started = true; return done; }, release, started: () => started };
}

describe('PoolJobLimit', () => {
  it('runs at most `limit` jobs at once and starts the waiters in order as slots free', async () => {
    const limit = new PoolJobLimit(2);
    const jobs = Array.from({ length: 5 }, () => gatedJob());
    const results = jobs.map((j) => limit.run(j.job));
    await new Promise((r) => setImmediate(r));
    expect(jobs.map((j) => j.started())).toEqual([true, true, false, false, false]);
    expect({ inFlight: limit.inFlight, queued: limit.queued }).toEqual({ inFlight: 2, queued: 3 });
    jobs[1]!.release(1);
    await new Promise((r) => setImmediate(r));
    expect(jobs.map((j) => j.started())).toEqual([true, true, true, false, false]);
    for (const [i, j] of jobs.entries()) j.release(i);
    expect(await Promise.all(results)).toEqual([0, 1, 2, 3, 4]);
    expect({ inFlight: limit.inFlight, queued: limit.queued }).toEqual({ inFlight: 0, queued: 0 });
  });

  it('frees the slot of a failed job', async () => {
    const limit = new PoolJobLimit(1);
    await expect(limit.run(async () => { throw new Error('EIO'); })).rejects.toThrow('EIO');
    expect(await limit.run(async () => 7)).toBe(7);
    expect(limit.inFlight).toBe(0);
  });

  it('refuses a limit outside 1..1024 and defaults to TARGET_POOL_JOBS', () => {
    for (const bad of [0, -1, 1.5, 1025, Number.NaN]) expect(() => new PoolJobLimit(bad)).toThrow(expect.objectContaining({ code: 'BR_USAGE' }));
    expect(new PoolJobLimit().limit).toBe(TARGET_POOL_JOBS);
  });
});
