import type { Command } from './command';
import { resyncCommand } from '../resync/resync-command';
import { hrlCommands } from '../tracking/hrl-commands';
import { convertCommand } from '../targets/convert-command';
import { roleCommands } from './role-commands';
import { retentionCommands } from '../retention/retention-commands';
import { statusCommand } from './status-command';
import { tagCommand } from './tag-command';
import { demoCommand } from './demo-command';
import { sourceCommand } from '../tap/source-command';

/**
 * Every subcommand, in the order `--help` lists them. Each domain exports its
 * commands from its own folder; this list only gathers them.
 */
export function allCommands(): Command[] {
  return [convertCommand, resyncCommand, ...hrlCommands(), ...roleCommands(), ...retentionCommands(), sourceCommand, statusCommand, tagCommand, demoCommand];
}
