import * as fs from 'node:fs';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { hashHex, hashFile, LogSpool, newXxhash64 } from '../../src/transport/log-spool';
import type { LogEnvelope } from '../../src/transport/transport-protocol';
import { useTempDirs } from '../helpers/tmp';
import { prng } from './transport-fixture';

async function envelopeOf(seq: number, body: Buffer): Promise<LogEnvelope> {
  const hasher = await newXxhash64();
  hasher.update(body);
  return { diskId: 'disk0', seq, xxhash64: hashHex(hasher), logLength: body.length, cutTimeMs: 0, cutId: 'c', diskSizeBytes: 1 << 20 } as LogEnvelope;
}

/** Lets `n` turns of the event loop pass (the I/O of whatever runs meanwhile moves on). */
async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
}

describe('removing a spooled log while a commit replaces it', () => {
  const tmp = useTempDirs();

  it('keeps the replacement, its files and its bytes whichever runs first', async () => {
    const spool = new LogSpool(path.join(tmp(), 'spool'), 1 << 26);
    await spool.open();
    const rand = prng(7);
    for (let round = 0; round < 60; round++) {
      const seq = round + 1;
      const oldBody = Buffer.alloc(4096, 1);
      const newBody = Buffer.alloc(8192, 2);
      const old = await spool.receive(await envelopeOf(seq, oldBody), Readable.from([oldBody]), { lz4: false, verify: async () => undefined });
      const staged = await spool.stage(await envelopeOf(seq, newBody), Readable.from([newBody]), { lz4: false, verify: async () => undefined });
      // The drain removes the log it handled (old) while the replacement is committed.
      const delay = Math.floor(rand() * 4);
      const removed = (async () => {
        await turns(delay);
        await spool.remove('disk0', seq, old);
      })();
      const committed = staged.commit();
      await Promise.all([removed, committed]);
      const held = spool.get('disk0', seq);
      expect(held?.envelope.xxhash64, `round ${round} (remove after ${delay} turns)`).toBe((await envelopeOf(seq, newBody)).xxhash64);
      expect(fs.existsSync(held!.file.replace(/\.hrl$/, '.json'))).toBe(true);
      expect(await hashFile(held!.file)).toEqual({ xxhash64: held!.envelope.xxhash64, sizeBytes: 8192 });
      expect(spool.bytesUsed).toBe(8192 * seq);
    }
  });

  it('removes the entry asked for, and nothing once it was replaced', async () => {
    const spool = new LogSpool(path.join(tmp(), 'spool'), 1 << 26);
    await spool.open();
    const a = Buffer.alloc(4096, 1);
    const b = Buffer.alloc(4096, 2);
    const first = await spool.receive(await envelopeOf(1, a), Readable.from([a]), { lz4: false, verify: async () => undefined });
    const second = await spool.receive(await envelopeOf(1, b), Readable.from([b]), { lz4: false, verify: async () => undefined });
    await spool.remove('disk0', 1, first);
    expect(spool.get('disk0', 1)).toBe(second);
    await spool.remove('disk0', 1, second);
    expect(spool.get('disk0', 1)).toBeUndefined();
    expect(spool.bytesUsed).toBe(0);
    expect(fs.readdirSync(path.dirname(second.file))).toEqual([]);
  });
});
