import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/daemon/logger';
import { HOP_WORKER_INITIAL_OLD_SPACE_MB, HopWorker } from '../../src/transport/hop-worker';
import { useTempDirs } from '../helpers/tmp';
import { HEAP_PROBE_ARRAYS } from './hop-worker-heap-probe';
import { SECRET } from './transport-fixture';

const run = promisify(execFile);

/**
 * Hop workers get a larger initial old generation through
 * v8.setFlagsFromString before they start (hop-worker.ts): Node documents
 * flag changes after start as unpredictable, so this checks a worker really
 * starts with it. The heap probe keeps 160 MiB live: at V8's defaults that
 * takes major collections (checked in a fresh node process, where no flag
 * was set), in a hop worker none.
 */
describe('a hop worker\'s heap', () => {
  const tmp = useTempDirs();
  const stops: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const s of stops.splice(0)) await s();
  });

  it(`starts with ${HOP_WORKER_INITIAL_OLD_SPACE_MB} MiB of old generation: the probe's live data needs no major collection there`, async () => {
    expect(HEAP_PROBE_ARRAYS).toBeLessThan(HOP_WORKER_INITIAL_OLD_SPACE_MB * 0.75);
    const control = `
      const { PerformanceObserver, constants } = require('node:perf_hooks');
      let majors = 0;
      new PerformanceObserver((l) => { for (const e of l.getEntries()) if (e.detail.kind === constants.NODE_PERFORMANCE_GC_MAJOR) majors++; }).observe({ entryTypes: ['gc'] });
      const probe = require(${JSON.stringify(path.join(__dirname, 'hop-worker-heap-probe.ts'))});
      const kept = probe.heapProbe(probe.HEAP_PROBE_ARRAYS);
      setTimeout(() => process.stdout.write(JSON.stringify({ majors, arrays: kept.length })), 50);`;
    const atDefaults = JSON.parse((await run(process.execPath, ['--import', 'tsx', '-e', control])).stdout) as { majors: number; arrays: number };
    expect(atDefaults.arrays).toBe(HEAP_PROBE_ARRAYS);
    expect(atDefaults.majors, 'at V8\'s defaults the probe takes major collections (else it tells nothing)').toBeGreaterThanOrEqual(1);

    const dir = tmp();
    const worker = new HopWorker({
      entry: path.join(__dirname, 'hop-worker-heap-entry.ts'),
      init: { config: { stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 't.img')}` }] } },
      logger: silentLogger(),
      name: 'master-target',
    });
    stops.push(() => worker.stop());
    await worker.start();
    await new Promise((r) => setTimeout(r, 50));
    const gc = await worker.threadGc();
    expect(gc?.majorCount, 'major collections in the hop worker while the probe filled its heap').toBe(0);
    // Filling 160 MiB took the worker's thread CPU time, which it reports from its own /proc stat line.
    const cpu = await worker.threadCpu();
    if (process.platform === 'linux') expect(cpu!.userMs + cpu!.systemMs).toBeGreaterThan(0);
  });
});
