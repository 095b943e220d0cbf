import type { Command } from './command';
import { resyncCommand } from '../resync/resync-command';

/**
 * Every subcommand, in the order `--help` lists them. Each domain exports its
 * commands from its own folder; this list only gathers them.
 */
export function allCommands(): Command[] {
  return [resyncCommand];
}
