import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { BlockrelayError } from '../../src/retry/blockrelay-error';
import { verifyHrlLog } from '../../src/tracking/hrl-reader';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { prng } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const MiB = 1024 * 1024;

/** A sealed log of `count` random writes of `length` bytes, back to back from offset 0. */
async function randomLog(file: string, seed: number, count: number, length: number): Promise<string> {
  const rand = prng(seed);
  const w = await HrlWriter.create(file);
  for (let i = 0; i < count; i++) {
    const data = Buffer.alloc(length);
    for (let j = 0; j < length; j += 4) data.writeUInt32LE(Math.floor(rand() * 2 ** 32), j);
    await w.append(i * length, data);
  }
  await w.seal();
  return file;
}

describe('HRL verification one log after another (the payload buffer is passed on)', () => {
  it('finds damage in a log verified right after an intact one with the same payloads', async () => {
    const dir = tempDir();
    // Same seed: the damaged log's payloads equal the intact log's, which a stale buffer would hold.
    const intact = await randomLog(path.join(dir, 'a.hrl'), 11, 80, 64 * 1024);
    const damaged = await randomLog(path.join(dir, 'b.hrl'), 11, 80, 64 * 1024);
    const bytes = fs.readFileSync(damaged);
    const at = 8192 + 3 * MiB + 100; // inside a payload, in the first 4 MiB chunk
    bytes[at] = bytes[at]! ^ 0xff;
    fs.writeFileSync(damaged, bytes);
    for (let round = 0; round < 3; round++) {
      await verifyHrlLog(intact);
      let caught: unknown;
      try {
        await verifyHrlLog(damaged);
      } catch (err) {
        caught = err;
      }
      expect((caught as BlockrelayError).code).toBe('BR_HRL_DATA_CHECKSUM');
    }
  });

  it('verifies logs concurrently, each with its own buffer', async () => {
    const dir = tempDir();
    const files = await Promise.all([1, 2, 3, 4].map((s) => randomLog(path.join(dir, `${s}.hrl`), s, 100, 64 * 1024)));
    const results = await Promise.all([...files, ...files].map((f) => verifyHrlLog(f)));
    for (const r of results) expect(r.payloadBytes).toBe(100 * 64 * 1024);
  });
});
