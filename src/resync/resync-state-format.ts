import { BlockrelayError } from '../retry/blockrelay-error';
import type { Extent } from '../targets/disk-target';
import type { BlockHasher } from './block-hasher';

/**
 * The resync state file: a resync's persisted progress, so an interrupted
 * resync continues where it stopped. Layout and the reader's reaction to
 * damage are documented in docs/formats/resync-state.md; every offset lives
 * here. All integers are little-endian.
 */
export const STATE_MAGIC = Buffer.from('BRRESYNC', 'ascii');
export const STATE_VERSION = 1;

export const OFF_MAGIC = 0; // 8 bytes
export const OFF_VERSION = 8; // u16
export const OFF_FLAGS = 10; // u16
export const OFF_NOTED_COUNT = 12; // u32
export const OFF_BLOCK_SIZE = 16; // u32
export const OFF_RESERVED = 20; // u32, 0
export const OFF_SIZE = 24; // u64
export const OFF_PAIR_FINGERPRINT = 32; // u64
export const OFF_WORK_FINGERPRINT = 40; // u64
export const OFF_CURSOR = 48; // u64
export const OFF_STARTED_AT_MS = 56; // u64
export const OFF_UPDATED_AT_MS = 64; // u64
export const OFF_BLOCKS_COMPARED = 72; // u64
export const OFF_BLOCKS_SENT = 80; // u64
export const OFF_BYTES_SENT = 88; // u64
export const OFF_BYTES_RECEIVED = 96; // u64
export const OFF_HASH_BYTES = 104; // u64
export const STATE_HEADER_BYTES = 112;
export const NOTED_EXTENT_BYTES = 16; // u64 offset, u64 length
export const STATE_CHECKSUM_BYTES = 8; // xxh64 of every byte before it

/** Flag bit: the work list was a set of extents (dirty map), not the whole disk. */
export const FLAG_GUIDED = 0x0001;

/** Most noted concurrent writes a state file holds; more are coalesced first. */
export const MAX_NOTED_EXTENTS = 4096;

/** Cumulative counters of a resync job across all its attempts. */
export interface ResyncTotals {
  readonly blocksCompared: number;
  readonly blocksSent: number;
  readonly bytesSent: number;
  readonly bytesReceived: number;
  readonly hashBytes: number;
}

export interface ResyncState {
  readonly guided: boolean;
  readonly blockSizeBytes: number;
  readonly sizeBytes: number;
  /** Identifies the source/target pair (xxh64 of both specs). */
  readonly pairFingerprint: bigint;
  /** Identifies the work list (xxh64 of the normalized extents; 0 for the whole disk). */
  readonly workFingerprint: bigint;
  /** Every work byte below this disk offset was compared and its fixes flushed on the target. */
  readonly cursorBytes: number;
  readonly startedAtMs: number;
  readonly updatedAtMs: number;
  readonly totals: ResyncTotals;
  /** Writes reported during the resync (see ResyncJob.noteWrite). */
  readonly notedWrites: readonly Extent[];
}

export function encodeState(state: ResyncState, hasher: BlockHasher): Buffer {
  if (state.notedWrites.length > MAX_NOTED_EXTENTS) throw new Error(`encodeState: ${state.notedWrites.length} noted extents exceed ${MAX_NOTED_EXTENTS}`);
  const bodyBytes = STATE_HEADER_BYTES + state.notedWrites.length * NOTED_EXTENT_BYTES;
  const buf = Buffer.alloc(bodyBytes + STATE_CHECKSUM_BYTES);
  STATE_MAGIC.copy(buf, OFF_MAGIC);
  buf.writeUInt16LE(STATE_VERSION, OFF_VERSION);
  buf.writeUInt16LE(state.guided ? FLAG_GUIDED : 0, OFF_FLAGS);
  buf.writeUInt32LE(state.notedWrites.length, OFF_NOTED_COUNT);
  buf.writeUInt32LE(state.blockSizeBytes, OFF_BLOCK_SIZE);
  buf.writeBigUInt64LE(BigInt(state.sizeBytes), OFF_SIZE);
  buf.writeBigUInt64LE(state.pairFingerprint, OFF_PAIR_FINGERPRINT);
  buf.writeBigUInt64LE(state.workFingerprint, OFF_WORK_FINGERPRINT);
  buf.writeBigUInt64LE(BigInt(state.cursorBytes), OFF_CURSOR);
  buf.writeBigUInt64LE(BigInt(state.startedAtMs), OFF_STARTED_AT_MS);
  buf.writeBigUInt64LE(BigInt(state.updatedAtMs), OFF_UPDATED_AT_MS);
  buf.writeBigUInt64LE(BigInt(state.totals.blocksCompared), OFF_BLOCKS_COMPARED);
  buf.writeBigUInt64LE(BigInt(state.totals.blocksSent), OFF_BLOCKS_SENT);
  buf.writeBigUInt64LE(BigInt(state.totals.bytesSent), OFF_BYTES_SENT);
  buf.writeBigUInt64LE(BigInt(state.totals.bytesReceived), OFF_BYTES_RECEIVED);
  buf.writeBigUInt64LE(BigInt(state.totals.hashBytes), OFF_HASH_BYTES);
  let pos = STATE_HEADER_BYTES;
  for (const e of state.notedWrites) {
    buf.writeBigUInt64LE(BigInt(e.offset), pos);
    buf.writeBigUInt64LE(BigInt(e.length), pos + 8);
    pos += NOTED_EXTENT_BYTES;
  }
  buf.writeBigUInt64LE(hasher.hash(buf.subarray(0, bodyBytes)), bodyBytes);
  return buf;
}

function corrupt(path: string, offset: number, what: string): BlockrelayError {
  return new BlockrelayError('BR_RESYNC_STATE_CORRUPT', `resync state ${path} is damaged at byte ${offset}: ${what}`, { details: { path, offset } });
}

function u64(buf: Buffer, offset: number, path: string, field: string): number {
  const v = buf.readBigUInt64LE(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(path, offset, `${field} ${v} is beyond 2^53`);
  return Number(v);
}

/**
 * Decodes and validates a whole state file. The checksum is checked first,
 * so a torn or damaged file never yields a cursor; every field is then
 * checked for range, naming the byte offset of the first bad one.
 */
export function decodeState(buf: Buffer, path: string, hasher: BlockHasher): ResyncState {
  const minBytes = STATE_HEADER_BYTES + STATE_CHECKSUM_BYTES;
  if (buf.length < minBytes) throw corrupt(path, buf.length, `file is ${buf.length} bytes, shorter than the ${minBytes}-byte minimum`);
  if (!buf.subarray(OFF_MAGIC, OFF_MAGIC + STATE_MAGIC.length).equals(STATE_MAGIC)) throw corrupt(path, OFF_MAGIC, 'magic is not BRRESYNC');
  const version = buf.readUInt16LE(OFF_VERSION);
  if (version !== STATE_VERSION) throw corrupt(path, OFF_VERSION, `version ${version}, this reader knows ${STATE_VERSION}`);
  const notedCount = buf.readUInt32LE(OFF_NOTED_COUNT);
  const expectedBytes = STATE_HEADER_BYTES + notedCount * NOTED_EXTENT_BYTES + STATE_CHECKSUM_BYTES;
  if (notedCount > MAX_NOTED_EXTENTS || buf.length !== expectedBytes) {
    throw corrupt(path, OFF_NOTED_COUNT, `${notedCount} noted extents need a ${expectedBytes}-byte file, it is ${buf.length} bytes`);
  }
  const bodyBytes = buf.length - STATE_CHECKSUM_BYTES;
  const stored = buf.readBigUInt64LE(bodyBytes);
  const computed = hasher.hash(buf.subarray(0, bodyBytes));
  if (stored !== computed) throw corrupt(path, bodyBytes, `checksum ${stored.toString(16)} does not match the contents (${computed.toString(16)})`);
  const flags = buf.readUInt16LE(OFF_FLAGS);
  if ((flags & ~FLAG_GUIDED) !== 0) throw corrupt(path, OFF_FLAGS, `unknown flags 0x${flags.toString(16)}`);
  const blockSizeBytes = buf.readUInt32LE(OFF_BLOCK_SIZE);
  if (blockSizeBytes === 0) throw corrupt(path, OFF_BLOCK_SIZE, 'block size 0');
  const sizeBytes = u64(buf, OFF_SIZE, path, 'size');
  const cursorBytes = u64(buf, OFF_CURSOR, path, 'cursor');
  if (cursorBytes > sizeBytes) throw corrupt(path, OFF_CURSOR, `cursor ${cursorBytes} is past the disk size ${sizeBytes}`);
  const notedWrites: Extent[] = [];
  for (let i = 0, pos = STATE_HEADER_BYTES; i < notedCount; i++, pos += NOTED_EXTENT_BYTES) {
    const offset = u64(buf, pos, path, 'noted offset');
    const length = u64(buf, pos + 8, path, 'noted length');
    if (offset + length > sizeBytes) throw corrupt(path, pos, `noted write [${offset}, +${length}) is past the disk size ${sizeBytes}`);
    notedWrites.push({ offset, length });
  }
  return {
    guided: (flags & FLAG_GUIDED) !== 0,
    blockSizeBytes,
    sizeBytes,
    pairFingerprint: buf.readBigUInt64LE(OFF_PAIR_FINGERPRINT),
    workFingerprint: buf.readBigUInt64LE(OFF_WORK_FINGERPRINT),
    cursorBytes,
    startedAtMs: u64(buf, OFF_STARTED_AT_MS, path, 'start time'),
    updatedAtMs: u64(buf, OFF_UPDATED_AT_MS, path, 'update time'),
    totals: {
      blocksCompared: u64(buf, OFF_BLOCKS_COMPARED, path, 'blocks compared'),
      blocksSent: u64(buf, OFF_BLOCKS_SENT, path, 'blocks sent'),
      bytesSent: u64(buf, OFF_BYTES_SENT, path, 'bytes sent'),
      bytesReceived: u64(buf, OFF_BYTES_RECEIVED, path, 'bytes received'),
      hashBytes: u64(buf, OFF_HASH_BYTES, path, 'hash bytes'),
    },
    notedWrites,
  };
}
