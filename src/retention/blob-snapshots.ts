import type { DiskTarget } from '../targets/disk-target';
import type { LogEnvelope } from '../transport/transport-protocol';
import { pointRecordFromEnvelope, type CatalogRecord, type RecoveryPoint } from './recovery-points';

/** Defaults, units in the names. */
export const BLOB_SNAPSHOT_DEFAULTS = {
  /** A crash-consistent snapshot at the first cut at least this long after the previous snapshot. */
  crashIntervalMs: 5 * 60_000,
} as const;

/**
 * A target that keeps its own points as snapshots: the Azure page blob
 * target (`PageBlobTarget.snapshot/deleteSnapshot`). Snapshots of a page
 * blob are cheap and server-side, so its history lives there, not in an
 * undo journal that would have to read every pre-image over the network.
 */
export interface SnapshotTarget extends DiskTarget {
  snapshot(): Promise<{ readonly snapshot: string; readonly spec: string }>;
  deleteSnapshot(snapshot: string): Promise<void>;
  /** The blob's snapshots, oldest first; `ours` marks those `snapshot()` took. */
  listSnapshots?(): Promise<ReadonlyArray<{ readonly snapshot: string; readonly ours?: boolean }>>;
}

export function isSnapshotTarget(target: DiskTarget): target is SnapshotTarget {
  const t = target as Partial<SnapshotTarget>;
  return typeof t.snapshot === 'function' && typeof t.deleteSnapshot === 'function';
}

/**
 * Whether the cut `envelope` ends gets a snapshot: every app-consistent tag,
 * the first cut, and otherwise the first cut at least `intervalMs` after the
 * newest snapshot point.
 */
export function snapshotDue(newest: RecoveryPoint | undefined, envelope: LogEnvelope, intervalMs: number): boolean {
  if (envelope.appTag !== undefined) return true;
  if (newest === undefined) return true;
  return envelope.cutTimeMs - newest.timeMs >= intervalMs;
}

/** The catalog record of a point held by a snapshot. */
export function snapshotPointRecord(envelope: LogEnvelope, snapshotSpec: string): CatalogRecord {
  return { ...(pointRecordFromEnvelope(envelope) as CatalogRecord & { t: 'point' }), snapshot: snapshotSpec, applied: true };
}

/** The snapshot id inside a `blob:URL?snapshot=ID` spec. */
export function snapshotIdOf(spec: string): string {
  const query = spec.indexOf('?');
  const id = query < 0 ? null : new URLSearchParams(spec.slice(query + 1)).get('snapshot');
  if (id === null || id === '') throw new Error(`'${spec}' names no snapshot`);
  return id;
}

/**
 * Deletes the snapshots blockrelay took that no recovery point lists: a
 * crash between taking a snapshot and recording its point, or a delete
 * that failed after the catalog had dropped the point, leaves one that
 * nothing else would ever delete (and that is billed). Only snapshots
 * carrying blockrelay's metadata are candidates (an operator's or a backup
 * product's are never touched), and only those older than the newest
 * listed snapshot point: one newer may be a point being recorded right now.
 * Returns the ids deleted.
 */
export async function sweepOrphanSnapshots(target: SnapshotTarget, points: readonly RecoveryPoint[]): Promise<string[]> {
  if (target.listSnapshots === undefined) return [];
  const listed = new Set(points.filter((p) => p.snapshot !== undefined).map((p) => snapshotIdOf(p.snapshot!)));
  if (listed.size === 0) return [];
  const newestListed = [...listed].sort().at(-1)!;
  const deleted: string[] = [];
  for (const s of await target.listSnapshots()) {
    // Snapshot ids are fixed-width UTC time stamps: text order is time order.
    if (s.ours !== true || listed.has(s.snapshot) || s.snapshot >= newestListed) continue;
    await target.deleteSnapshot(s.snapshot);
    deleted.push(s.snapshot);
  }
  return deleted;
}
