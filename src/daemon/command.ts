import { parseArgs, type ParseArgsConfig } from 'node:util';
import { BlockrelayError } from '../retry/blockrelay-error';

/** Where a command writes: `--json` documents to stdout, human text to stderr. */
export interface CommandIo {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
}

/** One `blockrelay` subcommand. `path` is e.g. ['hrl', 'inspect']. */
export interface Command {
  readonly path: readonly string[];
  readonly usage: string;
  readonly summary: string;
  /** Returns the exit status; throws BlockrelayError for coded failures. */
  run(argv: string[], io: CommandIo): Promise<number>;
}

type Options = NonNullable<ParseArgsConfig['options']>;

/**
 * node:util parseArgs with blockrelay's conventions: unknown flags and missing
 * values become BR_USAGE errors naming the flag and the command's usage line.
 */
export function parseCommandArgs<O extends Options>(argv: string[], options: O, usage: string) {
  try {
    return parseArgs({ args: argv, options, allowPositionals: true, strict: true });
  } catch (err) {
    throw new BlockrelayError('BR_USAGE', `${(err as Error).message}; usage: ${usage}`, { cause: err });
  }
}

/** Parses a non-negative integer option, refusing anything else with BR_USAGE. */
export function parseIntegerOption(name: string, value: string | undefined, fallback: number, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (value === undefined) return fallback;
  if (!/^\d+$/.test(value)) throw new BlockrelayError('BR_USAGE', `--${name} expects a whole number, got '${value}'`);
  const n = Number(value);
  if (n < min || n > max) throw new BlockrelayError('BR_USAGE', `--${name} must be between ${min} and ${max}, got ${n}`);
  return n;
}

/** Writes one JSON document, the only thing a `--json` command puts on stdout. */
export function writeJson(io: CommandIo, value: unknown): void {
  io.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}
