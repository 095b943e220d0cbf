import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { failover, loadPoints } from '../../src/retention/failover';
import { diskRetentionPaths } from '../../src/retention/retention-format';
import { RetentionHooks } from '../../src/retention/retention-hooks';
import { coalesceExtents, UndoJournal, undoLogSizeBytes } from '../../src/retention/undo-journal';
import { openDisk } from '../../src/targets/disk-spec';
import type { DiskTarget } from '../../src/targets/disk-target';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { HrlLogFile, verifyHrlLog } from '../../src/tracking/hrl-reader';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import type { SpoolEntry } from '../../src/transport/log-spool';
import { useTempDirs } from '../helpers/tmp';
import { DISK_BYTES, makePatternLog, prng, useRetentionDirs } from './retention-fixture';

async function rawTarget(dir: string, content: Buffer): Promise<DiskTarget> {
  const file = path.join(dir, 'target.img');
  fs.writeFileSync(file, content);
  return openDisk(`raw:${file}`);
}

function randomImage(seed: number): Buffer {
  const rand = prng(seed);
  const b = Buffer.alloc(DISK_BYTES);
  for (let i = 0; i < b.length; i += 4) b.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
  return b;
}

describe('undo journal', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();

  it('merges overlapping and touching ranges and sizes the log it will write', () => {
    expect(coalesceExtents([{ offset: 100, length: 50 }, { offset: 0, length: 10 }, { offset: 120, length: 100 }, { offset: 10, length: 5 }, { offset: 500, length: 0 }])).toEqual([
      { offset: 0, length: 15 },
      { offset: 100, length: 120 },
    ]);
    expect(undoLogSizeBytes([{ offset: 0, length: 4096 }])).toBe(4096 + 4096 + 4096 + 4096);
  });

  it('writes a valid [MS-HRL] pre-image that applied to the target undoes the log', async () => {
    const dir = tmp();
    const before = randomImage(1);
    const target = await rawTarget(dir, before);
    try {
      const model = Buffer.from(before);
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 1, cutTimeMs: 0, writes: 40 }, model, prng(2));
      const journal = new UndoJournal(path.join(retentionTmp(), 'journal'));
      await journal.open();
      const ranges = await hrlLogOps.ranges(log.file);
      const { written, sizeBytes } = await journal.write(1, ranges, target);
      expect(written).toBe(true);
      expect(sizeBytes).toBe(undoLogSizeBytes(coalesceExtents(ranges)));
      const verified = await verifyHrlLog(journal.file(1), { diskSizeBytes: DISK_BYTES });
      expect(verified.payloadBytes).toBe(coalesceExtents(ranges).reduce((n, e) => n + e.length, 0));
      await hrlLogOps.apply(log.file, target);
      expect((await target.read(0, DISK_BYTES)).equals(model)).toBe(true);
      await applyHrlLogs(target, [journal.file(1)], { checkChain: false });
      expect((await target.read(0, DISK_BYTES)).equals(before)).toBe(true);
    } finally {
      await target.close();
    }
  });

  it('journals the zeroes of never-written ranges without reading them, and the pre-image still undoes the log', async () => {
    const dir = tmp();
    // A sparse target: only its first half holds data; the second half is a hole.
    const file = path.join(dir, 'target.img');
    const before = Buffer.alloc(DISK_BYTES);
    randomImage(3).copy(before, 0, 0, DISK_BYTES / 2);
    fs.writeFileSync(file, before.subarray(0, DISK_BYTES / 2));
    fs.truncateSync(file, DISK_BYTES);
    const target = await openDisk(`raw:${file}`);
    const reads: Array<[number, number]> = [];
    const read = target.read.bind(target);
    target.read = async (offset: number, length: number) => {
      reads.push([offset, length]);
      return read(offset, length);
    };
    try {
      const model = Buffer.from(before);
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 1, cutTimeMs: 0, writes: 60 }, model, prng(4));
      const ranges = coalesceExtents(await hrlLogOps.ranges(log.file));
      expect(ranges.some((r) => r.offset >= DISK_BYTES / 2)).toBe(true);
      const journal = new UndoJournal(path.join(retentionTmp(), 'journal'));
      await journal.open();
      await journal.write(1, ranges, target);
      // Every read stays in the half that holds data; the hole's pre-image was not read.
      expect(reads.length).toBeGreaterThan(0);
      for (const [offset] of reads) expect(offset).toBeLessThan(DISK_BYTES / 2);
      await hrlLogOps.apply(log.file, target);
      await applyHrlLogs(target, [journal.file(1)], { checkChain: false });
      expect((await read(0, DISK_BYTES)).equals(before)).toBe(true);
    } finally {
      await target.close();
    }
  });

  it('keeps a complete pre-image after a crash mid-apply and rewrites a half-written one', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const before = randomImage(3);
    const target = await rawTarget(dir, before);
    try {
      const model = Buffer.from(before);
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 1, cutTimeMs: Date.now() - 60_000, writes: 40 }, model, prng(4));
      const log2 = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 2, cutTimeMs: Date.now() - 30_000, writes: 40 }, Buffer.from(model), prng(5));
      const entry = (l: typeof log): SpoolEntry => ({ envelope: l.envelope, file: l.file, sizeBytes: l.envelope.logLength });
      const options = { dir: retentionDir, windowHours: 24, stateDir: path.join(dir, 'state'), inboxDir: path.join(dir, 'state', 'inbox') };
      const first = new RetentionHooks(options);
      await first.beforeApply('disk0', entry(log), target);
      const journal = new UndoJournal(diskRetentionPaths(retentionDir, 'disk0').journalDir);
      const undo1 = fs.readFileSync(journal.file(1));
      // The crash: half of log 1's entries reached the target.
      const hrl = await HrlLogFile.open(log.file);
      const verified = await hrl.verify();
      let n = 0;
      for await (const e of hrl.entries(verified)) {
        if (n++ >= verified.entryCount / 2) break;
        await target.write(e.byteOffset, await hrl.readPayload(e, 0, e.dataLength));
      }
      await hrl.close();

      // Restart: the complete pre-image is kept byte for byte, the point not recorded twice.
      const second = new RetentionHooks(options);
      await second.beforeApply('disk0', entry(log), target);
      expect(fs.readFileSync(journal.file(1)).equals(undo1)).toBe(true);
      await hrlLogOps.apply(log.file, target);
      await second.afterApply('disk0', entry(log));

      // A half-written pre-image of log 2 (the crash hit while journaling) is discarded and written again.
      fs.writeFileSync(`${journal.file(2)}.tmp`, Buffer.alloc(5000, 0xee));
      const third = new RetentionHooks(options);
      await third.beforeApply('disk0', entry(log2), target);
      expect(fs.existsSync(`${journal.file(2)}.tmp`)).toBe(false);
      await hrlLogOps.apply(log2.file, target);
      await third.afterApply('disk0', entry(log2));
      await target.flush();

      const out = path.join(dir, 'p1.img');
      await failover({ retentionDir, diskId: 'disk0', point: 'disk0-1', out: `raw:${out}` });
      expect(fs.readFileSync(out).equals(model)).toBe(true);
      const catalog = fs.readFileSync(diskRetentionPaths(retentionDir, 'disk0').catalog, 'utf8');
      expect(catalog.split('\n').filter((l) => l.includes('"t":"point"'))).toHaveLength(2);
    } finally {
      await target.close();
    }
  });

  it('keeps replicating over a damaged catalog, keeping its intact points', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const target = await rawTarget(dir, Buffer.alloc(DISK_BYTES));
    const options = { dir: retentionDir, windowHours: 24, stateDir: path.join(dir, 'state'), inboxDir: path.join(dir, 'inbox') };
    const model = Buffer.alloc(DISK_BYTES);
    const images: Buffer[] = [];
    const apply = async (hooks: RetentionHooks, seq: number): Promise<void> => {
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: Date.now() - (9 - seq) * 60_000 }, model, prng(seq));
      images[seq] = Buffer.from(model);
      const e: SpoolEntry = { envelope: log.envelope, file: log.file, sizeBytes: log.envelope.logLength };
      await hooks.beforeApply('disk0', e, target);
      await hrlLogOps.apply(log.file, target);
      await hooks.afterApply('disk0', e);
    };
    const first = new RetentionHooks(options);
    for (let seq = 1; seq <= 3; seq++) await apply(first, seq);
    // Damage point 2's record in the middle of the catalog.
    const catalogFile = diskRetentionPaths(retentionDir, 'disk0').catalog;
    const text = fs.readFileSync(catalogFile);
    const at = text.indexOf('"seq":2');
    text[at + 6] = '7'.charCodeAt(0);
    fs.writeFileSync(catalogFile, text);
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-1', out: `raw:${path.join(dir, 'x.img')}` })).rejects.toMatchObject({ code: 'BR_RETENTION_CATALOG_CORRUPT' });

    const restarted = new RetentionHooks(options);
    await apply(restarted, 4);
    await target.close();
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => p.seq)).toEqual([1, 3, 4]);
    for (const p of points) {
      const out = path.join(dir, `s${p.seq}.img`);
      await failover({ retentionDir, diskId: 'disk0', point: p.id, out: `raw:${out}` });
      expect(fs.readFileSync(out).equals(images[p.seq]!)).toBe(true);
    }
  });

  it('names a missing segment a point needs', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const target = await rawTarget(dir, Buffer.alloc(DISK_BYTES));
    const hooks = new RetentionHooks({ dir: retentionDir, windowHours: 24, stateDir: path.join(dir, 'state'), inboxDir: path.join(dir, 'inbox') });
    const model = Buffer.alloc(DISK_BYTES);
    for (let seq = 1; seq <= 3; seq++) {
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: Date.now() - (5 - seq) * 60_000 }, model, prng(seq));
      const e: SpoolEntry = { envelope: log.envelope, file: log.file, sizeBytes: log.envelope.logLength };
      await hooks.beforeApply('disk0', e, target);
      await hrlLogOps.apply(log.file, target);
      await hooks.afterApply('disk0', e);
    }
    await target.close();
    const journal = new UndoJournal(diskRetentionPaths(retentionDir, 'disk0').journalDir);
    fs.rmSync(journal.file(3));
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-1', out: `raw:${path.join(dir, 'x.img')}` })).rejects.toMatchObject({ code: 'BR_RETENTION_JOURNAL_MISSING', details: { file: journal.file(3) } });
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-3', out: `raw:${path.join(dir, 'y.img')}` });
    expect(fs.readFileSync(path.join(dir, 'y.img')).equals(model)).toBe(true);
  });
});
