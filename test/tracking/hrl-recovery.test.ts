import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { HrlLogFile } from '../../src/tracking/hrl-reader';
import { recoverHrlLog, scanUnsealedHrlLog } from '../../src/tracking/hrl-recovery';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const MS = 128; // 3 entries per block keeps the every-byte sweep fast

async function entriesOf(file: string): Promise<[number, string][]> {
  const log = await HrlLogFile.open(file);
  try {
    const v = await log.verify();
    const out: [number, string][] = [];
    for await (const e of log.entries(v)) out.push([e.byteOffset, (await log.readPayload(e, 0, e.dataLength)).toString('hex')]);
    return out;
  } finally {
    await log.close();
  }
}

function payload(i: number, length: number): Buffer {
  return Buffer.alloc(length, (i * 37 + 11) & 0xff);
}

describe('recovery of an unsealed log', () => {
  it('keeps exactly the writes of complete blocks when cut or zeroed at every byte of its last block', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'open.hrl');
    const w = await HrlWriter.create(file, { metadataSizeBytes: MS, stagingBytes: 256 });
    const expected: [number, string][] = [];
    // Seven writes = two full blocks and a partial one, made durable by flush.
    for (let i = 0; i < 7; i++) {
      const data = payload(i, 40 + i * 3);
      await w.append(i * 1000, data);
      expected.push([i * 1000, data.toString('hex')]);
    }
    await w.flush();
    const beforeLast = w.durableEndBytes;
    const durableBefore = expected.slice();
    for (let i = 7; i < 9; i++) {
      const data = payload(i, 50 + i);
      await w.append(i * 1000, data);
      expected.push([i * 1000, data.toString('hex')]);
    }
    await w.flush();
    const full = fs.readFileSync(file);
    await w.close();
    expect(full.length).toBe(w.durableEndBytes);

    let checked = 0;
    for (let cut = beforeLast; cut <= full.length; cut++) {
      for (const mode of ['truncate', 'zero-fill'] as const) {
        const copy = path.join(dir, `cut-${cut}-${mode}.hrl`);
        const bytes = mode === 'truncate' ? full.subarray(0, cut) : Buffer.concat([full.subarray(0, cut), Buffer.alloc(full.length - cut)]);
        fs.writeFileSync(copy, bytes);
        const r = await recoverHrlLog(copy);
        // Zeroing bytes that were zero already (unused entry slots) damages nothing.
        const want = bytes.equals(full) ? expected : durableBefore;
        expect(r.wasUnsealed).toBe(true);
        expect(r.entryCount, `cut at ${cut} (${mode})`).toBe(want.length);
        expect(await entriesOf(copy)).toEqual(want);
        fs.rmSync(copy);
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(2 * 100);
  });

  it('ignores garbage after the last durable block and a block whose payload never reached the disk', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'open.hrl');
    const w = await HrlWriter.create(file, { metadataSizeBytes: MS });
    await w.append(0, payload(1, 512));
    await w.flush();
    const durable = w.durableEndBytes;
    await w.append(4096, payload(2, 512));
    await w.flush();
    await w.close();
    const bytes = fs.readFileSync(file);
    bytes.fill(0, durable, durable + 512); // the payload lost, its metadata block durable
    fs.writeFileSync(file, Buffer.concat([bytes, Buffer.alloc(3000, 0x5a)]));
    const r = await recoverHrlLog(file);
    expect(r.entryCount).toBe(1);
    expect(r.durableEndBytes).toBe(durable);
    expect(await entriesOf(file)).toEqual([[0, payload(1, 512).toString('hex')]]);
  });

  it('seals a log whose anchor block never became durable as an empty log with the same UniqueId', async () => {
    const file = path.join(tempDir(), 'open.hrl');
    const w = await HrlWriter.create(file, { metadataSizeBytes: MS });
    await w.close();
    const bytes = fs.readFileSync(file);
    fs.writeFileSync(file, bytes.subarray(0, 4096 + 10));
    const r = await recoverHrlLog(file);
    expect(r.entryCount).toBe(0);
    const log = await HrlLogFile.open(file);
    const v = await log.verify().finally(() => log.close());
    expect(v.header.uniqueId).toBe(w.uniqueId);
    expect(v.entryCount).toBe(0);
  });

  it('takes a remembered end as a hint, and falls back to scanning when the hint is wrong', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'open.hrl');
    const w = await HrlWriter.create(file, { metadataSizeBytes: MS });
    for (let i = 0; i < 10; i++) await w.append(i * 512, payload(i, 300));
    await w.flush();
    const durable = w.durableEndBytes;
    await w.append(9999, payload(50, 77));
    await w.flush();
    await w.close();
    const bytes = fs.readFileSync(file);
    const expected = await (async () => {
      const copy = path.join(dir, 'plain.hrl');
      fs.writeFileSync(copy, bytes);
      await recoverHrlLog(copy);
      return entriesOf(copy);
    })();
    expect(expected).toHaveLength(11);
    for (const hints of [[durable], [bytes.length], [durable - 7, 12345, durable], [durable + 5], [bytes.length + 4096]]) {
      const copy = path.join(dir, `hint-${hints.join('-')}.hrl`);
      fs.writeFileSync(copy, bytes);
      const r = await recoverHrlLog(copy, { hintEndBytes: hints });
      expect(r.entryCount, `hints ${hints}`).toBe(11);
      expect(await entriesOf(copy)).toEqual(expected);
    }
  });

  it('recovers a log of 160 000 blocks from its remembered end (a FLUSH after every write closes one block each)', async () => {
    const file = path.join(tempDir(), 'many.hrl.open');
    // No fdatasync per flush: the layout is what a flush-per-write log has, made quickly.
    // Coalescing off: each flushed write of a repeated extent is then an append, not a rewrite in place.
    const writer = await HrlWriter.create(file, { metadataSizeBytes: 64, coalesceOverwrites: false, openFile: async (p) => Object.assign(await fsp.open(p, 'wx+'), { datasync: async () => undefined }) });
    const count = 160_000;
    const data = Buffer.alloc(16, 1);
    try {
      for (let i = 0; i < count; i++) {
        await writer.append((i % 1000) * 512, data);
        await writer.flush();
      }
    } finally {
      await writer.close();
    }
    const scan = await scanUnsealedHrlLog(file, { hintEndBytes: [fs.statSync(file).size] });
    // The anchor block, then one block per flush.
    expect(scan.blocks.length).toBe(count + 1);
  }, 120_000);

  it('leaves a sealed log as it is', async () => {
    const file = path.join(tempDir(), 'sealed.hrl');
    const w = await HrlWriter.create(file);
    await w.append(0, payload(1, 4096));
    await w.seal();
    const before = fs.readFileSync(file);
    const r = await recoverHrlLog(file);
    expect(r.wasUnsealed).toBe(false);
    expect(fs.readFileSync(file)).toEqual(before);
  });
});
