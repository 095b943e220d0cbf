import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BlockrelayError, isBlockrelayError, wrapError } from '../retry/blockrelay-error';
import { DirtyMap, xxh64 } from './dirty-map';
import { syncDirectory, writeFileDurably } from '../platform/durable-file';

/**
 * The change tracker's files in its log directory, for disk `ID`:
 *
 * - `ID-SSSSSSSSSSSS.hrl.open`  the active log (unsealed, EOLLocation 0)
 * - `ID-SSSSSSSSSSSS.hrl`       a sealed log; the 12-digit sequence makes lexical order apply order
 * - `ID-SSSSSSSSSSSS.hrl.json`  its sidecar: cut id/time and sequence (never inside the log)
 * - `ID.tracker.json`           tracker state (mode, next sequence, chain)
 * - `ID.maps.0`, `ID.maps.1`    the persisted dirty maps, written alternately (see docs/formats/ms-hrl.md)
 *
 * Every file but the active log and the map slots is replaced atomically
 * (write a temporary, fsync, rename, fsync the directory).
 */
export const SEQUENCE_DIGITS = 12;
export const OPEN_LOG_SUFFIX = '.hrl.open';
export const SEALED_LOG_SUFFIX = '.hrl';
export const SIDECAR_SUFFIX = '.hrl.json';
export const TMP_SUFFIX = '.tmp';
/** Largest state or sidecar JSON file read (they are a few hundred bytes). */
const MAX_JSON_BYTES = 64 * 1024;


export function logBaseName(diskId: string, sequence: number): string {
  return `${diskId}-${String(sequence).padStart(SEQUENCE_DIGITS, '0')}`;
}

/** Parses `ID-SSSSSSSSSSSS<suffix>` back into its sequence, or undefined for another disk or kind. */
export function parseLogName(diskId: string, name: string, suffix: string): number | undefined {
  if (!name.startsWith(`${diskId}-`) || !name.endsWith(suffix)) return undefined;
  const seq = name.slice(diskId.length + 1, name.length - suffix.length);
  return new RegExp(`^\\d{${SEQUENCE_DIGITS}}$`).test(seq) ? Number(seq) : undefined;
}

/** Writes a file atomically and durably. */
export async function writeFileAtomic(file: string, data: Uint8Array | string): Promise<void> {
  try {
    await writeFileDurably(file, data);
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot write ${file}`);
  }
}

/** Reads a small JSON file; undefined when it does not exist; BR_TRACKER_STATE_CORRUPT when it is not JSON. */
export async function readJsonFile(file: string): Promise<unknown> {
  let text: string;
  try {
    const st = await fsp.stat(file);
    if (st.size > MAX_JSON_BYTES) throw new BlockrelayError('BR_TRACKER_STATE_CORRUPT', `${file} is ${st.size} bytes, more than ${MAX_JSON_BYTES}`, { details: { file } });
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    if (isBlockrelayError(err)) throw err;
    throw wrapError(err, 'BR_IO', `cannot read ${file}`);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new BlockrelayError('BR_TRACKER_STATE_CORRUPT', `${file} is not valid JSON`, { cause: err, details: { file } });
  }
}

/** The tracker's persisted state (`ID.tracker.json`). */
export interface TrackerState {
  readonly version: 1;
  readonly diskId: string;
  readonly diskSizeBytes: number;
  readonly granularityBytes: number;
  /** 'logging': writes go to the active log; 'dirty-only': after overflow, to the dirty map only. */
  readonly mode: 'logging' | 'dirty-only';
  /** Sequence the next log gets. */
  readonly nextSequence: number;
  /** UniqueId of the newest log created (the next log's PreviousUniqueId). */
  readonly lastUniqueId: string;
  /** Sequence of the active log, if one is open. */
  readonly activeSequence: number | null;
  /**
   * Sequences held for resync logs being written (see ChangeTracker.resyncRound):
   * each sits before the active log in apply order, with its UniqueId chain
   * fixed in advance. One found unfilled at open is filled with an empty log.
   */
  readonly reservations?: readonly ResyncReservation[];
  /**
   * The newest sequence the receiver acknowledged (absent: none since this
   * field exists). Written before the acknowledged log is deleted, so every
   * log that left the source is at or below it: a resync log after a fold
   * follows it (docs/transport.md, "Resync logs").
   */
  readonly shippedSequence?: number;
}

/** A sequence number held for a resync log, with the log's place in the UniqueId chain. */
export interface ResyncReservation {
  readonly sequence: number;
  readonly uniqueId: string;
  readonly previousUniqueId: string;
  /**
   * The sequence the resync log follows: the newest log before it that was
   * not folded (absent in a state file from before this field: worked out
   * again at open).
   */
  readonly follows?: number;
}

/** Suffix of a resync log while it is being written; removed with other temporaries at open. */
export const RESYNC_LOG_TMP_SUFFIX = '.hrl.resync.tmp';

export function parseTrackerState(value: unknown, file: string): TrackerState {
  const bad = (why: string): BlockrelayError => new BlockrelayError('BR_TRACKER_STATE_CORRUPT', `${file}: ${why}`, { details: { file } });
  if (typeof value !== 'object' || value === null) throw bad('not an object');
  const v = value as Record<string, unknown>;
  if (v.version !== 1) throw bad(`version ${String(v.version)} is not 1`);
  const int = (k: string): number => {
    const n = v[k];
    if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) throw bad(`${k} is not a whole number`);
    return n;
  };
  if (typeof v.diskId !== 'string') throw bad('diskId missing');
  if (v.mode !== 'logging' && v.mode !== 'dirty-only') throw bad(`mode ${String(v.mode)} is unknown`);
  if (typeof v.lastUniqueId !== 'string') throw bad('lastUniqueId missing');
  const active = v.activeSequence === null ? null : int('activeSequence');
  let reservations: ResyncReservation[] | undefined;
  if (v.reservations !== undefined) {
    if (!Array.isArray(v.reservations) || v.reservations.length > 64) throw bad('reservations is not a list of at most 64');
    reservations = v.reservations.map((r: unknown) => {
      const o = r as Record<string, unknown>;
      if (typeof o !== 'object' || o === null || typeof o.uniqueId !== 'string' || typeof o.previousUniqueId !== 'string' || typeof o.sequence !== 'number' || !Number.isSafeInteger(o.sequence) || o.sequence < 1) throw bad('a reservation is malformed');
      if (o.follows !== undefined && !(typeof o.follows === 'number' && Number.isSafeInteger(o.follows) && o.follows >= 0 && o.follows < o.sequence)) throw bad(`reservation ${o.sequence} follows ${String(o.follows)}, not an earlier sequence`);
      return { sequence: o.sequence, uniqueId: o.uniqueId, previousUniqueId: o.previousUniqueId, ...(o.follows === undefined ? {} : { follows: o.follows as number }) };
    });
  }
  const shipped = v.shippedSequence === undefined ? undefined : int('shippedSequence');
  return {
    version: 1, diskId: v.diskId, diskSizeBytes: int('diskSizeBytes'), granularityBytes: int('granularityBytes'), mode: v.mode, nextSequence: int('nextSequence'), lastUniqueId: v.lastUniqueId, activeSequence: active,
    ...(reservations === undefined ? {} : { reservations }),
    ...(shipped === undefined ? {} : { shippedSequence: shipped }),
  };
}

/** A sealed log's sidecar (`ID-SSSSSSSSSSSS.hrl.json`). */
export interface LogSidecar {
  readonly version: 1;
  readonly diskId: string;
  readonly sequence: number;
  readonly uniqueId: string;
  readonly previousUniqueId: string;
  readonly sizeBytes: number;
  readonly entryCount: number;
  /** The cut that sealed it, shared by every disk sealed at the same cut. */
  readonly cutId: string;
  readonly cutTime: string;
  readonly cutTimeMs: number;
  /** True when the log was recovered after a crash rather than sealed by a cut. */
  readonly recovered: boolean;
  /** Set when the cut was app-consistent (taken with the application quiesced): the tag's name. */
  readonly appTag?: string;
  /** Set on a resync log: blocks read from the disk while it changed, so its end is no recovery point. */
  readonly resync?: boolean;
  /**
   * Resync logs only: the sequence the log follows, sent as its envelope's
   * `follows` (absent in a sidecar from before this field: the log is sent
   * without it).
   */
  readonly follows?: number;
  /**
   * An ordinary log sealed while the disk still needed a resync (resync
   * extents left, or a resync log's sequence held): the replica at its end
   * mixes new and old blocks, so no selectable point ends with it. Sent as
   * the envelope's `tainted`. Absent: false.
   */
  readonly tainted?: boolean;
}

/** Longest app tag a sidecar holds, in UTF-8 bytes. */
export const MAX_APP_TAG_BYTES = 256;

export function parseSidecar(value: unknown, file: string): LogSidecar {
  const bad = (why: string): BlockrelayError => new BlockrelayError('BR_TRACKER_STATE_CORRUPT', `${file}: ${why}`, { details: { file } });
  if (typeof value !== 'object' || value === null) throw bad('not an object');
  const v = value as Record<string, unknown>;
  if (v.version !== 1) throw bad('version is not 1');
  for (const k of ['diskId', 'uniqueId', 'previousUniqueId', 'cutId', 'cutTime']) if (typeof v[k] !== 'string') throw bad(`${k} missing`);
  for (const k of ['sequence', 'sizeBytes', 'entryCount', 'cutTimeMs']) if (typeof v[k] !== 'number' || !Number.isSafeInteger(v[k])) throw bad(`${k} is not a whole number`);
  if (typeof v.recovered !== 'boolean') throw bad('recovered missing');
  if (v.appTag !== undefined && (typeof v.appTag !== 'string' || Buffer.byteLength(v.appTag) > MAX_APP_TAG_BYTES)) throw bad('appTag is not a string of at most 256 bytes');
  if (v.resync !== undefined && typeof v.resync !== 'boolean') throw bad('resync is not true or false');
  if (v.tainted !== undefined && typeof v.tainted !== 'boolean') throw bad('tainted is not true or false');
  if (v.follows !== undefined && !(v.resync === true && typeof v.follows === 'number' && Number.isSafeInteger(v.follows) && v.follows >= 0 && v.follows < (v.sequence as number))) throw bad(`follows ${String(v.follows)} is not an earlier sequence on a resync log`);
  return v as unknown as LogSidecar;
}

// ---- the maps files ----

/** "BRTRKMP1": tracker maps, version 1. */
export const MAPS_MAGIC = Buffer.from('BRTRKMP1', 'latin1');
const MAPS_LENGTHS_OFFSET = 8;
const MAPS_PENDING_SEQUENCE_OFFSET = 32;
const MAPS_PENDING_END_OFFSET = 40;
const MAPS_GENERATION_OFFSET = 48;
const MAPS_DURABLE_END_OFFSET = 56;
const MAPS_HEADER_CHECKSUM_OFFSET = 64;
/** Magic, three map lengths, pendingLogSequence, pendingLogEndBytes, generation, durableLogEndBytes, XXH64 of bytes 0..63. */
export const MAPS_HEADER_BYTES = 72;
/** The maps are written alternately to two slots, `ID.maps.0` and `ID.maps.1`. */
export const MAPS_SLOTS = 2;

/**
 * The three dirty maps the tracker persists, in one file so they change
 * together: `dirty` (every change not yet durably shipped), `pending`
 * (changes since the active log was last made durable: the candidates of a
 * torn tail) and `resync` (extents that must be resynced: overflow, torn
 * tails, a lost log).
 */
export interface TrackerMaps {
  readonly dirty: DirtyMap;
  readonly pending: DirtyMap;
  readonly resync: DirtyMap;
  /** The active log `pending` belongs to (0: none). */
  readonly pendingLogSequence: number;
  /**
   * The size that log reaches once everything in `pending` is durable: a
   * recovered log at least this long holds every pending write, so its
   * extents need no resync.
   */
  readonly pendingLogEndBytes: number;
  /** That log's end made durable by its last completed flush (a recovery hint). */
  readonly durableLogEndBytes: number;
}

/** Layout: the 64-byte header, then the three serialized maps (each with its own checksums). */
export function encodeTrackerMaps(maps: TrackerMaps, generation: number): Buffer {
  const parts = [maps.dirty.serialize(), maps.pending.serialize(), maps.resync.serialize()];
  const head = Buffer.alloc(MAPS_HEADER_BYTES);
  MAPS_MAGIC.copy(head, 0);
  parts.forEach((p, i) => head.writeBigUInt64LE(BigInt(p.length), MAPS_LENGTHS_OFFSET + i * 8));
  head.writeBigUInt64LE(BigInt(maps.pendingLogSequence), MAPS_PENDING_SEQUENCE_OFFSET);
  head.writeBigUInt64LE(BigInt(maps.pendingLogEndBytes), MAPS_PENDING_END_OFFSET);
  head.writeBigUInt64LE(BigInt(generation), MAPS_GENERATION_OFFSET);
  head.writeBigUInt64LE(BigInt(maps.durableLogEndBytes), MAPS_DURABLE_END_OFFSET);
  head.writeBigUInt64LE(xxh64(head, 0, MAPS_HEADER_CHECKSUM_OFFSET), MAPS_HEADER_CHECKSUM_OFFSET);
  return Buffer.concat([head, ...parts]);
}

/** Decodes a maps slot; BR_TRACKER_STATE_CORRUPT or BR_DIRTYMAP_CORRUPT on damage (e.g. a torn write). */
export function decodeTrackerMaps(buf: Buffer, file: string): TrackerMaps & { generation: number } {
  const bad = (offset: number, why: string): BlockrelayError => new BlockrelayError('BR_TRACKER_STATE_CORRUPT', `${file} at byte ${offset}: ${why}`, { details: { file, offset } });
  if (buf.length < MAPS_HEADER_BYTES) throw bad(buf.length, 'shorter than its header');
  if (!buf.subarray(0, 8).equals(MAPS_MAGIC)) throw bad(0, 'magic is not BRTRKMP1');
  if (buf.readBigUInt64LE(MAPS_HEADER_CHECKSUM_OFFSET) !== xxh64(buf, 0, MAPS_HEADER_CHECKSUM_OFFSET)) throw bad(MAPS_HEADER_CHECKSUM_OFFSET, 'header checksum does not match');
  const maps: DirtyMap[] = [];
  let at = MAPS_HEADER_BYTES;
  for (let i = 0; i < 3; i++) {
    const len = Number(buf.readBigUInt64LE(MAPS_LENGTHS_OFFSET + i * 8));
    if (at + len > buf.length) throw bad(MAPS_LENGTHS_OFFSET + i * 8, `map ${i} of ${len} bytes runs past the end at ${buf.length}`);
    maps.push(DirtyMap.deserialize(buf.subarray(at, at + len)));
    at += len;
  }
  if (at !== buf.length) throw bad(at, 'bytes after the last map');
  const seq = Number(buf.readBigUInt64LE(MAPS_PENDING_SEQUENCE_OFFSET));
  const end = Number(buf.readBigUInt64LE(MAPS_PENDING_END_OFFSET));
  const generation = Number(buf.readBigUInt64LE(MAPS_GENERATION_OFFSET));
  const durable = Number(buf.readBigUInt64LE(MAPS_DURABLE_END_OFFSET));
  if (![seq, end, generation, durable].every(Number.isSafeInteger)) throw bad(MAPS_PENDING_SEQUENCE_OFFSET, 'a position or the generation is out of range');
  return { dirty: maps[0]!, pending: maps[1]!, resync: maps[2]!, pendingLogSequence: seq, pendingLogEndBytes: end, durableLogEndBytes: durable, generation };
}

/** Path of maps slot `slot` (0 or 1) of disk `diskId`. */
export function mapsSlotPath(dir: string, diskId: string, slot: number): string {
  return path.join(dir, `${diskId}.maps.${slot}`);
}

/**
 * Reads both slots and returns the valid one with the highest generation,
 * or undefined when neither is valid. A slot torn by a crash fails its
 * checksums and the other, one persist older, is used.
 */
export async function readTrackerMaps(dir: string, diskId: string): Promise<(TrackerMaps & { generation: number }) | undefined> {
  let best: (TrackerMaps & { generation: number }) | undefined;
  for (let slot = 0; slot < MAPS_SLOTS; slot++) {
    const file = mapsSlotPath(dir, diskId, slot);
    let buf: Buffer;
    try {
      buf = await fsp.readFile(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw wrapError(err, 'BR_IO', `cannot read ${file}`);
    }
    try {
      const maps = decodeTrackerMaps(buf, file);
      if (best === undefined || maps.generation > best.generation) best = maps;
    } catch (err) {
      if (!isBlockrelayError(err)) throw err;
    }
  }
  return best;
}

/**
 * Writes the maps into their slots, in place: truncate, then one write that
 * is durable when it returns (the slot files stay open with O_DSYNC), so a
 * persist costs two thread-pool round trips instead of five (open,
 * write, fdatasync, close and the existence check). The other slot keeps
 * the previous state until this one is complete, as before: a torn slot
 * fails its checksums or its length check and the older one is used.
 *
 * Persists must not overlap (the change tracker runs them under its lock).
 */
export class TrackerMapsWriter {
  private readonly handles: (fsp.FileHandle | undefined)[] = new Array<fsp.FileHandle | undefined>(MAPS_SLOTS).fill(undefined);

  constructor(
    private readonly dir: string,
    private readonly diskId: string,
  ) {}

  /** Encodes the maps at once (before returning), then writes slot `generation % 2`. */
  write(maps: TrackerMaps, generation: number): Promise<void> {
    return this.writeEncoded(generation % MAPS_SLOTS, encodeTrackerMaps(maps, generation));
  }

  /** Closes the slot files. Idempotent; a later `write` opens them again. */
  async close(): Promise<void> {
    const open = this.handles.filter((h) => h !== undefined);
    this.handles.fill(undefined);
    await Promise.all(open.map((h) => h.close().catch(() => undefined)));
  }

  private async writeEncoded(slot: number, data: Buffer): Promise<void> {
    const file = mapsSlotPath(this.dir, this.diskId, slot);
    let fh = this.handles[slot];
    try {
      if (fh === undefined) {
        let existed = true;
        try {
          await fsp.access(file);
        } catch {
          existed = false;
        }
        fh = await fsp.open(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_DSYNC, 0o644);
        this.handles[slot] = fh;
        // A new slot also needs its directory entry synced.
        if (!existed) await syncDirectory(this.dir);
      }
      await fh.truncate(0);
      for (let at = 0; at < data.length; ) {
        const { bytesWritten } = await fh.write(data, at, data.length - at, at);
        if (bytesWritten <= 0) throw new Error(`short write at byte ${at}`);
        at += bytesWritten;
      }
    } catch (err) {
      // Start over with a fresh handle next time.
      if (fh !== undefined && this.handles[slot] === fh) {
        this.handles[slot] = undefined;
        await fh.close().catch(() => undefined);
      }
      throw wrapError(err, 'BR_IO', `cannot write ${file}`);
    }
  }
}

// ---- the write-intent file ----

/** "BRINTNT1": write-intent regions, version 1. */
export const INTENT_MAGIC = Buffer.from('BRINTNT1', 'latin1');
/** Magic, region size (u64), region count (u32), then u32 region indexes, then XXH64 of all before it. */
export const INTENT_HEADER_BYTES = 20;
/** Largest number of regions the file holds (a 2 TiB disk has 131072 regions of 16 MiB). */
export const INTENT_REGIONS_MAX = 1 << 20;

export function intentPath(dir: string, diskId: string): string {
  return path.join(dir, `${diskId}.intent`);
}

/** Encodes the write-intent regions (docs/formats/ms-hrl.md, "Write intent"). */
export function encodeIntents(regionBytes: number, regions: readonly number[]): Buffer {
  const buf = Buffer.alloc(INTENT_HEADER_BYTES + regions.length * 4 + 8);
  INTENT_MAGIC.copy(buf, 0);
  buf.writeBigUInt64LE(BigInt(regionBytes), 8);
  buf.writeUInt32LE(regions.length, 16);
  regions.forEach((r, i) => buf.writeUInt32LE(r, INTENT_HEADER_BYTES + i * 4));
  buf.writeBigUInt64LE(xxh64(buf, 0, buf.length - 8), buf.length - 8);
  return buf;
}

/** Decodes a write-intent file; damage is BR_TRACKER_STATE_CORRUPT naming the offset. */
export function decodeIntents(buf: Buffer, file: string): { regionBytes: number; regions: number[] } {
  const bad = (offset: number, why: string): BlockrelayError => new BlockrelayError('BR_TRACKER_STATE_CORRUPT', `${file} at byte ${offset}: ${why}`, { details: { file, offset } });
  if (buf.length < INTENT_HEADER_BYTES + 8) throw bad(0, `${buf.length} bytes is shorter than the ${INTENT_HEADER_BYTES + 8}-byte minimum`);
  if (!buf.subarray(0, 8).equals(INTENT_MAGIC)) throw bad(0, 'not a write-intent file (magic)');
  const count = buf.readUInt32LE(16);
  if (count > INTENT_REGIONS_MAX || buf.length !== INTENT_HEADER_BYTES + count * 4 + 8) throw bad(16, `region count ${count} does not match the file length ${buf.length}`);
  if (buf.readBigUInt64LE(buf.length - 8) !== xxh64(buf, 0, buf.length - 8)) throw bad(buf.length - 8, 'checksum mismatch');
  const regionBytes = Number(buf.readBigUInt64LE(8));
  const regions: number[] = [];
  for (let i = 0; i < count; i++) regions.push(buf.readUInt32LE(INTENT_HEADER_BYTES + i * 4));
  return { regionBytes, regions };
}
