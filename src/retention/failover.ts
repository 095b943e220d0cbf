import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { silentLogger } from '../daemon/logger';
import { syncDirectory } from '../platform/durable-file';
import { createMetrics } from '../daemon/metrics';
import { resolvesWithin, systemClock, type Clock } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import { copyDisk, ZERO_SCAN_BYTES, type CopyResult } from '../targets/disk-copy';
import { openDisk, parseDiskSpec } from '../targets/disk-spec';
import type { AllocationExtent, DiskTarget } from '../targets/disk-target';
import { hrlLogOps } from '../transport/hrl-log-ops';
import { ApplyingHop } from '../transport/master-target';
import { seqName } from '../transport/transport-protocol';
import { isSnapshotTarget, snapshotIdOf } from './blob-snapshots';
import { PointView } from './point-view';
import { diskRetentionPaths } from './retention-format';
import { RetentionHooks } from './retention-hooks';
import { failoverComplete, listRetentionDisks, readAppliedSeq, readFailoverRecord, readManifest, writeFailoverRecord, type DiskManifest, type FailoverRecord } from './retention-manifest';
import { StateLock } from '../daemon/state-lock';
import { PointCatalog, resolvePoint, selectablePoints, type RecoveryPoint } from './recovery-points';
import { allocatedBytesOf } from './undo-journal';

/** How long `--point latest` waits for pending logs by default. */
export const FAILOVER_DRAIN_TIMEOUT_MS = 10 * 60_000;
/** How often a running master target's inbox is checked while waiting for it. */
const INBOX_POLL_MS = 200;

/** The disk's applied points, oldest first (the master target's ledger settles the newest). */
export async function loadPoints(retentionDir: string, diskId: string): Promise<{ manifest: DiskManifest; points: RecoveryPoint[] }> {
  const manifest = await readManifest(retentionDir, diskId);
  const catalog = new PointCatalog(diskRetentionPaths(retentionDir, diskId).catalog, diskId);
  const { points } = await catalog.read(readAppliedSeq(manifest.stateDir, diskId));
  return { manifest, points };
}

/** Logs in the disk's inbox not applied yet. */
export function pendingLogs(manifest: DiskManifest): number[] {
  if (!fs.existsSync(manifest.inboxDir)) return [];
  const applied = readAppliedSeq(manifest.stateDir, manifest.diskId) ?? -1;
  return fs
    .readdirSync(manifest.inboxDir)
    .map((n) => /^(\d{20})\.hrl$/.exec(n))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .filter((seq) => seq > applied)
    .sort((a, b) => a - b);
}

/**
 * Applies everything still pending in the disk's inbox (for `--point
 * latest`), journaling as the master target does. If the master target is
 * running (it holds the state directory's lock), it is the one applying:
 * this waits until its inbox for the disk is empty.
 */
export async function drainPending(retentionDir: string, manifest: DiskManifest, options: { timeoutMs?: number; clock?: Clock } = {}): Promise<{ applied: number }> {
  const before = pendingLogs(manifest);
  if (before.length === 0) return { applied: 0 };
  const timeoutMs = options.timeoutMs ?? FAILOVER_DRAIN_TIMEOUT_MS;
  const deadline = Date.now() + timeoutMs;
  const hooks = new RetentionHooks({ dir: retentionDir, windowHours: manifest.windowHours, stateDir: manifest.stateDir, inboxDir: path.dirname(manifest.inboxDir), ...(options.clock ? { clock: options.clock } : {}) });
  const hop = new ApplyingHop(
    {
      stateDir: manifest.stateDir,
      listen: '127.0.0.1:0',
      secret: randomBytes(24).toString('hex'),
      spoolDir: path.dirname(manifest.inboxDir),
      spoolMaxBytes: Number.MAX_SAFE_INTEGER,
      rpoThresholdSeconds: 900,
      logOps: hrlLogOps,
      hooks,
      hopName: 'failover-drain',
      logger: silentLogger(),
      metrics: createMetrics({ defaultMetrics: false }),
    },
    new Map([[manifest.diskId, manifest.targetSpec]]),
  );
  let started = false;
  try {
    await hop.start();
    started = true;
  } catch (err) {
    if ((err as BlockrelayError).code !== 'BR_LOCKED') throw err;
  }
  if (started) {
    const done = await resolvesWithin(hop.drain(), timeoutMs);
    await hop.stop();
    if (!done) throw new BlockrelayError('BR_POINT_PENDING_TIMEOUT', `disk ${manifest.diskId}: pending logs were not applied within ${timeoutMs} ms`, { details: { disk: manifest.diskId } });
  } else {
    while (pendingLogs(manifest).length > 0) {
      if (Date.now() > deadline) {
        throw new BlockrelayError('BR_POINT_PENDING_TIMEOUT', `disk ${manifest.diskId}: the running master target did not apply ${pendingLogs(manifest).length} pending log(s) within ${timeoutMs} ms`, { details: { disk: manifest.diskId } });
      }
      await new Promise((r) => setTimeout(r, INBOX_POLL_MS));
    }
  }
  const left = pendingLogs(manifest);
  if (left.length > 0) {
    throw new BlockrelayError('BR_POINT_PENDING_TIMEOUT', `disk ${manifest.diskId}: log ${seqName(left[0]!)} could not be applied (the disk went Critical); fail over to latest-processed or fix the log`, { details: { disk: manifest.diskId } });
  }
  return { applied: before.length };
}

/**
 * A source whose data extents are widened outward to whole `granularityBytes`
 * blocks (and merged), everything else zero, so the copy reads in whole
 * 64 KiB scan blocks (ZERO_SCAN_BYTES) instead of the 512-byte page ranges
 * of a snapshot or the 4 KiB extents of a raw file. It began as the
 * workaround for copyDisk dropping the tail of data extents that were not
 * whole scan blocks (fixed in 7f073ec); it stays because fewer, larger
 * reads are cheaper, above all over the network, and the copy still skips
 * all-zero blocks.
 */
export class AlignedExtents implements DiskTarget {
  constructor(private readonly inner: DiskTarget, private readonly granularityBytes: number = ZERO_SCAN_BYTES) {}
  get spec(): string {
    return this.inner.spec;
  }
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get capabilities(): DiskTarget['capabilities'] {
    return this.inner.capabilities;
  }
  get diskUuid(): string | undefined {
    return this.inner.diskUuid;
  }
  read(offset: number, length: number): Promise<Buffer> {
    return this.inner.read(offset, length);
  }
  write(offset: number, data: Buffer): Promise<void> {
    return this.inner.write(offset, data);
  }
  writeZeroes(offset: number, length: number): Promise<void> {
    return this.inner.writeZeroes(offset, length);
  }
  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    const end = offset + length;
    const g = this.granularityBytes;
    let cursor = offset;
    let pending: { start: number; end: number } | undefined;
    for await (const ext of this.inner.extents(offset, length)) {
      if (ext.zero || ext.length === 0) continue;
      const s = Math.max(offset, Math.floor(ext.offset / g) * g);
      const e = Math.min(end, Math.ceil((ext.offset + ext.length) / g) * g);
      if (pending !== undefined && s <= pending.end) {
        pending.end = Math.max(pending.end, e);
        continue;
      }
      if (pending !== undefined) {
        yield { offset: pending.start, length: pending.end - pending.start, zero: false };
        cursor = pending.end;
      }
      if (s > cursor) yield { offset: cursor, length: s - cursor, zero: true };
      pending = { start: Math.max(s, cursor), end: e };
    }
    if (pending !== undefined) {
      yield { offset: pending.start, length: pending.end - pending.start, zero: false };
      cursor = pending.end;
    }
    if (cursor < end) yield { offset: cursor, length: end - cursor, zero: true };
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/**
 * What holds the disk as it was at the point: the page-blob snapshot taken
 * at it, or else a view of target plus undo journal.
 */
export async function openPointSource(retentionDir: string, manifest: DiskManifest, point: RecoveryPoint, newestSeq: number, verifyPayloads: 'open' | 'first-read' = 'open'): Promise<DiskTarget> {
  if (point.snapshot !== undefined) return openDisk(point.snapshot, { readOnly: true });
  return PointView.open({ retentionDir, manifest, point, newestSeq, verifyPayloads });
}

/** Raw target to a new raw file: the case a kernel copy of the target can serve. */
function rawToNewRaw(targetSpec: string, out: string, exists: boolean | undefined): { from: string; to: string } | undefined {
  const from = parseDiskSpec(targetSpec);
  const to = parseDiskSpec(out);
  if (from.kind !== 'raw' || to.kind !== 'raw' || exists !== false) return undefined;
  if (!fs.statSync(from.path).isFile()) return undefined;
  return { from: from.path, to: to.path };
}

/**
 * Failover of a raw target to a new raw file: the kernel copies the target
 * (libuv copyfile, so at `cp` speed and without passing the data through
 * JavaScript), then only the pre-image bytes are written over it, and the
 * output is flushed. The result is byte for byte what copying through the
 * view gives (see PointView.writeOverlayTo). A failure removes the output.
 */
async function copyRawThenOverlay(view: PointView, from: string, to: string): Promise<CopyResult> {
  const started = Date.now();
  try {
    await fsp.copyFile(from, to, fs.constants.COPYFILE_EXCL);
    const out = await openDisk(`raw:${to}`);
    try {
      if (out.sizeBytes !== view.sizeBytes) throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `target ${from} changed size during failover`, { details: { from } });
      const { bytes } = await view.writeOverlayTo(out);
      await out.flush();
      // The new file's name must survive a power loss too: failover.json names it.
      await syncDirectory(path.dirname(to));
      return { sizeBytes: view.sizeBytes, dataBytes: view.sizeBytes, writtenBytes: bytes, zeroBytes: 0, durationMs: Date.now() - started };
    } finally {
      await out.close();
    }
  } catch (err) {
    await fsp.rm(to, { force: true });
    throw err;
  }
}

/** A bare path means a new monolithicSparse VMDK (DESIGN.md: "a new VMDK by default"). */
export function normalizeOutSpec(out: string): string {
  if (out.startsWith('nbd://') || /^[a-z][a-z-]*:/.test(out)) return out;
  return `vmdk:${out}`;
}

function outExists(spec: string): boolean | undefined {
  const parsed = parseDiskSpec(spec);
  if (parsed.kind === 'blob' || parsed.kind === 'nbd') return undefined;
  return fs.existsSync(parsed.path);
}

export interface FailoverOptions {
  readonly retentionDir: string;
  readonly diskId: string;
  /** latest, latest-processed, latest-app, an ISO time, a point id or a cut id. */
  readonly point: string;
  readonly out: string;
  readonly clock?: Clock;
  readonly drainTimeoutMs?: number;
}

export interface FailoverResult {
  readonly diskId: string;
  readonly point: RecoveryPoint;
  readonly out: string;
  /** Pending logs applied first (for `latest`). */
  readonly drainedLogs: number;
  /** Pre-image logs read to rebuild the point. */
  readonly journalSegments: number;
  readonly copy: CopyResult;
}

/** Resolves POINT for one disk, draining pending logs first for `latest`. */
export async function resolveDiskPoint(retentionDir: string, diskId: string, spec: string, options: { clock?: Clock; drainTimeoutMs?: number } = {}): Promise<{ manifest: DiskManifest; point: RecoveryPoint; newestSeq: number; drainedLogs: number }> {
  let { manifest, points } = await loadPoints(retentionDir, diskId);
  let drainedLogs = 0;
  if (spec === 'latest') {
    drainedLogs = (await drainPending(retentionDir, manifest, { ...(options.drainTimeoutMs !== undefined ? { timeoutMs: options.drainTimeoutMs } : {}), ...(options.clock ? { clock: options.clock } : {}) })).applied;
    if (drainedLogs > 0) ({ manifest, points } = await loadPoints(retentionDir, diskId));
  }
  const clock = options.clock ?? systemClock;
  const point = resolvePoint(points, spec, { diskId, nowMs: clock.now(), windowMs: manifest.windowHours * 3_600_000 });
  return { manifest, point, newestSeq: points[points.length - 1]!.seq, drainedLogs };
}

/**
 * `blockrelay failover`: writes the disk as it was at POINT to `out`. The
 * image is read through a point view (target plus pre-images), so nothing
 * is applied twice and the target and journal are only read.
 *
 * Running it again with the same `out` switches the failed-over disk to
 * another point (the output is overwritten whole). An `out` that exists and
 * is not this disk's failover output is refused (BR_POINT_OUT_EXISTS).
 */
export async function failover(options: FailoverOptions): Promise<FailoverResult> {
  const out = normalizeOutSpec(options.out);
  parseDiskSpec(out);
  const { manifest, point, newestSeq, drainedLogs } = await resolveDiskPoint(options.retentionDir, options.diskId, options.point, options);
  const record = await readFailoverRecord(options.retentionDir, options.diskId);
  const exists = outExists(out);
  const ours = record !== undefined && record.out === out;
  if (exists === true && !ours) {
    throw new BlockrelayError('BR_POINT_OUT_EXISTS', `${out} already exists and is not the failed-over copy of ${options.diskId}; choose a new output`, { details: { out, disk: options.diskId } });
  }
  const view = await openPointSource(options.retentionDir, manifest, point, newestSeq);
  let target: DiskTarget | undefined;
  try {
    const fast = view instanceof PointView ? rawToNewRaw(manifest.targetSpec, out, exists) : undefined;
    // The record is written before the copy (a re-run with the same `out` may
    // then overwrite a half-written output) and says complete only after the
    // output is whole and flushed: commit deletes the history on its word.
    const record = { version: 1 as const, diskId: options.diskId, out, pointId: point.id, atMs: (options.clock ?? systemClock).now() };
    if (fast !== undefined && view instanceof PointView) {
      await writeFailoverRecord(options.retentionDir, { ...record, complete: false });
      const copy = await copyRawThenOverlay(view, fast.from, fast.to);
      await writeFailoverRecord(options.retentionDir, { ...record, complete: true });
      return { diskId: options.diskId, point, out, drainedLogs, journalSegments: view.overlayLogs, copy };
    }
    const reuse = exists === true || (exists === undefined && ours);
    target = reuse ? await openDisk(out) : await openDisk(out, { create: { sizeBytes: view.sizeBytes } });
    if (target.sizeBytes !== view.sizeBytes) {
      throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `${out} holds ${target.sizeBytes} bytes but disk ${options.diskId} has ${view.sizeBytes}`, { details: { out } });
    }
    await writeFailoverRecord(options.retentionDir, { ...record, complete: false });
    const copy = await copyDisk(new AlignedExtents(view), target, { targetIsZero: !reuse && target.capabilities.sparse });
    // Closed before the record says complete: a VMDK output's close still writes its header.
    const closing = target;
    target = undefined;
    await closing.close();
    const outPath = (parseDiskSpec(out) as { path?: string }).path;
    if (!reuse && outPath !== undefined) await syncDirectory(path.dirname(outPath));
    await writeFailoverRecord(options.retentionDir, { ...record, complete: true });
    return { diskId: options.diskId, point, out, drainedLogs, journalSegments: view instanceof PointView ? view.overlayLogs : 0, copy };
  } finally {
    await target?.close();
    await view.close();
  }
}

/**
 * `blockrelay commit`: ends the failover and deletes the disk's points
 * (catalog first, so no point is ever listed without its journal), its
 * journal and the failover record. The manifest stays, so history starts
 * again if replication of the disk goes on.
 */
export async function commitFailover(retentionDir: string, diskId: string): Promise<{ diskId: string; out: string; pointId: string; pointsDeleted: number; journalBytesFreed: number }> {
  const { points } = await loadPoints(retentionDir, diskId);
  const record = await readFailoverRecord(retentionDir, diskId);
  if (record === undefined) {
    throw new BlockrelayError('BR_POINT_NOT_FAILED_OVER', `disk ${diskId} is not failed over; run blockrelay failover first`, { details: { disk: diskId } });
  }
  if (!failoverComplete(record)) {
    throw new BlockrelayError('BR_POINT_NOT_FAILED_OVER', `the last failover of disk ${diskId} to ${record.out} did not finish, so no complete copy exists; run blockrelay failover again before commit`, { details: { disk: diskId, out: record.out } });
  }
  // A master target running on the disk's state holds its history in memory
  // and would write it back (or journal into a deleted directory): commit
  // only while none runs, and keep one from starting meanwhile.
  const stateLock = new StateLock((await readManifest(retentionDir, diskId)).stateDir);
  stateLock.acquire();
  try {
    return await deleteHistory(retentionDir, diskId, points, record);
  } finally {
    stateLock.release();
  }
}

async function deleteHistory(retentionDir: string, diskId: string, points: readonly RecoveryPoint[], record: FailoverRecord): Promise<{ diskId: string; out: string; pointId: string; pointsDeleted: number; journalBytesFreed: number }> {
  const paths = diskRetentionPaths(retentionDir, diskId);
  // Page-blob points are snapshots: delete them first (this needs the blob's
  // lease, so a running master target makes commit fail before anything is deleted).
  const snapshots = points.filter((p) => p.snapshot !== undefined);
  if (snapshots.length > 0) {
    const manifest = await readManifest(retentionDir, diskId);
    const target = await openDisk(manifest.targetSpec);
    try {
      if (!isSnapshotTarget(target)) throw new BlockrelayError('BR_RETENTION_MANIFEST_INVALID', `disk ${diskId} has snapshot points but its target ${manifest.targetSpec} takes no snapshots`, { details: { disk: diskId } });
      for (const p of snapshots) {
        // Gone already: an earlier commit was interrupted after deleting it.
        await target.deleteSnapshot(snapshotIdOf(p.snapshot!)).catch((err: unknown) => {
          if ((err as BlockrelayError).code !== 'BR_BLOB_NOT_FOUND') throw err;
        });
      }
    } finally {
      await target.close();
    }
  }
  let freed = 0;
  if (fs.existsSync(paths.journalDir)) for (const name of await fsp.readdir(paths.journalDir)) freed += allocatedBytesOf(await fsp.stat(path.join(paths.journalDir, name)));
  await fsp.rm(paths.catalog, { force: true });
  await fsp.rm(paths.journalDir, { recursive: true, force: true });
  await fsp.rm(paths.failover, { force: true });
  return { diskId, out: record.out, pointId: record.pointId, pointsDeleted: points.length, journalBytesFreed: freed };
}

/** Members of a replication group with history in the retention directory. */
export async function groupMembers(retentionDir: string, group: string): Promise<string[]> {
  const members: string[] = [];
  for (const diskId of listRetentionDisks(retentionDir)) {
    if ((await readManifest(retentionDir, diskId)).group === group) members.push(diskId);
  }
  return members;
}

/**
 * Resolves POINT for a whole group: only cuts every member has a point for
 * are candidates (a group fails over only to a common point). Returns each
 * member's point of the chosen cut.
 */
export async function resolveGroupPoint(retentionDir: string, group: string, spec: string, options: { clock?: Clock } = {}): Promise<{ cutId: string; members: Map<string, RecoveryPoint> }> {
  const members = await groupMembers(retentionDir, group);
  if (members.length === 0) throw new BlockrelayError('BR_RETENTION_DISK_UNKNOWN', `retention directory ${retentionDir} holds no disk of group ${group}`, { details: { group } });
  // Only points each member can be rebuilt at: a cut that is a resync point
  // (tainted, not consistent) on one member is no common point, and its
  // failover would fail after the members before it were written.
  const loaded = (await Promise.all(members.map((m) => loadPoints(retentionDir, m)))).map((l) => ({ ...l, points: selectablePoints(l.points) }));
  const cutSets = loaded.map((l) => new Set(l.points.map((p) => p.cutId).filter((c) => c !== '')));
  const common = loaded[0]!.points.filter((p) => cutSets.every((s) => s.has(p.cutId)));
  const clock = options.clock ?? systemClock;
  const context = { diskId: `group ${group}`, nowMs: clock.now(), windowMs: loaded[0]!.manifest.windowHours * 3_600_000 };
  let chosen: RecoveryPoint;
  try {
    // A point id of another member names its cut.
    const byId = loaded.flatMap((l) => l.points).find((p) => p.id === spec);
    chosen = resolvePoint(common, byId?.cutId ?? spec, context);
  } catch (err) {
    const code = (err as BlockrelayError).code;
    if (code !== 'BR_POINT_NONE' && code !== 'BR_POINT_UNKNOWN') throw err;
    throw new BlockrelayError('BR_POINT_NOT_COMMON', `the disks of group ${group} (${members.join(', ')}) share no point matching '${spec.slice(0, 80)}'`, { cause: err, details: { group, point: spec.slice(0, 80) } });
  }
  const out = new Map<string, RecoveryPoint>();
  loaded.forEach((l, i) => out.set(members[i]!, l.points.find((p) => p.cutId === chosen.cutId)!));
  return { cutId: chosen.cutId, members: out };
}
