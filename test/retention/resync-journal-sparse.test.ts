import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { failover, loadPoints } from '../../src/retention/failover';
import { resyncJournalFor } from '../../src/retention/resync-journal';
import { openDisk } from '../../src/targets/disk-spec';
import { HrlLogFile } from '../../src/tracking/hrl-reader';
import type { ApplyingHop } from '../../src/transport/master-target';
import { useTempDirs } from '../helpers/tmp';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, startMasterTarget, useRetentionDirs } from './retention-fixture';

const KiB = 1024;
const MiB = 1024 * KiB;
const MINUTE_MS = 60_000;

/** Bytes the complete undo segments of a journal directory occupy (allocated blocks). */
function occupiedBytes(journalDir: string): number {
  return fs
    .readdirSync(journalDir)
    .filter((n) => n.endsWith('.undo.hrl'))
    .reduce((n, name) => n + fs.statSync(path.join(journalDir, name)).blocks * 512, 0);
}

/** Checks every payload of a sealed journal file against `image` (the disk content it must restore), byte for byte. */
async function expectPayloadsOf(file: string, image: Buffer): Promise<number> {
  const log = await HrlLogFile.open(file);
  let bytes = 0;
  try {
    const verified = await log.verify({ diskSizeBytes: image.length, checkPayloads: true });
    for await (const e of log.entries(verified)) {
      const payload = await log.readPayload(e, 0, e.dataLength);
      expect(payload.equals(image.subarray(e.byteOffset, e.byteOffset + e.dataLength)), `entry at disk byte ${e.byteOffset}`).toBe(true);
      bytes += e.dataLength;
    }
  } finally {
    await log.close();
  }
  return bytes;
}

describe('resync journal files with holes', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
  });

  it.each(['raw', 'vmdk'] as const)('a session over never-written %s ranges leaves its slot mostly holes, holding the exact pre-images, counted by what it occupies', async (kind) => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir, ['disk0'], kind);
    const first = await startMasterTarget(setup);
    running.push(first.mt);
    const rand = prng(0x5e55);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const logDir = path.join(dir, 'src');
    // Log 1 writes the first MiB only; the rest of the target was never written.
    await sendAll(first.mt, [await makePatternLog(logDir, 'disk0', { seq: 1, cutTimeMs: baseMs, writes: 40, region: { offset: 0, length: MiB } }, source, rand)]);
    await first.mt.drain();
    await first.mt.stop();
    running.splice(0);
    const point1 = Buffer.from(source);

    const target = await openDisk(setup.targetSpec('disk0'));
    const session = (await resyncJournalFor(first.hooks)!.openSession('disk0', target, 1, 'f'.repeat(32)))!;
    // Eight 64 KiB writes where nothing was written, and one over log 1's data.
    const writes = [0, ...Array.from({ length: 8 }, (_, i) => 2 * MiB + i * 128 * KiB)];
    const zeroBytes = 8 * 64 * KiB;
    for (const offset of writes) {
      await session.preserve(target, offset, 64 * KiB);
      const data = Buffer.alloc(64 * KiB, 0xc0 + (offset % 37));
      await target.write(offset, data);
      data.copy(source, offset);
    }
    await session.finish(target);
    await target.close();

    const h = await first.hooks.history('disk0');
    const slot = h.journal.file(2);
    const sizeBytes = fs.statSync(slot).size;
    expect(await expectPayloadsOf(slot, point1)).toBe(zeroBytes + 64 * KiB);
    expect(fs.statSync(slot).blocks * 512).toBeLessThan(sizeBytes - zeroBytes / 2);
    // The hooks count the new slot by what it occupies, as a restart would.
    expect(h.journalBytes).toBe(occupiedBytes(h.journal.dir));

    // Log 2 arrives (it writes never-written ranges too): the slot gains its pre-images, again as holes.
    const second = await startMasterTarget(setup);
    running.push(second.mt);
    await sendAll(second.mt, [await makePatternLog(logDir, 'disk0', { seq: 2, cutTimeMs: baseMs + MINUTE_MS, writes: 40, region: { offset: 3 * MiB, length: MiB } }, source, rand)]);
    await second.mt.drain();
    const merged = await expectPayloadsOf(slot, point1);
    expect(merged).toBeGreaterThan(zeroBytes + 64 * KiB);
    expect(fs.statSync(slot).blocks * 512).toBeLessThan(fs.statSync(slot).size - (merged - 64 * KiB) / 2);
    expect(fs.readdirSync(h.journal.dir).filter((n) => n.includes('resync'))).toEqual([]);
    // A VMDK target is opened once per process: the hop lets go of it before failover reads it.
    await second.mt.stop();
    running.splice(0);

    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => p.seq)).toEqual([1, 2]);
    const out = path.join(dir, 'point-1.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-1', out: `raw:${out}` });
    expect(fs.readFileSync(out).equals(point1)).toBe(true);
  });
});
