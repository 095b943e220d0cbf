import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { isBlockrelayError } from '../../src/retry/blockrelay-error';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { HrlLogFile, type HrlVerifiedLog } from '../../src/tracking/hrl-reader';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { prng } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';
import { hrlLayout, setStructureByte, type HrlLayout } from './hrl-damage';

const tempDir = useTempDirs();
const MS = 256;
const DISK_BYTES = 256 * 1024;
const MAX_ITERATIONS = 2000;
const TIME_BUDGET_MS = 8_000;

/** A sealed log of small writes over several metadata blocks. */
async function baseLog(dir: string): Promise<Buffer> {
  const file = path.join(dir, 'base.hrl');
  const w = await HrlWriter.create(file, { metadataSizeBytes: MS, stagingBytes: 2048 });
  for (let i = 0; i < 24; i++) {
    await w.append((i * 7919) % (DISK_BYTES - 4096), Buffer.alloc(64 + i * 41, i + 1));
    if (i % 5 === 4) await w.flush();
  }
  await w.seal();
  return fs.readFileSync(file);
}

function mutate(base: Buffer, layout: HrlLayout, rnd: () => number): Buffer {
  const pick = (n: number): number => Math.floor(rnd() * n);
  let log = Buffer.from(base);
  const kind = pick(4);
  if (kind === 0) {
    for (let i = 0, n = 1 + pick(3); i < n; i++) log[4096 + pick(log.length - 4096)] ^= 1 << pick(8);
  } else if (kind === 1) {
    log = log.subarray(0, pick(log.length));
  } else {
    // A field of a structure changed and that structure's checksum fixed, so the damage reaches the deeper checks.
    const all = [0, ...layout.blocks, ...layout.entries];
    const s = all[pick(all.length)]!;
    const field = pick(s === 0 ? 128 : 32);
    setStructureByte(log, layout, s, field, pick(256));
  }
  return log;
}

/** What verifying a log yields, in a comparable form: the structure, or the error's code, offset and message. */
async function outcome(log: HrlLogFile): Promise<unknown> {
  try {
    const v: HrlVerifiedLog = await log.verify({ diskSizeBytes: DISK_BYTES });
    const entries = [];
    for await (const e of log.entries(v)) entries.push(e);
    return { blocks: v.blocks, entryCount: v.entryCount, payloadBytes: v.payloadBytes, entries };
  } catch (err) {
    if (!isBlockrelayError(err)) throw err;
    return { code: err.code, offset: err.details.offset, message: err.message };
  } finally {
    await log.close();
  }
}

describe('an [MS-HRL] log read from memory', () => {
  it('verifies exactly as the same bytes in a file do, damaged or not (seeded fuzz)', async () => {
    const dir = tempDir();
    const base = await baseLog(dir);
    const layout = hrlLayout(base, MS);
    const file = path.join(dir, 'm.hrl');
    const rnd = prng(0x6e6d_0001);
    const started = Date.now();
    const codes = new Map<string, number>();
    let iterations = 0;
    for (; iterations < MAX_ITERATIONS && Date.now() - started < TIME_BUDGET_MS; iterations++) {
      const bytes = iterations === 0 ? base : mutate(base, layout, rnd);
      fs.writeFileSync(file, bytes);
      const fromFile = await outcome(await HrlLogFile.open(file));
      // Named like the file, so messages compare equal.
      const fromMemory = await outcome(HrlLogFile.fromBytes(file, bytes));
      expect(fromMemory, `iteration ${iterations}`).toEqual(fromFile);
      const code = (fromFile as { code?: string }).code ?? 'valid';
      codes.set(code, (codes.get(code) ?? 0) + 1);
    }
    expect(iterations).toBeGreaterThan(300);
    for (const code of ['valid', 'BR_HRL_TRUNCATED', 'BR_HRL_DATA_CHECKSUM', 'BR_HRL_METADATA_CHECKSUM', 'BR_HRL_ENTRY_CHECKSUM']) {
      expect(codes.get(code) ?? 0, `${code} in ${JSON.stringify([...codes])}`).toBeGreaterThan(0);
    }
  }, 60_000);

  it('applies to a target exactly as the file does, writing from views of the buffer', async () => {
    const dir = tempDir();
    const base = await baseLog(dir);
    const file = path.join(dir, 'base.hrl');
    const results: Buffer[] = [];
    for (const input of [file, { path: file, bytes: base }]) {
      const img = path.join(dir, `disk-${results.length}.img`);
      fs.writeFileSync(img, Buffer.alloc(DISK_BYTES, 0x77));
      const target = await openDisk(`raw:${img}`);
      try {
        const applied = await applyHrlLogs(target, [input]);
        expect(applied.entriesApplied).toBe(24);
      } finally {
        await target.close();
      }
      results.push(fs.readFileSync(img));
    }
    expect(results[1]!.equals(results[0]!)).toBe(true);
    expect(results[0]!.equals(Buffer.alloc(DISK_BYTES, 0x77))).toBe(false);
  });
});
