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
