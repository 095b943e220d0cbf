#!/usr/bin/env node
// First: sizes libuv's thread pool before anything can start it (see thread-pool.ts).
import './thread-pool';
import { allCommands } from './commands';
import type { Command, CommandIo } from './command';
import { isBlockrelayError } from '../retry/blockrelay-error';

const VERSION = '0.1.0';

function helpText(commands: Command[]): string {
  const lines = [
    `blockrelay ${VERSION}: replication data plane for disaster recovery`,
    '',
    'Usage:',
    ...commands.map((c) => `  blockrelay ${c.usage}\n      ${c.summary}`),
    '',
    'Disk specs: raw:PATH  vmdk:PATH  vmdk-flat:PATH  vhd:PATH  blob:URL  nbd://HOST:PORT/EXPORT',
    'Exit status 0 on success; on failure one line "BR_CODE: message" on stderr.',
  ];
  return `${lines.join('\n')}\n`;
}

/** Picks the command whose path is the longest prefix of argv. */
function findCommand(commands: Command[], argv: string[]): { command: Command; rest: string[] } | undefined {
  let best: Command | undefined;
  for (const c of commands) {
    if (c.path.every((word, i) => argv[i] === word) && (best === undefined || c.path.length > best.path.length)) best = c;
  }
  return best === undefined ? undefined : { command: best, rest: argv.slice(best.path.length) };
}

export async function main(argv: string[], io: CommandIo = { stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  const commands = allCommands();
  if (argv.length === 0 || argv[0] === '--help' || argv[0] === '-h' || argv[0] === 'help') {
    io.stdout.write(helpText(commands));
    return 0;
  }
  if (argv[0] === '--version') {
    io.stdout.write(`${VERSION}\n`);
    return 0;
  }
  const found = findCommand(commands, argv);
  if (found === undefined) {
    io.stderr.write(`BR_USAGE: unknown command '${argv.join(' ')}'; see blockrelay --help\n`);
    return 2;
  }
  if (found.rest.includes('--help') || found.rest.includes('-h')) {
    io.stdout.write(`Usage: blockrelay ${found.command.usage}\n  ${found.command.summary}\n`);
    return 0;
  }
  try {
    return await found.command.run(found.rest, io);
  } catch (err) {
    if (isBlockrelayError(err)) {
      io.stderr.write(`${err.toLine()}\n`);
      return err.code === 'BR_USAGE' ? 2 : 1;
    }
    io.stderr.write(`BR_INTERNAL: ${(err as Error)?.stack ?? String(err)}\n`);
    return 1;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (status) => { process.exitCode = status; },
    (err) => {
      process.stderr.write(`BR_INTERNAL: ${(err as Error)?.stack ?? String(err)}\n`);
      process.exitCode = 1;
    },
  );
}
