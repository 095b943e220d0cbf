import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';

/** CPU time a process or thread has used, in ms. */
export interface CpuTime {
  readonly userMs: number;
  readonly systemMs: number;
}

let clockTickMs: number | undefined;

/**
 * Length of the clock tick /proc counts CPU time in (USER_HZ, `getconf
 * CLK_TCK`; 100 per second on every Linux port today), asked once.
 */
function tickMs(): number {
  if (clockTickMs === undefined) {
    let hz = 100;
    try {
      hz = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      // No getconf: the value every Linux port uses.
    }
    clockTickMs = 1000 / hz;
  }
  return clockTickMs;
}

/**
 * The CPU time in a Linux `stat` file of /proc: `/proc/PID/stat` for a
 * process (all its threads), `/proc/thread-self/stat` for the calling
 * thread. Undefined where the file cannot be read (not Linux, the process
 * is gone) or does not parse.
 */
export function cpuTimeFromProcStat(statFile: string): CpuTime | undefined {
  let stat: string;
  try {
    stat = fs.readFileSync(statFile, 'utf8');
  } catch {
    return undefined;
  }
  // Fields after "pid (comm) " (the command name may hold spaces and
  // parentheses): state is field 3, utime 14 and stime 15.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const user = Number(fields[11]);
  const system = Number(fields[12]);
  if (!Number.isFinite(user) || !Number.isFinite(system)) return undefined;
  const tick = tickMs();
  return { userMs: user * tick, systemMs: system * tick };
}
