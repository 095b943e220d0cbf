import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { networkedResync } from '../../src/resync/networked-resync';
import { failover, loadPoints } from '../../src/retention/failover';
import { resyncJournalFor } from '../../src/retention/resync-journal';
import { openDisk } from '../../src/targets/disk-spec';
import type { ApplyingHop } from '../../src/transport/master-target';
import { useTempDirs } from '../helpers/tmp';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, startMasterTarget, useRetentionDirs } from '../retention/retention-fixture';
import { FAST_RETRY, SECRET } from './transport-fixture';

const MINUTE_MS = 60_000;

/**
 * Writes the source image in place, as a disk changes: a resync may be
 * reading it meanwhile, and writeFileSync's truncate would let a read see
 * zeroes (or the end of the file) where unchanged data stands.
 */
function writeInPlace(file: string, data: Buffer): void {
  const fd = fs.openSync(file, fs.existsSync(file) ? 'r+' : 'w');
  try {
    fs.writeSync(fd, data, 0, data.length, 0);
  } finally {
    fs.closeSync(fd);
  }
}

describe('networked resync into a master target that keeps recovery points', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
  });

  it('journals the blocks a session overwrites: points before it rebuild byte for byte, its end is no point, later points are exact', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    const rand = prng(17);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    // The protected disk: logs 1-3 replicate it; then it changes where tracking saw nothing.
    const source = Buffer.alloc(DISK_BYTES);
    const images = new Map<number, Buffer>();
    const logDir = path.join(dir, 'src');
    for (const seq of [1, 2, 3]) {
      const log = await makePatternLog(logDir, 'disk0', { seq, cutTimeMs: baseMs + seq * MINUTE_MS }, source, rand);
      await sendAll(mt, [log]);
      images.set(seq, Buffer.from(source));
    }
    await mt.drain();
    for (let i = 0; i < 64; i++) {
      const offset = Math.floor(rand() * (DISK_BYTES / 4096)) * 4096;
      source.fill(Math.floor(rand() * 256), offset, offset + 4096);
    }
    const sourceFile = path.join(dir, 'source.img');
    writeInPlace(sourceFile, source);

    // Log 4 is written at the source during the resync and arrives while the session holds the disk.
    let log4: Promise<void> | undefined;
    const result = await networkedResync(`raw:${sourceFile}`, {
      peer: { url: mt.url, secret: SECRET },
      diskId: 'disk0',
      statePath: path.join(dir, 'resync.state'),
      cut: async () => 3,
      retryPolicy: FAST_RETRY,
      windowBytes: 256 * 1024,
      progressIntervalMs: 0,
      onProgress: () => {
        log4 ??= (async () => {
          const log = await makePatternLog(logDir, 'disk0', { seq: 4, cutTimeMs: baseMs + 4 * MINUTE_MS }, source, rand);
          writeInPlace(sourceFile, source);
          await sendAll(mt, [log]);
        })();
      },
    });
    await log4;
    expect(result.blocksSent).toBeGreaterThan(0);
    const log5 = await makePatternLog(logDir, 'disk0', { seq: 5, cutTimeMs: baseMs + 5 * MINUTE_MS }, source, rand);
    await sendAll(mt, [log5]);
    await mt.drain();
    images.set(5, Buffer.from(source));
    expect(fs.readFileSync(setup.targetSpec('disk0').slice(4)).equals(source)).toBe(true);

    // The session took slot 4 (after applied log 3): a resync point, never offered.
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => [p.seq, p.resync === true])).toEqual([[1, false], [2, false], [3, false], [4, true], [5, false]]);
    for (const seq of [1, 2, 3, 5]) {
      const out = path.join(dir, `point-${seq}.img`);
      await failover({ retentionDir, diskId: 'disk0', point: `disk0-${seq}`, out: `raw:${out}` });
      expect(fs.readFileSync(out).equals(images.get(seq)!), `point ${seq}`).toBe(true);
    }
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-4', out: `raw:${path.join(dir, 'no.img')}` })).rejects.toMatchObject({ code: 'BR_POINT_UNKNOWN' });
  });

  it('keeps older points exact when a second session follows the first before any log', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    const rand = prng(23);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const log1 = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 1, cutTimeMs: baseMs }, source, rand);
    await sendAll(mt, [log1]);
    await mt.drain();
    const point1 = Buffer.from(source);
    const sourceFile = path.join(dir, 'source.img');
    for (const round of [0, 1]) {
      for (let i = 0; i < 32; i++) {
        const offset = Math.floor(rand() * (DISK_BYTES / 4096)) * 4096;
        source.fill(round * 16 + i, offset, offset + 4096);
      }
      writeInPlace(sourceFile, source);
      await networkedResync(`raw:${sourceFile}`, { peer: { url: mt.url, secret: SECRET }, diskId: 'disk0', statePath: path.join(dir, `resync-${round}.state`), retryPolicy: FAST_RETRY });
      // Between and after sessions the points stay rebuildable.
      const out = path.join(dir, `point-1-${round}.img`);
      await failover({ retentionDir, diskId: 'disk0', point: 'disk0-1', out: `raw:${out}` });
      expect(fs.readFileSync(out).equals(point1), `point 1 after session ${round}`).toBe(true);
    }
    // Log 2 fills the sessions' slot (its end is the resync point); log 3 ends the next real point.
    // Both are cut after the resyncs' last reads (a resync without a cut taints logs cut before then).
    const afterMs = Date.now() + 1000;
    const log2 = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 2, cutTimeMs: afterMs }, source, rand);
    const log3 = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 3, cutTimeMs: afterMs + MINUTE_MS }, source, rand);
    await sendAll(mt, [log2, log3]);
    await mt.drain();
    const out = path.join(dir, 'point-1-final.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-1', out: `raw:${out}` });
    expect(fs.readFileSync(out).equals(point1)).toBe(true);
    const latest = path.join(dir, 'point-3.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-3', out: `raw:${latest}` });
    expect(fs.readFileSync(latest).equals(source)).toBe(true);
  });

  it('finishes the slot of a session the master target died in from its durable pre-images: older points rebuild exactly', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const first = await startMasterTarget(setup);
    running.push(first.mt);
    const rand = prng(29);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const logDir = path.join(dir, 'src');
    const images = new Map<number, Buffer>();
    for (const seq of [1, 2]) {
      await sendAll(first.mt, [await makePatternLog(logDir, 'disk0', { seq, cutTimeMs: baseMs + seq * MINUTE_MS }, source, rand)]);
      images.set(seq, Buffer.from(source));
    }
    await first.mt.drain();

    // A session starts and overwrites a block, then the master target dies before the session ends.
    const target = await openDisk(setup.targetSpec('disk0'));
    const session = (await resyncJournalFor(first.hooks)!.openSession('disk0', target, 2, 'c'.repeat(32)))!;
    expect(session).toBeDefined();
    await session.preserve(target, 0, 4096);
    await target.write(0, Buffer.alloc(4096, 0xee));
    await target.close();
    // The process dies: its session log stays unsealed (closed here only to free the descriptor).
    await (session as unknown as { writer: { close(): Promise<void> } }).writer.close();
    // While the session is open no point rebuilds from a changing target: it fails, coded.
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-1', out: `raw:${path.join(dir, 'during.img')}` })).rejects.toMatchObject({ code: 'BR_RETENTION_JOURNAL_MISSING' });
    await first.mt.stop();
    running.splice(0);

    const second = await startMasterTarget(setup);
    running.push(second.mt);
    source.fill(0xee, 0, 4096);
    await sendAll(second.mt, [await makePatternLog(logDir, 'disk0', { seq: 3, cutTimeMs: baseMs + 3 * MINUTE_MS }, source, rand)]);
    await sendAll(second.mt, [await makePatternLog(logDir, 'disk0', { seq: 4, cutTimeMs: baseMs + 4 * MINUTE_MS }, source, rand)]);
    await second.mt.drain();
    // The session's pre-images were durable before its write: its slot (3) is finished from them, nothing is dropped.
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => [p.seq, p.resync === true])).toEqual([[1, false], [2, false], [3, true], [4, false]]);
    for (const seq of [1, 2]) {
      const out = path.join(dir, `point-${seq}.img`);
      await failover({ retentionDir, diskId: 'disk0', point: `disk0-${seq}`, out: `raw:${out}` });
      expect(fs.readFileSync(out).equals(images.get(seq)!), `point ${seq}`).toBe(true);
    }
    const out = path.join(dir, 'point-4.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-4', out: `raw:${out}` });
    expect(fs.readFileSync(out).equals(source)).toBe(true);
  });

  it('offers no point for the logs sealed while the resync read the source; the first log sealed after it is exact', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    const rand = prng(37);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const sourceFile = path.join(dir, 'source.img');
    const images = new Map<number, Buffer>();
    const logDir = path.join(dir, 'src');
    let nextSeq = 1;
    /** The source's cut: its writes since the last cut become the next log, shipped at once. */
    const cut = async (): Promise<number> => {
      const seq = nextSeq++;
      const log = await makePatternLog(logDir, 'disk0', { seq, cutTimeMs: baseMs + seq * MINUTE_MS }, source, rand);
      writeInPlace(sourceFile, source);
      images.set(seq, Buffer.from(source));
      await sendAll(mt, [log]);
      return seq;
    };
    await cut();
    await cut();
    await mt.drain();
    /** Changes tracking never saw, made right after the anchor's cut: only the resync carries them. */
    const untracked = (): void => {
      for (let i = 0; i < 48; i++) {
        const offset = Math.floor(rand() * (DISK_BYTES / 4096)) * 4096;
        source.fill(0x80 + i, offset, offset + 4096);
      }
      writeInPlace(sourceFile, source);
    };

    let during: Promise<unknown> | undefined;
    const result = await networkedResync(`raw:${sourceFile}`, {
      peer: { url: mt.url, secret: SECRET },
      diskId: 'disk0',
      statePath: path.join(dir, 'resync.state'),
      // The cut after the last read comes after the two cuts made during the reads.
      cut: async () => {
        if (during === undefined) {
          const anchor = await cut();
          untracked();
          return anchor;
        }
        await during;
        return cut();
      },
      retryPolicy: FAST_RETRY,
      windowBytes: 256 * 1024,
      progressIntervalMs: 0,
      // Two cuts while the resync reads: logs 4 and 5.
      onProgress: () => {
        during ??= (async () => {
          await cut();
          await cut();
        })();
      },
    });
    await during;
    expect(result.afterSeq).toBe(3);
    expect(result.endConfirmed).toBe(true);
    await cut();
    await mt.drain();

    const { points } = await loadPoints(retentionDir, 'disk0');
    // 4: the session's slot; 5: sealed during the reads; 6: sealed after the last read.
    expect(points.map((p) => [p.seq, p.resync === true])).toEqual([[1, false], [2, false], [3, false], [4, true], [5, true], [6, false], [7, false]]);
    for (const seq of [1, 3, 6, 7]) {
      const out = path.join(dir, `point-${seq}.img`);
      await failover({ retentionDir, diskId: 'disk0', point: `disk0-${seq}`, out: `raw:${out}` });
      expect(fs.readFileSync(out).equals(images.get(seq)!), `point ${seq}`).toBe(true);
    }
  });
});
