import { exitNow } from '../platform/exit-now';

/** Signals after the first that are only told; the next one ends the process at once. */
export const STOP_SIGNALS_TOLD = 2;

/** Exit status when repeated signals end the process before its stop finished (128 + SIGINT). */
export const STOP_SIGNALS_FORCED_STATUS = 130;

export interface StopSignals {
  /** The first SIGTERM or SIGINT. */
  readonly signal: Promise<NodeJS.Signals>;
  /** Removes the handlers (a command that returns to a caller, and tests). */
  release(): void;
}

/**
 * Waits for SIGTERM or SIGINT, and keeps handling both while the command
 * stops (drains, seals its logs).
 *
 * With `process.once`, the second signal took the default action and killed
 * the process in the middle of its drain: a second Ctrl-C does that, and so
 * does a single one under `npm start`, where the terminal's SIGINT reaches
 * the process from its group and again from npm, which forwards it. Here
 * the first signal starts the stop; the next {@link STOP_SIGNALS_TOLD} are
 * answered with `onRepeat` (say what is still going on); one more ends the
 * process at once with status 130, as an operator who insists expects.
 * That is safe: everything acknowledged is durable before it is
 * acknowledged, and a restart finishes what the stop left (as after
 * SIGKILL).
 */
export function untilStopSignal(onRepeat: (signal: NodeJS.Signals, remaining: number) => void, exit: (status: number) => void = exitNow): StopSignals {
  let first: ((signal: NodeJS.Signals) => void) | undefined;
  const signal = new Promise<NodeJS.Signals>((resolve) => {
    first = resolve;
  });
  let seen = 0;
  const handler = (s: NodeJS.Signals): void => {
    seen++;
    if (seen === 1) first!(s);
    else if (seen <= 1 + STOP_SIGNALS_TOLD) onRepeat(s, 2 + STOP_SIGNALS_TOLD - seen);
    else exit(STOP_SIGNALS_FORCED_STATUS);
  };
  process.on('SIGTERM', handler);
  process.on('SIGINT', handler);
  return {
    signal,
    release: () => {
      process.removeListener('SIGTERM', handler);
      process.removeListener('SIGINT', handler);
    },
  };
}

/** The usual `onRepeat`: one line on stderr. */
export function tellStopping(stderr: NodeJS.WritableStream, what: string): (signal: NodeJS.Signals, remaining: number) => void {
  return (signal, remaining) => {
    stderr.write(`${signal}: already ${what}; ${remaining === 1 ? 'one more signal ends the process now' : `${remaining} more signals end the process now`} (a restart finishes the rest)\n`);
  };
}
