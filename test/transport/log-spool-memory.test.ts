import * as fs from 'node:fs';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { HELD_LOG_ALLOCATION_STEP_BYTES, heldLogBytes, LogMemory } from '../../src/transport/held-log';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { LogSpool } from '../../src/transport/log-spool';
import type { LogEnvelope } from '../../src/transport/transport-protocol';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, makeLog, prng } from './transport-fixture';


/** The upload body: the log in pieces of at most 64 KiB, as a socket delivers it. */
function body(bytes: Buffer): Readable {
  return Readable.from((function* () {
    for (let at = 0; at < bytes.length; at += 65536) yield bytes.subarray(at, Math.min(bytes.length, at + 65536));
  })());
}

/** Files in the spool's directory of disk0 (temporaries included). */
function spoolFiles(dir: string): string[] {
  const d = path.join(dir, 'spool', 'disk0');
  return fs.existsSync(d) ? fs.readdirSync(d).sort() : [];
}

describe('logs staged in memory', () => {
  const tmp = useTempDirs();

  async function setup(memoryBytes = HELD_LOG_ALLOCATION_STEP_BYTES): Promise<{ dir: string; spool: LogSpool; memory: LogMemory; bytes: Buffer; envelope: LogEnvelope }> {
    const dir = tmp();
    const spool = new LogSpool(path.join(dir, 'spool'), 1 << 30);
    await spool.open();
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, Buffer.alloc(DISK_SIZE), prng(21), 30);
    return { dir, spool, memory: new LogMemory(memoryBytes), bytes: fs.readFileSync(log.file), envelope: log.envelope };
  }

  it('holds a verified log in memory under its staged name with no file written, and commit writes the same bytes durably', async () => {
    const { dir, spool, memory, bytes, envelope } = await setup();
    let verifiedFromMemory = false;
    const staged = await spool.stage(envelope, body(bytes), {
      lz4: false,
      durable: false,
      memory,
      verify: async (file, env) => {
        verifiedFromMemory = heldLogBytes(file)?.equals(bytes) === true && !fs.existsSync(file);
        await hrlLogOps.verify(file, env.diskSizeBytes);
      },
    });
    expect(verifiedFromMemory).toBe(true);
    expect(heldLogBytes(staged.file)?.equals(bytes)).toBe(true);
    expect(fs.existsSync(staged.file)).toBe(false);
    expect(spoolFiles(dir)).toEqual([]);
    // The LogOps read it by name like a file.
    expect((await hrlLogOps.ranges(staged.file)).length).toBe(30);
    const entry = await staged.commit();
    expect(fs.readFileSync(entry.file).equals(bytes)).toBe(true);
    expect(spoolFiles(dir)).toEqual(['00000000000000000001.hrl', '00000000000000000001.json']);
    expect(heldLogBytes(staged.file)).toBeUndefined();
    expect(spool.list('disk0').map((e) => e.envelope.seq)).toEqual([1]);
    // The buffer went back to the budget as a spare, ready for the next log.
    const again = memory.take(bytes.length);
    expect(again).toBeDefined();
    expect(memory.allocations).toBe(1);
  });

  it('returns the memory of a discarded log and of one refused for damage, leaving nothing behind', async () => {
    const { dir, spool, memory, bytes, envelope } = await setup();
    const staged = await spool.stage(envelope, body(bytes), { lz4: false, durable: false, memory, verify: (file, env) => hrlLogOps.verify(file, env.diskSizeBytes) });
    await staged.discard();
    expect(heldLogBytes(staged.file)).toBeUndefined();
    // A damaged payload under a hash that matches it: [MS-HRL] verification refuses it from memory, naming the offset.
    const damaged = Buffer.from(bytes);
    // The writer's first block is empty: payloads start after it, at 8192.
    damaged[8192 + 100] ^= 0x40;
    const { hashHex, newXxhash64 } = await import('../../src/transport/log-spool');
    const damagedEnvelope = { ...envelope, xxhash64: hashHex((await newXxhash64()).update(damaged)) };
    const err = await spool.stage(damagedEnvelope, body(damaged), { lz4: false, durable: false, memory, verify: (file, env) => hrlLogOps.verify(file, env.diskSizeBytes) }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'BR_HRL_DATA_CHECKSUM', details: { offset: 8192 } });
    // A body that does not hash to its envelope.
    await expect(spool.stage(envelope, body(damaged), { lz4: false, durable: false, memory, verify: async () => undefined })).rejects.toMatchObject({ code: 'BR_UPLOAD_HASH_MISMATCH' });
    expect(spoolFiles(dir)).toEqual([]);
    // Every buffer is a spare again: the whole budget can be taken at once.
    expect(memory.take(memory.maxBytes)).toBeDefined();
  });

  it('stages a log that does not fit the memory bound, or a durable one, to a temp file', async () => {
    const { spool, bytes, envelope } = await setup();
    const small = new LogMemory(bytes.length - 1);
    const staged = await spool.stage(envelope, body(bytes), { lz4: false, durable: false, memory: small, verify: (file, env) => hrlLogOps.verify(file, env.diskSizeBytes) });
    expect(heldLogBytes(staged.file)).toBeUndefined();
    expect(fs.readFileSync(staged.file).equals(bytes)).toBe(true);
    await staged.discard();
    const durable = await spool.stage(envelope, body(bytes), { lz4: false, memory: new LogMemory(), verify: async () => undefined });
    expect(heldLogBytes(durable.file)).toBeUndefined();
    expect(fs.existsSync(durable.file)).toBe(true);
    await durable.discard();
  });
});

describe('held log memory budget', () => {
  it('refuses what does not fit beside the buffers in use, and reuses returned buffers', () => {
    const step = HELD_LOG_ALLOCATION_STEP_BYTES;
    const memory = new LogMemory(4 * step);
    const a = memory.take(step / 2)!;
    const b = memory.take(step + 1)!;
    expect(a.length).toBe(step / 2);
    expect(b.length).toBe(step + 1);
    // Allocations are rounded up to whole steps: 1 + 2 steps are in use, 1 is left.
    expect(memory.take(step + 1)).toBeUndefined();
    memory.give(a);
    // The returned buffer is reused for a log of another size within its step, not a new one allocated.
    const c = memory.take(step - 100)!;
    expect(c.buffer).toBe(a.buffer);
    expect(memory.allocations).toBe(2);
    memory.give(b);
    memory.give(c);
    expect(memory.heldBytes).toBe(3 * step);
    // A larger log drops the spares it needs room from.
    const d = memory.take(4 * step - 1)!;
    expect(d.length).toBe(4 * step - 1);
    expect(memory.heldBytes).toBe(4 * step);
    expect(memory.allocations).toBe(3);
    expect(memory.take(0)).toBeUndefined();
    expect(new LogMemory(0).take(1)).toBeUndefined();
  });

});
