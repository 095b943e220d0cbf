import * as path from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/daemon/logger';
import { createMetrics } from '../../src/daemon/metrics';
import { systemClock } from '../../src/platform/clock';
import { DiskHealth } from '../../src/retry/health';
import { DiskDrain, spoolQueue } from '../../src/transport/disk-drain';
import { hashHex, LogSpool, newXxhash64, type SpoolEntry } from '../../src/transport/log-spool';
import type { LogEnvelope } from '../../src/transport/transport-protocol';
import { UploadPipeline } from '../../src/transport/upload-pipeline';
import { useTempDirs } from '../helpers/tmp';

/** Commits a 4 KiB log of `fill` bytes under `seq` (replacing one held under it). */
async function commit(spool: LogSpool, seq: number, fill: number): Promise<LogEnvelope> {
  const body = Buffer.alloc(4096, fill);
  const hasher = await newXxhash64();
  hasher.update(body);
  const envelope = { diskId: 'disk0', seq, xxhash64: hashHex(hasher), logLength: body.length, cutTimeMs: 0, cutId: 'c', diskSizeBytes: 1 << 20 } as LogEnvelope;
  await spool.receive(envelope, Readable.from([body]), { lz4: false, verify: async () => undefined });
  return envelope;
}

describe('an upload pipeline whose queue replaces an item ahead', () => {
  const tmp = useTempDirs();

  async function run(sameItem: ((a: SpoolEntry, b: SpoolEntry) => boolean) | undefined) {
    const spool = new LogSpool(path.join(tmp(), 'spool'), 1 << 24);
    await spool.open();
    await commit(spool, 4, 9);
    await commit(spool, 5, 1);
    const old6 = await commit(spool, 6, 2);
    let new6: LogEnvelope | undefined;
    const sent: string[] = [];
    const pipeline = new UploadPipeline<SpoolEntry>({
      key: (e) => e.envelope.seq,
      next: async (e) => spool.list('disk0').find((x) => x.envelope.seq > e.envelope.seq),
      send: async (e, onBodySent) => {
        sent.push(`${e.envelope.seq}:${e.envelope.xxhash64}`);
        onBodySent();
        if (e.envelope.seq === 5) {
          // Log 6 is ahead (its upload of the old content started); the spool takes a new log 6 now.
          await new Promise((r) => setTimeout(r, 20));
          new6 = await commit(spool, 6, 3);
        }
      },
      ...(sameItem ? { sameItem } : {}),
    });
    const drain = new DiskDrain({ diskId: 'disk0', queue: spoolQueue(spool, 'disk0'), stage: 'forward', handle: (e) => pipeline.send(e), clock: systemClock, logger: silentLogger(), metrics: createMetrics({ defaultMetrics: false }), health: new DiskHealth('disk0') });
    drain.start();
    await drain.whenIdle();
    await drain.stop();
    await pipeline.stop();
    return { old6, new6: new6!, sent, left: spool.list('disk0').map((e) => e.envelope.seq) };
  }

  it('sends the replacement itself when sameItem tells the two apart, and removes it only then', async () => {
    const r = await run((a, b) => a.envelope.xxhash64 === b.envelope.xxhash64);
    expect(r.old6.xxhash64).not.toBe(r.new6.xxhash64);
    expect(r.sent).toContain(`6:${r.old6.xxhash64}`);
    expect(r.sent[r.sent.length - 1]).toBe(`6:${r.new6.xxhash64}`);
    expect(r.left).toEqual([]);
  });

  it('without sameItem adopts by number (the flaw sameItem exists for): the replacement is never sent', async () => {
    const r = await run(undefined);
    expect(r.sent).not.toContain(`6:${r.new6.xxhash64}`);
  });
});
