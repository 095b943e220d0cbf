import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { cpuTimeFromProcStat } from '../../src/platform/cpu-time';
import { useTempDirs } from '../helpers/tmp';

describe('cpuTimeFromProcStat', () => {
  const tmp = useTempDirs();

  it('reads utime and stime after a command name holding spaces and parentheses, in ticks of getconf CLK_TCK', () => {
    if (process.platform !== 'linux') return;
    const file = path.join(tmp(), 'stat');
    // Fields 14 and 15 (utime, stime) are 250 and 30 ticks; the name is "a) (b c".
    fs.writeFileSync(file, '4242 (a) (b c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 3 0 500 1000 200 18446744073709551615\n');
    const tickMs = 1000 / Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
    expect(cpuTimeFromProcStat(file)).toEqual({ userMs: 250 * tickMs, systemMs: 30 * tickMs });
  });

  it('reads this process\'s own figure, and says nothing for a file that is missing or not a stat line', () => {
    if (process.platform !== 'linux') return;
    const own = cpuTimeFromProcStat(`/proc/${process.pid}/stat`);
    expect(own!.userMs + own!.systemMs).toBeGreaterThan(0);
    expect(cpuTimeFromProcStat(path.join(tmp(), 'missing'))).toBeUndefined();
    const junk = path.join(tmp(), 'junk');
    fs.writeFileSync(junk, 'no fields here');
    expect(cpuTimeFromProcStat(junk)).toBeUndefined();
  });
});
