import * as fs from 'node:fs';
import * as path from 'node:path';
import { silentLogger } from '../../src/daemon/logger';
import { createMetrics } from '../../src/daemon/metrics';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { hashFile } from '../../src/transport/log-spool';
import type { LogEnvelope } from '../../src/transport/transport-protocol';

export const SECRET = 'test-secret-0123456789';
export const DISK_SIZE = 8 * 1024 * 1024;

export { prng } from '../helpers/prng';

export interface WrittenLog {
  file: string;
  envelope: LogEnvelope;
}

/**
 * Writes a sealed log of `writes` random 4 KiB-aligned writes, applying the
 * same writes to `model` (the expected disk content).
 */
export async function makeLog(dir: string, diskId: string, seq: number, model: Buffer, rand: () => number, writes = 20): Promise<WrittenLog> {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${diskId}-${String(seq).padStart(6, '0')}.hrl`);
  const writer = await HrlWriter.create(file);
  for (let i = 0; i < writes; i++) {
    const blocks = 1 + Math.floor(rand() * 8);
    const offset = Math.floor(rand() * (model.length / 4096 - blocks)) * 4096;
    const data = Buffer.alloc(blocks * 4096);
    for (let j = 0; j < data.length; j += 4) data.writeUInt32LE(Math.floor(rand() * 2 ** 32), j);
    await writer.append(offset, data);
    data.copy(model, offset);
  }
  await writer.seal();
  await writer.close();
  const { xxhash64, sizeBytes } = await hashFile(file);
  return {
    file,
    envelope: { diskId, seq, xxhash64, logLength: sizeBytes, cutTimeMs: Date.now(), cutId: `cut-${seq}`, group: undefined, appTag: undefined, diskSizeBytes: model.length },
  };
}

export function quiet() {
  return { logger: silentLogger(), metrics: createMetrics({ defaultMetrics: false }) };
}

/** A retry policy fast enough for tests that use the real clock. */
export const FAST_RETRY = { scheduleOffsetsMs: [20, 40, 80], steadyIntervalMs: 100, maxRetries: 50 };

export const MT_SECRET = 'master-target-secret-123';

/**
 * A master target applying to `targetSpec` and a process server forwarding
 * to it, both in this process on loopback. `stop` stops both (process
 * server first).
 */
export async function startHops(dir: string, targetSpec = `raw:${path.join(dir, 'target.img')}`) {
  const { validateConfig } = await import('../../src/daemon/config');
  const { hrlLogOps } = await import('../../src/transport/hrl-log-ops');
  const { masterTargetFromConfig } = await import('../../src/transport/master-target');
  const { processServerFromConfig } = await import('../../src/transport/process-server');
  const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: [{ id: 'disk0', target: targetSpec }] }), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
  await mt.start();
  const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: mt.url, secret: MT_SECRET } }), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
  try {
    await ps.start();
  } catch (err) {
    await mt.stop();
    throw err;
  }
  return {
    mt,
    ps,
    async stop(): Promise<void> {
      await ps.stop();
      await mt.stop();
    },
  };
}

/**
 * A master target and a process server forwarding to it, whose [MS-HRL]
 * verification at the process server (the last step before its answer) can
 * be held for a log (`hold(seq)` returns the function that lets it go) or
 * made to fail once (`failOnce(seq)`), so a test sees what the master
 * target does before the process server answers. `forwardVia` puts
 * something (a proxy) between them; `forward` adds to the process server's
 * forward config. Both roles stop through `cleanup`.
 */
export async function startGatedHops(
  dir: string,
  cleanup: Array<() => Promise<void> | void>,
  options: { forward?: { cutThrough?: boolean; bandwidthBytesPerSecond?: number }; forwardVia?: (mtUrl: string) => Promise<string> } = {},
) {
  const { validateConfig } = await import('../../src/daemon/config');
  const { BlockrelayError } = await import('../../src/retry/blockrelay-error');
  const { hrlLogOps } = await import('../../src/transport/hrl-log-ops');
  const { masterTargetFromConfig } = await import('../../src/transport/master-target');
  const { processServerFromConfig } = await import('../../src/transport/process-server');
  type Ops = import('../../src/transport/log-ops').LogOps;
  type StageEvent = import('../../src/transport/log-stage-events').LogStageEvent;
  const applied: StageEvent[] = [];
  const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] }), hrlLogOps, {
    ...quiet(),
    retryPolicy: FAST_RETRY,
    onStage: (e) => {
      if (e.stage === 'apply' && e.phase === 'done') applied.push(e);
    },
  });
  await mt.start();
  cleanup.push(() => mt.stop());
  const gates = new Map<number, Promise<void>>();
  const failures = new Set<number>();
  const ops: Ops = {
    ...hrlLogOps,
    verify: async (file, diskSizeBytes) => {
      await hrlLogOps.verify(file, diskSizeBytes);
      const seq = Number(/(\d{20})\.hrl/.exec(file)?.[1]);
      await gates.get(seq);
      if (failures.delete(seq)) throw new BlockrelayError('BR_IO', `simulated failure of the process server's spool for log ${seq}`);
    },
  };
  const forwardUrl = options.forwardVia === undefined ? mt.url : await options.forwardVia(mt.url);
  const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: forwardUrl, secret: MT_SECRET, ...options.forward } }), ops, { ...quiet(), retryPolicy: FAST_RETRY });
  await ps.start();
  cleanup.push(() => ps.stop());
  const hold = (seq: number): (() => void) => {
    let open!: () => void;
    gates.set(seq, new Promise<void>((resolve) => { open = resolve; }));
    return open;
  };
  const appliedSeq = (): number | null => mt.diskStatus()[0]?.appliedSeq ?? null;
  const appliesOf = (seq: number): number => applied.filter((e) => e.seq === seq).length;
  return { mt, ps, hold, failOnce: (seq: number) => failures.add(seq), appliedSeq, appliesOf };
}
