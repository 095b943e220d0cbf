import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { HRL_READ_CHUNK_BYTES } from '../../src/tracking/hrl-reader';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { prng } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';

describe('applyHrlLogs reading payloads in spans', () => {
  const tmp = useTempDirs();

  it('applies thousands of small entries, overlapping ones in order, and entries larger than its read chunk, exactly', async () => {
    const dir = tmp();
    const diskBytes = 64 * 1024 * 1024;
    const model = Buffer.alloc(diskBytes);
    const rand = prng(21);
    const file = path.join(dir, 'log.hrl');
    // Not coalesced: the test wants thousands of overlapping entries applied in order.
    const w = await HrlWriter.create(file, { maxEntryBytes: 2 * HRL_READ_CHUNK_BYTES, coalesceOverwrites: false });
    const write = async (offset: number, length: number): Promise<void> => {
      const data = Buffer.alloc(length);
      for (let i = 0; i < length; i += 4) data.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
      await w.append(offset, data);
      data.copy(model, offset);
    };
    // Many small writes over a small area: they overlap each other, across and inside metadata blocks.
    for (let i = 0; i < 3000; i++) await write(Math.floor(rand() * 2048) * 4096, 4096 * (1 + Math.floor(rand() * 4)));
    // Entries longer than the apply's read chunk, between the small ones and overlapping them.
    await write(4096 * 100, HRL_READ_CHUNK_BYTES + 3 * 4096);
    for (let i = 0; i < 50; i++) await write(Math.floor(rand() * 2048) * 4096, 65536);
    await write(32 * 1024 * 1024, 2 * HRL_READ_CHUNK_BYTES);
    await w.seal();
    await w.close();
    const target = await openDisk(`raw:${path.join(dir, 't.img')}`, { create: { sizeBytes: diskBytes } });
    const result = await applyHrlLogs(target, [file]);
    await target.close();
    expect(result.entriesApplied).toBeGreaterThan(3000);
    expect(fs.readFileSync(path.join(dir, 't.img')).equals(model)).toBe(true);
  });
});
