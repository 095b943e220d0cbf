import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import type { Clock } from '../platform/clock';
import { isBlockrelayError } from '../retry/blockrelay-error';
import { DirtyMap } from './dirty-map';
import { randomGuid } from './hrl-format';
import { HrlLogFile } from './hrl-reader';
import { recoverHrlLog } from './hrl-recovery';
import { syncDirectory } from '../platform/durable-file';
import {
  SEALED_LOG_SUFFIX,
  SIDECAR_SUFFIX,
  logBaseName,
  parseLogName,
  parseSidecar,
  readJsonFile,
  writeFileAtomic,
  type LogSidecar,
  type TrackerMaps,
} from './tracker-files';

/**
 * The steps of ChangeTracker.open that repair what a crash left in a
 * tracker directory. They work on the maps read from disk and add to
 * `reasons` every reason for a resync they find.
 */

/**
 * `torn-rewrite`: the crash tore an in-place rewrite of the pending log;
 * `pending-after-crash`: the pending log survived whole, but a rewrite in
 * it may have been lost without a trace (see recoverOpenLogs).
 */
export type ResyncReason = 'overflow' | 'dirty-map-lost' | 'torn-tail' | 'torn-rewrite' | 'pending-after-crash' | 'log-lost' | 'log-io-error' | 'write-intent';

/** A sealed log waiting to be shipped. */
export interface SealedLogInfo extends LogSidecar {
  /** File name, e.g. `disk0-000000000007.hrl`; lexical order is apply order. */
  readonly name: string;
  readonly path: string;
  readonly sidecarPath: string;
}

interface RecoveryContext {
  readonly dir: string;
  readonly diskId: string;
  readonly clock: Clock;
  /** The directory listing; recovered logs' new names are added to it. */
  readonly names: string[];
  readonly maps: TrackerMaps;
  readonly reasons: ResyncReason[];
}

function recoveredSidecar(diskId: string, sequence: number, fields: Pick<LogSidecar, 'uniqueId' | 'previousUniqueId' | 'sizeBytes' | 'entryCount'>, clock: Clock): LogSidecar {
  const nowMs = clock.now();
  return { version: 1, diskId, sequence, ...fields, cutId: `recovered-${randomGuid()}`, cutTime: new Date(nowMs).toISOString(), cutTimeMs: nowMs, recovered: true };
}

/**
 * Unsealed logs (`.hrl.open`): recovers the durable part, seals it, writes
 * its sidecar and gives it its sealed name. A log whose header is
 * unreadable is set aside as `.corrupt` and every unshipped extent is
 * resynced.
 *
 * The log `pending` belongs to is recovered tolerating torn in-place
 * rewrites below the persisted `durableLogEndBytes` (a flush made all of it
 * durable once; the writer rewrites an entry in place when the same extent
 * is written again): their extents become resync extents (`torn-rewrite`)
 * and the log is not cut there. Other open logs had no flush answered on
 * them since the maps were written (every flush that covers a write
 * persists maps naming the active log), so nothing in them was acknowledged
 * and they are recovered strictly.
 *
 * The pending extents become resync extents whenever that log is recovered
 * and `pending` is not empty: when the log ends before the end recorded
 * with `pending` its tail was torn (`torn-tail`); when it reaches that end,
 * a rewrite recorded before the maps were persisted may still have been
 * lost whole (old entry and old payload: no trace) when no completed log
 * sync covered it; its write intent goes once a persist that recorded it is
 * intentIdleClearMs old and the region idle, leaving `pending` as its only
 * trace (`pending-after-crash`). This costs one flush interval's extents after a
 * crash, whether or not anything was rewritten: the maps do not record it.
 */
export async function recoverOpenLogs(ctx: RecoveryContext & { openLogs: readonly { n: string; seq: number | undefined }[] }): Promise<void> {
  const { dir, diskId, clock, names, maps, reasons } = ctx;
  for (const { n, seq } of ctx.openLogs) {
    const file = path.join(dir, n);
    try {
      const isPending = seq === maps.pendingLogSequence;
      const hints = isPending ? [maps.pendingLogEndBytes, maps.durableLogEndBytes] : [];
      const rec = await recoverHrlLog(file, { clock, hintEndBytes: hints, rewritableBelowBytes: isPending ? maps.durableLogEndBytes : 0 });
      const sidecar = recoveredSidecar(diskId, seq!, { uniqueId: rec.header.uniqueId, previousUniqueId: rec.header.previousUniqueId, sizeBytes: rec.durableEndBytes, entryCount: rec.entryCount }, clock);
      await writeFileAtomic(path.join(dir, logBaseName(diskId, seq!) + SIDECAR_SUFFIX), JSON.stringify(sidecar, null, 2));
      await fsp.rename(file, path.join(dir, logBaseName(diskId, seq!) + SEALED_LOG_SUFFIX));
      names.push(logBaseName(diskId, seq!) + SEALED_LOG_SUFFIX);
      for (const t of rec.tornEntries) if (t.dataLength > 0) maps.resync.mark(t.byteOffset, t.dataLength);
      if (rec.tornEntries.length > 0) reasons.push('torn-rewrite');
      if (isPending && maps.pending.dirtyBlockCount > 0) {
        // A log shorter than the end recorded with pending lost its tail; one
        // that reaches it may still have lost a rewrite (see above).
        maps.resync.merge(maps.pending);
        reasons.push(rec.durableEndBytes >= maps.pendingLogEndBytes ? 'pending-after-crash' : 'torn-tail');
      }
    } catch (err) {
      if (!(isBlockrelayError(err) && err.code.startsWith('BR_HRL_'))) throw err;
      // The header itself is damaged: nothing in the log can be trusted.
      await fsp.rename(file, `${file}.corrupt`).catch(() => undefined);
      maps.resync.merge(maps.dirty);
      reasons.push('log-lost');
    }
  }
  const sealedSeqs = names.map((n) => parseLogName(diskId, n, SEALED_LOG_SUFFIX)).filter((x) => x !== undefined);
  if (maps.pendingLogSequence !== 0 && !sealedSeqs.includes(maps.pendingLogSequence) && maps.pending.dirtyBlockCount > 0) {
    // The log the pending writes went to is gone altogether.
    maps.resync.merge(maps.pending);
    reasons.push('log-lost');
  }
  maps.pending.clearAll();
  await syncDirectory(dir);
}

/**
 * Sealed logs: reads each one's metadata (which checks it and gives its
 * extents) and its sidecar, rebuilding a missing sidecar from the header.
 * A log that fails is set aside as `.corrupt` and every unshipped extent is
 * resynced.
 */
export async function loadSealedLogs(ctx: RecoveryContext & { diskSizeBytes: number; granularityBytes: number }): Promise<{ sealed: SealedLogInfo[]; logMaps: Map<string, DirtyMap> }> {
  const { dir, diskId, clock, names, maps, reasons } = ctx;
  const sealed: SealedLogInfo[] = [];
  const logMaps = new Map<string, DirtyMap>();
  const found = names.map((n) => ({ n, seq: parseLogName(diskId, n, SEALED_LOG_SUFFIX) })).filter((x) => x.seq !== undefined).sort((a, b) => a.seq! - b.seq!);
  for (const { n, seq } of found) {
    const file = path.join(dir, n);
    const sidecarPath = path.join(dir, logBaseName(diskId, seq!) + SIDECAR_SUFFIX);
    let sidecar: LogSidecar | undefined;
    try {
      logMaps.set(n, await logExtents(file, ctx.diskSizeBytes, ctx.granularityBytes));
      const json = await readJsonFile(sidecarPath);
      sidecar = json === undefined ? undefined : parseSidecar(json, sidecarPath);
      if (sidecar === undefined) {
        const log = await HrlLogFile.open(file);
        const header = await log.readHeader().finally(() => log.close());
        sidecar = recoveredSidecar(diskId, seq!, { uniqueId: header.uniqueId, previousUniqueId: header.previousUniqueId, sizeBytes: header.eolLocation, entryCount: header.totalMetadataEntries }, clock);
        await writeFileAtomic(sidecarPath, JSON.stringify(sidecar, null, 2));
      }
    } catch (err) {
      if (!(isBlockrelayError(err) && (err.code.startsWith('BR_HRL_') || err.code === 'BR_TRACKER_STATE_CORRUPT'))) throw err;
      await fsp.rename(file, `${file}.corrupt`).catch(() => undefined);
      logMaps.delete(n);
      maps.resync.merge(maps.dirty);
      reasons.push('log-lost');
      continue;
    }
    sealed.push({ ...sidecar, name: n, path: file, sidecarPath });
  }
  return { sealed, logMaps };
}

/** The extents a sealed log writes, from its metadata alone (which is checked on the way). */
export async function logExtents(file: string, diskSizeBytes: number, granularityBytes: number): Promise<DirtyMap> {
  const map = new DirtyMap(diskSizeBytes, granularityBytes);
  const log = await HrlLogFile.open(file);
  try {
    const v = await log.verify({ checkPayloads: false, diskSizeBytes });
    for await (const e of log.entries(v)) if (e.dataLength > 0) map.mark(e.byteOffset, e.dataLength);
  } finally {
    await log.close();
  }
  return map;
}
