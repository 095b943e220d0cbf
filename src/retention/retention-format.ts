import * as fs from 'node:fs';
import * as path from 'node:path';
import { seqName, validateDiskId } from '../transport/transport-protocol';

/**
 * Layout of a retention volume and the constants of the formats kept on it
 * (docs/formats/undo-journal.md, docs/formats/recovery-points.md):
 *
 * ```
 * DIR/<disk>/manifest.json                 where the disk's target, state and inbox are
 * DIR/<disk>/journal/<seq:20>.undo.hrl     pre-images of the ranges log <seq> overwrote
 * DIR/<disk>/points.log                    the recovery point catalog (checksummed lines)
 * DIR/<disk>/failover.json                 present while the disk is failed over
 * DIR/<disk>/history.epoch                 how many times the whole history was dropped
 * DIR/<disk>/views/<pid>-<hex>/<n>.hrl     an open point view's hard links to its segments
 * ```
 */
export const RETENTION_LAYOUT = {
  manifestName: 'manifest.json',
  journalDirName: 'journal',
  catalogName: 'points.log',
  failoverName: 'failover.json',
  /** Bumped before a log is applied without a pre-image (history dropped): open point views check it. */
  historyEpochName: 'history.epoch',
  /** Open point views' hard links to the segments they read (view-segments.ts). */
  viewsDirName: 'views',
  undoSuffix: '.undo.hrl',
  /** A pre-image being written; discarded on the next start. */
  tmpSuffix: '.tmp',
} as const;

/** Current version of manifest.json and failover.json. */
export const RETENTION_MANIFEST_VERSION = 1;

/**
 * A catalog line is `CCCCCCCC JSON\n`: eight lowercase hex digits of the
 * CRC-32 (zlib polynomial) of the JSON bytes, one space, the record.
 */
export const CATALOG_CRC_HEX_DIGITS = 8;
/** Offset of the JSON text within a line: the CRC digits and the space. */
export const CATALOG_JSON_OFFSET = CATALOG_CRC_HEX_DIGITS + 1;
/** A longer line is damage (app tags are bounded at 256 bytes). */
export const CATALOG_MAX_LINE_BYTES = 4096;
/** Version field of every catalog record. */
export const CATALOG_RECORD_VERSION = 1;

/** Paths of one disk's history on a retention volume. */
export interface DiskRetentionPaths {
  readonly root: string;
  readonly manifest: string;
  readonly journalDir: string;
  readonly catalog: string;
  readonly failover: string;
  readonly historyEpoch: string;
  readonly views: string;
}

export function diskRetentionPaths(retentionDir: string, diskId: string): DiskRetentionPaths {
  const root = path.join(retentionDir, validateDiskId(diskId));
  return {
    root,
    manifest: path.join(root, RETENTION_LAYOUT.manifestName),
    journalDir: path.join(root, RETENTION_LAYOUT.journalDirName),
    catalog: path.join(root, RETENTION_LAYOUT.catalogName),
    failover: path.join(root, RETENTION_LAYOUT.failoverName),
    historyEpoch: path.join(root, RETENTION_LAYOUT.historyEpochName),
    views: path.join(root, RETENTION_LAYOUT.viewsDirName),
  };
}

/**
 * The disk's history epoch: how many times its whole history was dropped
 * to apply a log without a pre-image (0 when never). A point view notes it
 * at open: once it changes, the target holds a log no segment can undo.
 */
export function readHistoryEpoch(file: string): number {
  try {
    const n = Number.parseInt(fs.readFileSync(file, 'utf8'), 10);
    return Number.isSafeInteger(n) && n >= 0 ? n : Number.MAX_SAFE_INTEGER;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    // Unreadable: nothing can be promised about the history.
    return Number.MAX_SAFE_INTEGER;
  }
}

/** The pre-image log of `seq`: fixed-width names, so lexical order is apply order. */
export function undoFileName(seq: number): string {
  return `${seqName(seq)}${RETENTION_LAYOUT.undoSuffix}`;
}

/** The sequence number an undo file name holds, or undefined for any other name. */
export function seqOfUndoFile(name: string): number | undefined {
  const m = /^(\d{20})\.undo\.hrl$/.exec(name);
  return m === null ? undefined : Number(m[1]);
}

/** A resync session slot's marker, `resync-<seq:20>.json` (docs/formats/undo-journal.md). */
export interface SlotMarker {
  readonly version: 1;
  readonly seq: number;
  readonly state: 'open' | 'sealed';
  readonly sessionId: string;
}

export const RESYNC_MARKER_PATTERN = /^resync-(\d{20})\.json$/;

/** The marker of a resync session's slot `seq` in a journal directory (resync-journal.ts). */
export function resyncMarkerName(seq: number): string {
  return `resync-${seqName(seq)}.json`;
}

/**
 * A marker file's content, or (unreadable, damaged or of another version)
 * an `open` marker: a session that may not have finished, which every
 * reader must treat as the target possibly being changed.
 */
export function parseSlotMarker(text: string | undefined, seq: number): SlotMarker {
  try {
    const m = JSON.parse(text ?? '') as SlotMarker;
    if (m.version === 1 && m.seq === seq && (m.state === 'open' || m.state === 'sealed')) return m;
  } catch {
    // Unreadable: as below.
  }
  return { version: 1, seq, state: 'open', sessionId: 'unknown' };
}

/**
 * The state of slot `seq`'s resync marker: `open` while a session changes
 * the target (or the marker cannot be read: parseSlotMarker), `sealed` once
 * the session's pre-images are the slot's file (it may still be rewritten
 * once, when log `seq` adds its own), undefined without a marker (the
 * slot's file, if any, is final).
 */
export function resyncMarkerState(journalDir: string, seq: number): 'open' | 'sealed' | undefined {
  let text: string | undefined;
  try {
    text = fs.readFileSync(path.join(journalDir, resyncMarkerName(seq)), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
  }
  return parseSlotMarker(text, seq).state;
}
