import { validateConfig } from '../../src/daemon/config';
import { silentLogger } from '../../src/daemon/logger';
import { createMetrics } from '../../src/daemon/metrics';
import { systemClock } from '../../src/platform/clock';
import { serveHopInWorker } from '../../src/transport/hop-worker';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { masterTargetFromConfig } from '../../src/transport/master-target';
import { HEAP_PROBE_ARRAYS, heapProbe } from './hop-worker-heap-probe';

/** Held for the worker's life: the probe's arrays must stay live in the old generation. */
export const held: unknown[] = [];

/**
 * A hop worker entry for hop-worker-heap.test.ts: builds a real master
 * target, after filling its thread's old generation with the heap probe
 * (threadGc counts from just before the build).
 */
serveHopInWorker((raw, onStage) => {
  held.push(heapProbe(HEAP_PROBE_ARRAYS));
  const init = raw as { config: Record<string, unknown> };
  return masterTargetFromConfig(validateConfig(init.config), hrlLogOps, { logger: silentLogger(), metrics: createMetrics({ defaultMetrics: false }), clock: systemClock, onStage });
});
