import * as path from 'node:path';
import { hrlLogOps } from '../transport/hrl-log-ops';
import type { ApplyingHop } from '../transport/master-target';
import { masterTargetFromConfig } from '../transport/master-target';
import { retentionHooksFromConfig } from '../retention/retention-hooks';
import { processServerFromConfig } from '../transport/process-server';
import { BlockrelayError } from '../retry/blockrelay-error';
import { resolvesWithin } from '../platform/clock';
import { exitNow } from '../platform/exit-now';
import { parseCommandArgs, type Command } from './command';
import { loadConfig, type BlockrelayConfig } from './config';
import { createLogger } from './logger';
import { untilStopSignal } from './stop-signals';

/** How long SIGTERM waits for pending logs before stopping anyway. */
export const SHUTDOWN_DRAIN_TIMEOUT_MS = 60_000;

/**
 * How long the stop after the drain may take: a target on a hung datastore
 * (NFS, a dead LUN) would otherwise keep the process alive after SIGTERM.
 * Everything acknowledged is durable in the spool or inbox already, so
 * ending without a clean stop loses nothing; the next start goes on.
 */
export const SHUTDOWN_STOP_TIMEOUT_MS = 30_000;

/** How long a role whose stop ran out of time lingers for its log lines to go out. */
const EXIT_AFTER_STOP_TIMEOUT_MS = 500;

/**
 * Runs a role until SIGTERM or SIGINT, then drains what it holds within a
 * bound and stops within another. Resolves with the exit status; a stop
 * that runs out of time prints BR_ROLE_STOP_TIMEOUT and ends the process
 * with status 1 without waiting for the I/O still stuck.
 */
export async function runUntilSignalled(
  role: { drain(): Promise<void>; stop(): Promise<void> },
  logger: { info(obj: object, msg: string): void; warn(obj: object, msg: string): void; error(obj: object, msg: string): void },
  options: { drainTimeoutMs?: number; stopTimeoutMs?: number; exit?: (status: number) => void } = {},
): Promise<number> {
  const drainTimeoutMs = options.drainTimeoutMs ?? SHUTDOWN_DRAIN_TIMEOUT_MS;
  const stopTimeoutMs = options.stopTimeoutMs ?? SHUTDOWN_STOP_TIMEOUT_MS;
  const exit = options.exit ?? exitNow;
  const stopSignals = untilStopSignal((s, remaining) => logger.warn({ signal: s, remaining }, 'already draining before exit; repeated signals beyond this end the process at once'), exit);
  const signal = await stopSignals.signal;
  logger.info({ signal }, 'draining before exit');
  const drained = await resolvesWithin(role.drain(), drainTimeoutMs);
  if (!drained) logger.warn({ drainTimeoutMs }, 'drain did not finish in time; pending logs stay spooled for the next start');
  if (!(await resolvesWithin(role.stop(), stopTimeoutMs))) {
    const message = `BR_ROLE_STOP_TIMEOUT: the role did not stop within ${stopTimeoutMs} ms (a target or volume not answering); everything acknowledged is spooled and goes on at the next start`;
    logger.error({ code: 'BR_ROLE_STOP_TIMEOUT', stopTimeoutMs }, message);
    process.stderr.write(`${message}\n`);
    setTimeout(() => exit(1), EXIT_AFTER_STOP_TIMEOUT_MS).unref();
    return 1;
  }
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
