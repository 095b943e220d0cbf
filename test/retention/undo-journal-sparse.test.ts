import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { coalesceExtents, SparseSegmentFile, UndoJournal, undoLogOccupiedBoundBytes, undoLogSizeBytes } from '../../src/retention/undo-journal';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { verifyHrlLog } from '../../src/tracking/hrl-reader';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import type { Clock } from '../../src/platform/clock';
import { randomData } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';
import { makePatternLog, prng, useRetentionDirs } from './retention-fixture';

const KiB = 1024;
const MiB = 1024 * KiB;
const fixedClock: Clock = { now: () => Date.UTC(2026, 10, 21, 12, 0, 0) } as Clock;

describe('undo journal segments with holes', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();

  it('writes a log byte-identical to the plain writer, with zero payloads left as holes', async () => {
    const dir = tmp();
    const rand = prng(0x401e);
    // Zero payloads of many sizes (whole pages, pieces of pages, whole entries), between data.
    const appends: Array<[number, Buffer]> = [];
    for (let i = 0; i < 400; i++) {
      const length = rand() < 0.5 ? 64 * KiB : 512 * (1 + Math.floor(rand() * 40));
      const offset = Math.floor(rand() * 4096) * 64 * KiB;
      appends.push([offset, rand() < 0.6 ? Buffer.alloc(length) : randomData(rand, length)]);
    }
    appends.push([0, Buffer.alloc(3 * MiB)]);
    const write = async (file: string, sparse: boolean): Promise<SparseSegmentFile | undefined> => {
      let opened: SparseSegmentFile | undefined;
      const w = await HrlWriter.create(file, {
        uniqueId: '6f1c4c55-8f0e-4d3a-9a57-1b2c3d4e5f60',
        clock: fixedClock,
        // Segment writers never coalesce (createSegmentWriter); with coalescing
        // the native path may append a piece the TypeScript path rewrites.
        coalesceOverwrites: false,
        ...(sparse ? { openFile: async (f: string) => (opened = await SparseSegmentFile.create(f)) } : {}),
      });
      for (const [offset, data] of appends) await w.append(offset, data);
      await w.seal();
      return opened;
    };
    const plain = path.join(dir, 'plain.hrl');
    const sparse = path.join(dir, 'sparse.hrl');
    await write(plain, false);
    const file = (await write(sparse, true))!;
    expect(fs.readFileSync(sparse).equals(fs.readFileSync(plain))).toBe(true);
    const zeroBytes = appends.reduce((s, [, d]) => s + (d.every((b) => b === 0) ? d.length : 0), 0);
    // Pieces of pages next to data are written, so not every zero byte is a hole.
    expect(file.holeBytes).toBeGreaterThan(zeroBytes * 0.8);
    const allocated = fs.statSync(sparse).blocks * 512;
    expect(allocated).toBeLessThan(fs.statSync(sparse).size - zeroBytes * 0.8);
    await verifyHrlLog(sparse, { checkPayloads: true });
  });

  it('writes zeroes over bytes written before and extends the file over a trailing hole', async () => {
    const file = path.join(tmp(), 's.bin');
    const f = await SparseSegmentFile.create(file);
    await f.write(Buffer.alloc(8192, 0x5a), 0, 8192, 0);
    await f.writev([Buffer.alloc(4096), Buffer.alloc(100)], 4096); // over written bytes, then fresh ones
    await f.write(Buffer.alloc(3 * 4096), 0, 3 * 4096, 16 * 1024);
    await f.datasync();
    await f.close();
    const got = fs.readFileSync(file);
    expect(got.length).toBe(28 * 1024);
    expect(got.subarray(0, 4096).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    expect(got.subarray(4096).equals(Buffer.alloc(got.length - 4096))).toBe(true);
  });

  it.each(['raw', 'vmdk'] as const)('bounds what a %s segment will occupy from the target\'s allocation, before it is written', async (kind) => {
    const dir = tmp();
    const diskBytes = 16 * MiB;
    const target = await openDisk(`${kind}:${path.join(dir, `target.${kind === 'raw' ? 'img' : 'vmdk'}`)}`, { create: { sizeBytes: diskBytes } });
    try {
      const rand = prng(0xb0d5);
      // Data in scattered 256 KiB pieces over a quarter of the disk; the rest never written.
      for (let i = 0; i < 16; i++) await target.write(Math.floor(rand() * 64) * 256 * KiB, randomData(rand, 256 * KiB));
      await target.flush();
      const journal = new UndoJournal(path.join(retentionTmp(), 'journal'));
      await journal.open();
      for (let seq = 1; seq <= 6; seq++) {
        const ranges = coalesceExtents(Array.from({ length: 60 * seq }, () => ({ offset: Math.floor(rand() * (diskBytes / 512 - 128)) * 512, length: 512 * (1 + Math.floor(rand() * 128)) })));
        const bound = await undoLogOccupiedBoundBytes(ranges, target);
        const { sizeBytes, allocatedBytes } = await journal.write(seq, ranges, target);
        expect(sizeBytes).toBe(undoLogSizeBytes(ranges));
        expect(allocatedBytes, `log ${seq}`).toBeLessThanOrEqual(bound);
        expect(bound, `log ${seq}`).toBeLessThan(sizeBytes * 0.6);
      }
    } finally {
      await target.close();
    }
  });

  it('journals a sparse VMDK through readMany: zeroes for unwritten grains, data for the rest, and the segment undoes the log', async () => {
    const dir = tmp();
    const diskBytes = 8 * MiB;
    const target = await openDisk(`vmdk:${path.join(dir, 'target.vmdk')}`, { create: { sizeBytes: diskBytes } });
    try {
      const rand = prng(0x5ea1);
      // Data in the first quarter only: the rest of the disk was never written.
      await target.write(0, randomData(rand, 2 * MiB));
      await target.flush();
      const before = await target.read(0, diskBytes);
      const model = Buffer.from(before);
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 1, cutTimeMs: 0, writes: 300 }, model, rand);
      const ranges = coalesceExtents(await hrlLogOps.ranges(log.file));
      expect(ranges.some((r) => r.offset < 2 * MiB)).toBe(true);
      expect(ranges.some((r) => r.offset >= 2 * MiB)).toBe(true);
      const journal = new UndoJournal(path.join(retentionTmp(), 'journal'));
      await journal.open();
      const { sizeBytes } = await journal.write(1, ranges, target);
      const segment = journal.file(1);
      expect(fs.statSync(segment).size).toBe(sizeBytes);
      await verifyHrlLog(segment, { diskSizeBytes: diskBytes, checkPayloads: true });
      const zeroBytes = ranges.filter((r) => r.offset >= 2 * MiB).reduce((s, r) => s + r.length, 0);
      expect(fs.statSync(segment).blocks * 512).toBeLessThan(sizeBytes - zeroBytes / 2);
      await hrlLogOps.apply(log.file, target);
      expect((await target.read(0, diskBytes)).equals(model)).toBe(true);
      await applyHrlLogs(target, [segment], { checkChain: false });
      expect((await target.read(0, diskBytes)).equals(before)).toBe(true);
    } finally {
      await target.close();
    }
  });
});
