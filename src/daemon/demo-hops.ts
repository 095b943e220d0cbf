import * as path from 'node:path';
import { systemClock, type Clock } from '../platform/clock';
import { RetentionHooks } from '../retention/retention-hooks';
import { hrlLogOps } from '../transport/hrl-log-ops';
import { serveHopInWorker } from '../transport/hop-worker';
import type { LogStageSink } from '../transport/log-stage-events';
import { masterTargetFromConfig, type ApplyingHop } from '../transport/master-target';
import { processServerFromConfig } from '../transport/process-server';
import { validateConfig } from './config';
import { createLogger, silentLogger, type Logger } from './logger';
import { createMetrics, type Metrics } from './metrics';

/**
 * The demo's process server and master target, built from plain data so the
 * same code builds them in the demo's main thread or in a worker thread of
 * their own (src/transport/hop-worker.ts).
 */
export type DemoHopInit =
  | { readonly role: 'master-target'; readonly config: Record<string, unknown>; readonly retentionDir: string; readonly logLevel: string }
  | { readonly role: 'process-server'; readonly config: Record<string, unknown>; readonly logLevel: string; readonly cutThrough?: boolean };

export interface DemoHopContext {
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly clock: Clock;
  readonly onStage?: LogStageSink | undefined;
}

export function buildDemoHop(init: DemoHopInit, context: DemoHopContext): ApplyingHop {
  const config = validateConfig(init.config);
  const extra = { logger: context.logger, metrics: context.metrics, clock: context.clock, ...(context.onStage ? { onStage: context.onStage } : {}) };
  if (init.role === 'process-server') return processServerFromConfig(config, hrlLogOps, extra, { cutThrough: init.cutThrough === true });
  // The demo keeps every role on one volume; a production master target
  // refuses a retention volume shared with its state (retentionHooksFromConfig).
  const hooks = new RetentionHooks({ dir: init.retentionDir, windowHours: config.retention!.windowHours, stateDir: config.stateDir, inboxDir: path.join(config.stateDir, 'inbox') });
  return masterTargetFromConfig(config, hrlLogOps, { ...extra, hooks });
}

/** This module is also the worker entry of the demo's hops. */
export const DEMO_HOP_WORKER_ENTRY = __filename;

serveHopInWorker((raw, onStage) => {
  const init = raw as DemoHopInit;
  const logger = init.logLevel === 'silent' ? silentLogger() : createLogger({ level: init.logLevel, name: init.role });
  // Process-wide metrics (CPU, heap) come from the main thread's registry.
  return buildDemoHop(init, { logger, metrics: createMetrics({ defaultMetrics: false }), clock: systemClock, onStage });
});
