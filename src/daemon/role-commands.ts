import * as path from 'node:path';
import { hrlLogOps } from '../transport/hrl-log-ops';
import type { ApplyingHop } from '../transport/master-target';
import { masterTargetFromConfig } from '../transport/master-target';
import { retentionHooksFromConfig } from '../retention/retention-hooks';
import { processServerFromConfig } from '../transport/process-server';
import { BlockrelayError } from '../retry/blockrelay-error';
import { resolvesWithin } from '../platform/clock';
import { parseCommandArgs, type Command } from './command';
import { loadConfig, type BlockrelayConfig } from './config';
import { createLogger } from './logger';

/** How long SIGTERM waits for pending logs before stopping anyway. */
export const SHUTDOWN_DRAIN_TIMEOUT_MS = 60_000;

/**
 * Runs a role until SIGTERM or SIGINT, then drains what it holds within a
 * bound and stops. Resolves with the exit status.
 */
export async function runUntilSignalled(role: { drain(): Promise<void>; stop(): Promise<void> }, logger: { info(obj: object, msg: string): void; warn(obj: object, msg: string): void }, drainTimeoutMs = SHUTDOWN_DRAIN_TIMEOUT_MS): Promise<number> {
  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
  });
  logger.info({ signal }, 'draining before exit');
  const drained = await resolvesWithin(role.drain(), drainTimeoutMs);
  if (!drained) logger.warn({ drainTimeoutMs }, 'drain did not finish in time; pending logs stay spooled for the next start');
  await role.stop();
  logger.info({}, 'stopped');
  return 0;
}

function roleCommand(name: 'process-server' | 'master-target', summary: string, build: (config: BlockrelayConfig) => ApplyingHop): Command {
  const usage = `${name} --config FILE`;
  return {
    path: [name],
    usage,
    summary,
    async run(argv) {
      const { values } = parseCommandArgs(argv, { config: { type: 'string' } }, usage);
      if (values.config === undefined) throw new BlockrelayError('BR_USAGE', `--config is required; usage: ${usage}`);
      const config = loadConfig(values.config);
      const logger = createLogger({ level: config.log.level, name });
      const hop = build(config);
      await hop.start();
      process.stderr.write(`${name} listening on ${hop.url}\n`);
      return runUntilSignalled(hop, logger);
    },
  };
}

export function roleCommands(): Command[] {
  return [
    roleCommand('process-server', 'receive, verify and spool sealed logs; forward them to a master target or apply them to page blobs', (config) =>
      processServerFromConfig(config, hrlLogOps, {
        logger: createLogger({ level: config.log.level, name: 'process-server' }),
        // Azure side, applying to page blobs: with retention configured, points are blob snapshots.
        hooks: config.disks.length > 0 ? retentionHooksFromConfig(config, { inboxDir: config.cache?.dir ?? path.join(config.stateDir, 'cache') }) : undefined,
      }),
    ),
    roleCommand('master-target', 'receive sealed logs and apply each exactly once, in order, to the disk targets', (config) =>
      masterTargetFromConfig(config, hrlLogOps, { logger: createLogger({ level: config.log.level, name: 'master-target' }), hooks: retentionHooksFromConfig(config) }),
    ),
  ];
}
