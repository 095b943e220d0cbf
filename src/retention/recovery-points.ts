import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as zlib from 'node:zlib';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import { writeFileDurably } from '../platform/durable-file';
import type { LogEnvelope } from '../transport/transport-protocol';
import { CATALOG_CRC_HEX_DIGITS, CATALOG_JSON_OFFSET, CATALOG_MAX_LINE_BYTES, CATALOG_RECORD_VERSION } from './retention-format';

export type PointKind = 'crash' | 'app';

/** One recovery point of one disk: the disk as it was once log `seq` was applied. */
export interface RecoveryPoint {
  /** `<disk>-<seq>`; stable for the point's life. */
  readonly id: string;
  readonly seq: number;
  /** The source's cut time (ms since the epoch). */
  readonly timeMs: number;
  readonly kind: PointKind;
  /** The app-consistent tag's name, when it has one. */
  readonly name?: string;
  /** Shared by the points of disks cut together (a machine's disks, a replication group). */
  readonly cutId: string;
  readonly group?: string;
  /**
   * The log carried resync data: its pre-images are journaled like any
   * log's (older points stay rebuildable), but its end is no point an
   * operator may pick, so listings and point resolution leave it out.
   */
  readonly resync?: true;
  /**
   * Page-blob targets: the `blob:URL?snapshot=ID` spec of the snapshot that
   * holds this point (points of page blobs are snapshots, not journal).
   */
  readonly snapshot?: string;
}

/** What `points list --json` prints per point (DESIGN.md). */
export interface PointListing {
  readonly id: string;
  readonly time: string;
  readonly kind: PointKind;
  readonly name?: string;
}

/** A catalog record (one line; docs/formats/recovery-points.md). */
export type CatalogRecord =
  | { v: 1; t: 'point'; seq: number; timeMs: number; kind: PointKind; name?: string; cutId: string; group?: string; snapshot?: string; applied?: true; resync?: true }
  | { v: 1; t: 'applied'; seq: number };

export function pointId(diskId: string, seq: number): string {
  return `${diskId}-${seq}`;
}

/** The point a log's envelope ends (recorded before the log is applied). */
export function pointRecordFromEnvelope(envelope: LogEnvelope): CatalogRecord {
  const rec: CatalogRecord = { v: CATALOG_RECORD_VERSION, t: 'point', seq: envelope.seq, timeMs: envelope.cutTimeMs, kind: envelope.appTag === undefined ? 'crash' : 'app', cutId: envelope.cutId };
  if (envelope.appTag !== undefined && envelope.appTag !== '') rec.name = envelope.appTag;
  if (envelope.group !== undefined) rec.group = envelope.group;
  if (envelope.resync === true) rec.resync = true;
  return rec;
}

/** The points an operator may pick: every point but the ends of resync logs. */
export function selectablePoints(points: readonly RecoveryPoint[]): RecoveryPoint[] {
  return points.filter((p) => p.resync !== true);
}

export function encodeCatalogLine(record: CatalogRecord): Buffer {
  const json = Buffer.from(JSON.stringify(record), 'utf8');
  const crc = zlib.crc32(json).toString(16).padStart(CATALOG_CRC_HEX_DIGITS, '0');
  return Buffer.concat([Buffer.from(`${crc} `, 'latin1'), json, Buffer.from('\n', 'latin1')]);
}

function corrupt(file: string, offset: number, why: string): BlockrelayError {
  return new BlockrelayError('BR_RETENTION_CATALOG_CORRUPT', `recovery point catalog ${file} at byte ${offset}: ${why}`, { details: { file, offset } });
}

function checkRecord(value: unknown): CatalogRecord | undefined {
  const r = value as Partial<Record<string, unknown>>;
  if (typeof r !== 'object' || r === null || r.v !== CATALOG_RECORD_VERSION || !Number.isSafeInteger(r.seq) || (r.seq as number) < 0) return undefined;
  if (r.t === 'applied') return { v: 1, t: 'applied', seq: r.seq as number };
  if (r.t !== 'point') return undefined;
  if (!Number.isSafeInteger(r.timeMs) || (r.kind !== 'crash' && r.kind !== 'app') || typeof r.cutId !== 'string') return undefined;
  if (r.name !== undefined && typeof r.name !== 'string') return undefined;
  if (r.group !== undefined && typeof r.group !== 'string') return undefined;
  if (r.snapshot !== undefined && typeof r.snapshot !== 'string') return undefined;
  if (r.resync !== undefined && r.resync !== true) return undefined;
  return r as CatalogRecord;
}

/** The result of reading a catalog. */
export interface CatalogContents {
  /** Points whose log is applied, oldest first. */
  readonly points: RecoveryPoint[];
  /** A recorded point whose log may still be mid-apply (at most one: the newest). */
  readonly pending: RecoveryPoint | undefined;
  /** Length of the valid prefix; anything after it is a torn last append. */
  readonly validBytes: number;
  readonly fileBytes: number;
  /** Lines skipped as damaged (only when salvaging). */
  readonly damagedLines?: number;
}

/**
 * Parses catalog bytes. Each line is checked (CRC-32, JSON, fields); a bad
 * last line is the torn tail of an append a crash interrupted and is
 * ignored, a bad line anywhere else is damage (BR_RETENTION_CATALOG_CORRUPT
 * naming the byte offset). A point counts as applied once an `applied`
 * record names it, a later point was recorded (the master target applies in
 * order), or `appliedSeq` (the master target's ledger) has reached it.
 */
export function parseCatalog(bytes: Buffer, diskId: string, file: string, appliedSeq: number | null = null, options: { skipDamaged?: boolean } = {}): CatalogContents {
  let damagedLines = 0;
  const bySeq = new Map<number, RecoveryPoint>();
  const applied = new Set<number>();
  let at = 0;
  let validBytes = 0;
  while (at < bytes.length) {
    const nl = bytes.indexOf(0x0a, at);
    const lineEnd = nl < 0 ? bytes.length : nl;
    const isLast = nl < 0 || nl + 1 === bytes.length;
    const bad = (why: string): void => {
      if (isLast) return;
      if (options.skipDamaged !== true) throw corrupt(file, at, why);
      damagedLines++;
    };
    let record: CatalogRecord | undefined;
    if (nl < 0) bad('line has no end');
    else if (lineEnd - at > CATALOG_MAX_LINE_BYTES) bad(`line is longer than ${CATALOG_MAX_LINE_BYTES} bytes`);
    else if (lineEnd - at < CATALOG_JSON_OFFSET + 2 || bytes[at + CATALOG_CRC_HEX_DIGITS] !== 0x20) bad('line is not "CRC JSON"');
    else {
      const crcText = bytes.toString('latin1', at, at + CATALOG_CRC_HEX_DIGITS);
      const json = bytes.subarray(at + CATALOG_JSON_OFFSET, lineEnd);
      if (!/^[0-9a-f]{8}$/.test(crcText) || Number.parseInt(crcText, 16) !== zlib.crc32(json)) bad('CRC-32 does not match');
      else {
        try {
          record = checkRecord(JSON.parse(json.toString('utf8')));
        } catch {
          record = undefined;
        }
        if (record === undefined) bad('record is not a valid point or applied record');
      }
    }
    if (record === undefined) {
      // Salvage: every line carries its own CRC, so the lines after a damaged one still count.
      if (options.skipDamaged === true && nl >= 0 && !isLast) {
        at = lineEnd + 1;
        validBytes = at;
        continue;
      }
      break;
    }
    if (record.t === 'applied') applied.add(record.seq);
    else if (!bySeq.has(record.seq)) {
      if (record.applied === true) applied.add(record.seq);
      bySeq.set(record.seq, pointOfRecord(diskId, record));
    }
    at = lineEnd + 1;
    validBytes = at;
  }
  const all = [...bySeq.values()].sort((a, b) => a.seq - b.seq);
  const newest = all[all.length - 1];
  const isApplied = (p: RecoveryPoint): boolean => applied.has(p.seq) || p !== newest || (appliedSeq !== null && appliedSeq >= p.seq);
  const points = all.filter(isApplied);
  const pending = newest !== undefined && !isApplied(newest) ? newest : undefined;
  return { points, pending, validBytes, fileBytes: bytes.length, damagedLines };
}

/**
 * A disk's recovery point catalog: an append-only file of checksummed
 * lines (docs/formats/recovery-points.md), replaced atomically when pruning
 * drops old points.
 */
export class PointCatalog {
  constructor(readonly file: string, readonly diskId: string) {}

  async read(appliedSeq: number | null = null, options: { skipDamaged?: boolean } = {}): Promise<CatalogContents> {
    let bytes: Buffer;
    try {
      bytes = await fsp.readFile(this.file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { points: [], pending: undefined, validBytes: 0, fileBytes: 0 };
      throw wrapError(err, 'BR_IO', `reading recovery point catalog ${this.file}`);
    }
    return parseCatalog(bytes, this.diskId, this.file, appliedSeq, options);
  }

  /**
   * Appends records durably, first cutting off a torn tail so the file
   * stays line-aligned. Returns the bytes appended. All or nothing: a write
   * the file system takes short (a full retention volume takes what fits in
   * the file's last block and says so only by the count) is written on
   * until whole, and on any failure the file is cut back to where it was,
   * so a half line never stays behind for the next append to follow.
   */
  async append(records: readonly CatalogRecord[], validBytes?: number, options: { sync?: boolean } = {}): Promise<number> {
    const bytes = Buffer.concat(records.map(encodeCatalogLine));
    try {
      if (validBytes !== undefined && fs.existsSync(this.file) && fs.statSync(this.file).size > validBytes) await fsp.truncate(this.file, validBytes);
      const fh = await fsp.open(this.file, 'a');
      try {
        const startBytes = (await fh.stat()).size;
        try {
          for (let done = 0; done < bytes.length; ) {
            const { bytesWritten } = await fh.write(bytes, done, bytes.length - done);
            if (bytesWritten <= 0) throw Object.assign(new Error('write took no bytes'), { code: 'EIO' });
            done += bytesWritten;
          }
          if (options.sync ?? true) await fh.datasync();
        } catch (err) {
          await fh.truncate(startBytes).catch(() => undefined);
          throw err;
        }
      } finally {
        await fh.close();
      }
    } catch (err) {
      throw wrapError(err, 'BR_IO', `appending to recovery point catalog ${this.file}`);
    }
    return bytes.length;
  }

  /** Replaces the catalog with these applied points (pruning), atomically and durably. */
  async rewrite(points: readonly RecoveryPoint[], pending: RecoveryPoint | undefined): Promise<void> {
    const lines = points.map((p) => encodeCatalogLine({ ...toRecord(p), applied: true }));
    if (pending !== undefined) lines.push(encodeCatalogLine(toRecord(pending)));
    await writeFileDurably(this.file, Buffer.concat(lines));
  }
}

function toRecord(p: RecoveryPoint): CatalogRecord & { t: 'point' } {
  return { v: 1, t: 'point', seq: p.seq, timeMs: p.timeMs, kind: p.kind, cutId: p.cutId, ...(p.name !== undefined ? { name: p.name } : {}), ...(p.group !== undefined ? { group: p.group } : {}), ...(p.snapshot !== undefined ? { snapshot: p.snapshot } : {}), ...(p.resync === true ? { resync: true as const } : {}) };
}

export function pointOfRecord(diskId: string, record: CatalogRecord & { t: 'point' }): RecoveryPoint {
  return { id: pointId(diskId, record.seq), seq: record.seq, timeMs: record.timeMs, kind: record.kind, cutId: record.cutId, ...(record.name !== undefined ? { name: record.name } : {}), ...(record.group !== undefined ? { group: record.group } : {}), ...(record.snapshot !== undefined ? { snapshot: record.snapshot } : {}), ...(record.resync === true ? { resync: true as const } : {}) };
}

/** Whether `points` (ascending by seq, as the catalog keeps them) holds `seq`; O(1) for a seq past the newest. */
export function holdsSeq(points: readonly RecoveryPoint[], seq: number): boolean {
  const newest = points[points.length - 1];
  if (newest === undefined || newest.seq < seq) return false;
  return points.some((p) => p.seq === seq);
}

/**
 * Applies `record` to `state` in place, by the same rules as `parseCatalog`
 * for records appended in sequence order (as the hooks append them): a new
 * point settles the pending one (the master target applies in order), an
 * `applied` record settles the point it names. O(1) per record for the
 * records the hooks append (a seq past the newest), whatever the number of
 * points: `state.points` grows by push, so whoever holds that array sees it
 * grow (DiskHistory replaces the array, never shrinks it in place, when
 * points are dropped).
 */
export function applyRecordToState(diskId: string, state: { points: RecoveryPoint[]; pending: RecoveryPoint | undefined }, record: CatalogRecord): void {
  if (record.t === 'applied') {
    if (state.pending === undefined || state.pending.seq !== record.seq) return;
    state.points.push(state.pending);
    state.pending = undefined;
    return;
  }
  if (state.pending?.seq === record.seq || holdsSeq(state.points, record.seq)) return;
  if (state.pending !== undefined) state.points.push(state.pending);
  const point = pointOfRecord(diskId, record);
  if (record.applied === true) {
    state.points.push(point);
    state.pending = undefined;
  } else {
    state.pending = point;
  }
}

/**
 * The catalog state after appending `record`, as a new state (the given one
 * is left as it was: this copies the points, O(points); the master target
 * uses `applyRecordToState`).
 */
export function appendToState(diskId: string, state: { points: RecoveryPoint[]; pending: RecoveryPoint | undefined }, record: CatalogRecord): { points: RecoveryPoint[]; pending: RecoveryPoint | undefined } {
  const next = { points: [...state.points], pending: state.pending };
  applyRecordToState(diskId, next, record);
  return next;
}

export function listingOf(p: RecoveryPoint): PointListing {
  return { id: p.id, time: new Date(p.timeMs).toISOString(), kind: p.kind, ...(p.name !== undefined ? { name: p.name } : {}) };
}

/** Named points a failover can ask for (DESIGN.md). */
export const POINT_KEYWORDS = ['latest', 'latest-processed', 'latest-app'] as const;

const ISO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})$/;

/**
 * Resolves POINT against applied points (oldest first): `latest` and
 * `latest-processed` (the caller drains pending logs first for `latest`),
 * `latest-app`, an ISO time (the newest point at or before it; a time before
 * the retention window is BR_POINT_BEFORE_WINDOW), a point id, or a cut id.
 */
export function resolvePoint(allPoints: readonly RecoveryPoint[], spec: string, context: { diskId: string; nowMs: number; windowMs: number }): RecoveryPoint {
  const points = selectablePoints(allPoints);
  if (points.length === 0) throw new BlockrelayError('BR_POINT_NONE', `disk ${context.diskId} has no recovery point`, { details: { disk: context.diskId } });
  const newest = points[points.length - 1]!;
  if (spec === 'latest' || spec === 'latest-processed') return newest;
  if (spec === 'latest-app') {
    for (let i = points.length - 1; i >= 0; i--) if (points[i]!.kind === 'app') return points[i]!;
    throw new BlockrelayError('BR_POINT_UNKNOWN', `disk ${context.diskId} has no app-consistent point`, { details: { disk: context.diskId, point: spec } });
  }
  if (ISO_TIME.test(spec)) {
    const t = Date.parse(spec);
    if (Number.isNaN(t)) throw new BlockrelayError('BR_POINT_UNKNOWN', `'${spec}' is not a valid time`, { details: { point: spec } });
    const windowStartMs = context.nowMs - context.windowMs;
    if (t < windowStartMs) {
      throw new BlockrelayError('BR_POINT_BEFORE_WINDOW', `${spec} is before the retention window, which starts at ${new Date(windowStartMs).toISOString()}`, { details: { point: spec, windowStart: new Date(windowStartMs).toISOString() } });
    }
    for (let i = points.length - 1; i >= 0; i--) if (points[i]!.timeMs <= t) return points[i]!;
    throw new BlockrelayError('BR_POINT_UNKNOWN', `disk ${context.diskId} has no point at or before ${spec}; the oldest is ${new Date(points[0]!.timeMs).toISOString()}`, { details: { point: spec } });
  }
  for (let i = points.length - 1; i >= 0; i--) {
    const p = points[i]!;
    if (p.id === spec || (p.cutId !== '' && p.cutId === spec)) return p;
  }
  throw new BlockrelayError('BR_POINT_UNKNOWN', `disk ${context.diskId} has no point '${spec.slice(0, 80)}' (expected latest, latest-processed, latest-app, an ISO time, a point id or a cut id)`, { details: { point: spec.slice(0, 80) } });
}
