import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { ChangeTracker, type ResyncReport } from '../../src/tracking/change-tracker';
import { HrlLogFile } from '../../src/tracking/hrl-reader';
import { recoverHrlLog } from '../../src/tracking/hrl-recovery';
import { OPEN_LOG_SUFFIX, parseLogName, readTrackerMaps } from '../../src/tracking/tracker-files';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const DISK = 1024 * 1024;
const LOG = 'disk0-000000000001.hrl.open';

const opened: ChangeTracker[] = [];
afterEach(async () => {
  for (const t of opened.splice(0)) await t.close({ seal: false }).catch(() => undefined);
});

async function open(dir: string, extra: Partial<Parameters<typeof ChangeTracker.open>[0]> = {}): Promise<ChangeTracker> {
  const t = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, metadataSizeBytes: 512, persistIntervalMs: 0, clock: new SimulatedClock(), coalesceMinBytes: 1, ...extra });
  opened.push(t);
  return t;
}

/** Disk offsets of the entries in the one sealed log, and each payload's position in the log file. */
async function logEntries(file: string): Promise<{ byteOffset: number; payloadFileOffset: number }[]> {
  const log = await HrlLogFile.open(file);
  try {
    const v = await log.verify();
    const out: { byteOffset: number; payloadFileOffset: number }[] = [];
    for await (const e of log.entries(v)) out.push({ byteOffset: e.byteOffset, payloadFileOffset: e.payloadFileOffset });
    return out;
  } finally {
    await log.close();
  }
}

/**
 * Two flushed rounds, then a crash: A's round (4 writes) lies below the
 * durable end persisted with the maps, B's round (2 writes) is the pending
 * one. Returns where A's and B's payloads lie in the open log.
 */
async function twoRounds(dir: string): Promise<{ payloadAt: Map<number, number> }> {
  const t = await open(dir);
  for (let i = 0; i < 4; i++) await t.recordWrite(i * 8192, Buffer.alloc(4096, 0x10 + i));
  await t.flush();
  for (let i = 4; i < 6; i++) await t.recordWrite(i * 8192, Buffer.alloc(4096, 0x10 + i));
  await t.flush();
  // Crash: nothing is closed. Read the payload positions from a recovered copy.
  const copy = path.join(dir, 'copy.hrl');
  fs.copyFileSync(path.join(dir, LOG), copy);
  await recoverHrlLog(copy);
  const payloadAt = new Map((await logEntries(copy)).map((e) => [e.byteOffset, e.payloadFileOffset]));
  fs.rmSync(copy);
  expect(payloadAt.size).toBe(6);
  return { payloadAt };
}

function tearPayload(dir: string, at: number): void {
  const fd = fs.openSync(path.join(dir, LOG), 'r+');
  try {
    fs.writeSync(fd, Buffer.alloc(512, 0xee), 0, 512, at); // one sector of a new version, the old entry
  } finally {
    fs.closeSync(fd);
  }
}

describe('tracker recovery of torn in-place rewrites', () => {
  it('keeps the flushed blocks after a torn rewrite below the persisted durable end and resyncs the torn extent', async () => {
    const dir = tempDir();
    const { payloadAt } = await twoRounds(dir);
    tearPayload(dir, payloadAt.get(1 * 8192)!);
    const reports: ResyncReport[] = [];
    const t2 = await open(dir, { onResyncRequired: (r) => reports.push(r) });
    const logs = t2.sealedLogs();
    expect(logs).toHaveLength(1);
    expect(logs[0]).toMatchObject({ recovered: true, entryCount: 6 });
    expect((await logEntries(logs[0]!.path)).map((e) => e.byteOffset)).toEqual([0, 1, 2, 3, 4, 5].map((i) => i * 8192));
    // The torn extent, and the pending round (its log sync is not known to have completed).
    expect([...t2.resyncExtents()]).toEqual([1, 4, 5].map((i) => ({ offset: i * 8192, length: 4096 })));
    expect(reports.map((r) => r.reason)).toEqual(['torn-rewrite', 'pending-after-crash']);
  });

  it('resyncs the pending round even when the log reaches its recorded end, since a rewrite in it may be lost whole', async () => {
    const dir = tempDir();
    await twoRounds(dir);
    const t2 = await open(dir);
    expect(t2.sealedLogs()[0]).toMatchObject({ entryCount: 6 });
    expect([...t2.resyncExtents()]).toEqual([4, 5].map((i) => ({ offset: i * 8192, length: 4096 })));
    expect(t2.status().lastResyncReason).toBe('pending-after-crash');
  });

  it('treats a bad payload past the persisted durable end as a torn tail: the log is cut there and the pending round resynced', async () => {
    const dir = tempDir();
    const { payloadAt } = await twoRounds(dir);
    tearPayload(dir, payloadAt.get(4 * 8192)!);
    const t2 = await open(dir);
    expect(t2.sealedLogs()[0]).toMatchObject({ entryCount: 4 });
    expect([...t2.resyncExtents()]).toEqual([4, 5].map((i) => ({ offset: i * 8192, length: 4096 })));
    expect(t2.status().lastResyncReason).toBe('torn-tail');
  });

  it('never persists maps naming a log while an older log is still open, so only the pending log can hold acknowledged rewrites', async () => {
    // recoverOpenLogs recovers every open log but the pending one strictly:
    // right only while a log is sealed (and synced) before the maps name the next.
    const dir = tempDir();
    const t = await open(dir);
    let newestNamed = 0;
    const check = async (step: string): Promise<void> => {
      const maps = await readTrackerMaps(dir, 'disk0');
      if (maps === undefined || maps.pendingLogSequence === 0) return;
      newestNamed = Math.max(newestNamed, maps.pendingLogSequence);
      const open = fs.readdirSync(dir).map((n) => parseLogName('disk0', n, OPEN_LOG_SUFFIX)).filter((x) => x !== undefined);
      expect(open.filter((seq) => seq < maps.pendingLogSequence), step).toEqual([]);
    };
    for (let round = 0; round < 6; round++) {
      await t.recordWrite(round * 8192, Buffer.alloc(4096, round + 1));
      await t.recordWrite(round * 8192, Buffer.alloc(4096, round + 0x41)); // an exact overwrite: a rewrite
      await t.flush();
      await check(`round ${round} after flush`);
      await t.rotate();
      await check(`round ${round} after rotate`);
      if (round % 2 === 0) {
        await t.flush();
        await check(`round ${round} after an idle flush`);
      }
    }
    expect(newestNamed).toBeGreaterThanOrEqual(6);
  });
});
