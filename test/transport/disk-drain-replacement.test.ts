import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { systemClock } from '../../src/platform/clock';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { DiskHealth } from '../../src/retry/health';
import { DiskDrain, spoolQueue } from '../../src/transport/disk-drain';
import { hashHex, LogSpool, newXxhash64, type SpoolEntry } from '../../src/transport/log-spool';
import type { LogEnvelope } from '../../src/transport/transport-protocol';
import { useTempDirs } from '../helpers/tmp';
import { FAST_RETRY, quiet } from './transport-fixture';

/**
 * A log committed again under a sequence number the spool still holds
 * replaces the spooled one (same file name). Admission never lets that
 * happen while the ledger knows the disk (sequence-ledger.ts admit), but a
 * receiver whose ledger has no record of the disk (nextSeq null: lost or
 * reset) accepts any number. The forward drain must then forward what the
 * spool holds now for that number, and remove from the spool only what it
 * forwarded.
 */

const DISK = 'disk0';

async function envelopeFor(seq: number, body: Buffer): Promise<LogEnvelope> {
  const hasher = await newXxhash64();
  hasher.update(body);
  return { diskId: DISK, seq, xxhash64: hashHex(hasher), logLength: body.length, cutTimeMs: 0, cutId: `cut-${seq}`, group: undefined, appTag: undefined, diskSizeBytes: 1 << 20 };
}

async function commit(spool: LogSpool, seq: number, fill: number): Promise<LogEnvelope> {
  const body = Buffer.alloc(64 * 1024, fill);
  const envelope = await envelopeFor(seq, body);
  await spool.receive(envelope, Readable.from([body]), { lz4: false, verify: async () => undefined });
  return envelope;
}

/** What the next hop would have received: the envelope sent and the hash of the bytes that went with it. */
interface Forwarded {
  readonly seq: number;
  readonly envelopeHash: string;
  readonly bodyHash: string;
}

async function bodyHash(file: string): Promise<string> {
  const hasher = await newXxhash64();
  hasher.update(await fsp.readFile(file));
  return hashHex(hasher);
}

describe('forward drain with a log replaced under the same sequence number', () => {
  const tmp = useTempDirs();

  function drainOf(spool: LogSpool, handle: (entry: SpoolEntry) => Promise<void>): DiskDrain {
    return new DiskDrain({ diskId: DISK, queue: spoolQueue(spool, DISK), stage: 'forward', handle, clock: systemClock, ...quiet(), health: new DiskHealth(DISK), retryPolicy: FAST_RETRY });
  }

  it('retries with the replacement (its envelope and its bytes), not the log it replaced', async () => {
    const dir = tmp();
    const spool = new LogSpool(path.join(dir, 'spool'), 16 << 20);
    await spool.open();
    const first = await commit(spool, 5, 0x11);
    const forwarded: Forwarded[] = [];
    let replacement: LogEnvelope | undefined;
    const drain = drainOf(spool, async (entry) => {
      if (replacement === undefined) {
        // The first attempt fails; meanwhile a log under the same number is committed.
        replacement = await commit(spool, 5, 0x33);
        throw new BlockrelayError('BR_PEER_BUSY', 'next hop busy');
      }
      forwarded.push({ seq: entry.envelope.seq, envelopeHash: entry.envelope.xxhash64, bodyHash: await bodyHash(entry.file) });
    });
    drain.start();
    await drain.whenIdle();
    await drain.stop();
    expect(drain.state).toBe('stopped');
    expect(first.xxhash64).not.toBe(replacement!.xxhash64);
    // One forward, of the replacement, whose bytes match its envelope.
    expect(forwarded).toEqual([{ seq: 5, envelopeHash: replacement!.xxhash64, bodyHash: replacement!.xxhash64 }]);
    expect(spool.list(DISK)).toEqual([]);
  });

  it('keeps a replacement committed while the log it replaced was being forwarded, and forwards it next', async () => {
    const dir = tmp();
    const spool = new LogSpool(path.join(dir, 'spool'), 16 << 20);
    await spool.open();
    const first = await commit(spool, 5, 0x11);
    const forwarded: Forwarded[] = [];
    let replacement: LogEnvelope | undefined;
    const drain = drainOf(spool, async (entry) => {
      // The forward reads from a descriptor opened before the replacement's rename: the old log's bytes.
      const fh = await fsp.open(entry.file, 'r');
      try {
        if (replacement === undefined) replacement = await commit(spool, 5, 0x33);
        const hasher = await newXxhash64();
        hasher.update(await fh.readFile());
        forwarded.push({ seq: entry.envelope.seq, envelopeHash: entry.envelope.xxhash64, bodyHash: hashHex(hasher) });
      } finally {
        await fh.close();
      }
    });
    drain.start();
    await drain.whenIdle();
    await drain.stop();
    // Each log went once, with its own bytes; the replacement was not dropped as if forwarded.
    expect(forwarded).toEqual([
      { seq: 5, envelopeHash: first.xxhash64, bodyHash: first.xxhash64 },
      { seq: 5, envelopeHash: replacement!.xxhash64, bodyHash: replacement!.xxhash64 },
    ]);
    expect(spool.list(DISK)).toEqual([]);
  });

  it('forwards each log once when nothing is replaced, a failed attempt included', async () => {
    const dir = tmp();
    const spool = new LogSpool(path.join(dir, 'spool'), 16 << 20);
    await spool.open();
    const logs = [await commit(spool, 1, 1), await commit(spool, 2, 2), await commit(spool, 3, 3)];
    const forwarded: Forwarded[] = [];
    let failed = false;
    const drain = drainOf(spool, async (entry) => {
      if (entry.envelope.seq === 2 && !failed) {
        failed = true;
        throw new BlockrelayError('BR_PEER_BUSY', 'next hop busy');
      }
      forwarded.push({ seq: entry.envelope.seq, envelopeHash: entry.envelope.xxhash64, bodyHash: await bodyHash(entry.file) });
    });
    drain.start();
    await drain.whenIdle();
    await drain.stop();
    expect(forwarded).toEqual(logs.map((l) => ({ seq: l.seq, envelopeHash: l.xxhash64, bodyHash: l.xxhash64 })));
    expect(spool.list(DISK)).toEqual([]);
  });
});
