import { BlockrelayError } from '../retry/blockrelay-error';
import { isErrorCode, type ErrorCode } from '../retry/error-codes';
import type { Extent } from '../targets/disk-target';
import { HASH_BYTES } from './block-hasher';

/**
 * The messages that cross the resync seam between the source side (which
 * runs the engine) and the target side (which owns the target disk). They are
 * encoded to bytes even in process, so the bytes the engine reports as sent
 * are the bytes a network transport would carry, and the HTTP transport only
 * has to move these buffers (one request body, one response body).
 *
 * Every message starts with an 8-byte header, little-endian:
 *   0  u8  type     (requests 0x01-0x04, responses 0x81-0x84, error 0xFF)
 *   1  u8  version  (WIRE_VERSION)
 *   2  u16 reserved (0)
 *   4  u32 count    (ranges, hashes or runs, by type)
 * The bodies are described next to each encoder and in
 * docs/formats/resync-state.md ("Wire messages").
 */
export const WIRE_VERSION = 1;
export const WIRE_HEADER_BYTES = 8;
export const HASH_REQUEST_FIXED_BYTES = 8; // u32 fineBlockBytes, u32 groupBlocks
export const RANGE_BYTES = 16; // u64 offset, u64 length
export const RUN_HEADER_BYTES = 12; // u64 offset, u32 length

export const MSG_INFO = 0x01;
export const MSG_HASH = 0x02;
export const MSG_WRITE = 0x03;
export const MSG_FLUSH = 0x04;
export const MSG_INFO_REPLY = 0x81;
export const MSG_HASH_REPLY = 0x82;
export const MSG_WRITE_REPLY = 0x83;
export const MSG_FLUSH_REPLY = 0x84;
export const MSG_ERROR = 0xff;

/** Most ranges one hash request may name. */
export const MAX_RANGES_PER_REQUEST = 65_536;
/** Most disk bytes one hash request may ask the target to read and hash. */
export const MAX_HASH_SPAN_BYTES = 256 * 1024 * 1024;
/** Most data bytes one write request may carry. */
export const MAX_WRITE_DATA_BYTES = 64 * 1024 * 1024;
/** Block sizes the seam accepts: powers of two in this range. */
export const MIN_BLOCK_BYTES = 512;
export const MAX_BLOCK_BYTES = 16 * 1024 * 1024;

export interface HashRequest {
  readonly fineBlockBytes: number;
  readonly groupBlocks: number;
  readonly ranges: readonly Extent[];
}

export interface WriteRun {
  readonly offset: number;
  readonly data: Buffer;
}

export interface TargetInfo {
  readonly sizeBytes: number;
  readonly alignmentBytes: number;
  readonly spec: string;
}

export type WireRequest =
  | { readonly type: typeof MSG_INFO }
  | { readonly type: typeof MSG_HASH; readonly request: HashRequest }
  | { readonly type: typeof MSG_WRITE; readonly runs: readonly WriteRun[] }
  | { readonly type: typeof MSG_FLUSH };

/** Hashes a range yields: fine blocks rounded up, then groups rounded up. */
export function hashCountForRange(lengthBytes: number, fineBlockBytes: number, groupBlocks: number): number {
  return Math.ceil(Math.ceil(lengthBytes / fineBlockBytes) / groupBlocks);
}

function header(type: number, count: number, bodyBytes: number): Buffer {
  const buf = Buffer.alloc(WIRE_HEADER_BYTES + bodyBytes);
  buf.writeUInt8(type, 0);
  buf.writeUInt8(WIRE_VERSION, 1);
  buf.writeUInt32LE(count, 4);
  return buf;
}

export function encodeInfoRequest(): Buffer {
  return header(MSG_INFO, 0, 0);
}

export function encodeFlushRequest(): Buffer {
  return header(MSG_FLUSH, 0, 0);
}

/** Body: u32 fineBlockBytes, u32 groupBlocks, then count × (u64 offset, u64 length). */
export function encodeHashRequest(req: HashRequest): Buffer {
  const buf = header(MSG_HASH, req.ranges.length, HASH_REQUEST_FIXED_BYTES + req.ranges.length * RANGE_BYTES);
  buf.writeUInt32LE(req.fineBlockBytes, WIRE_HEADER_BYTES);
  buf.writeUInt32LE(req.groupBlocks, WIRE_HEADER_BYTES + 4);
  let pos = WIRE_HEADER_BYTES + HASH_REQUEST_FIXED_BYTES;
  for (const r of req.ranges) {
    buf.writeBigUInt64LE(BigInt(r.offset), pos);
    buf.writeBigUInt64LE(BigInt(r.length), pos + 8);
    pos += RANGE_BYTES;
  }
  return buf;
}

/** Body: count × (u64 offset, u32 length, length data bytes). */
export function encodeWriteRequest(runs: readonly WriteRun[]): Buffer {
  let body = 0;
  for (const r of runs) body += RUN_HEADER_BYTES + r.data.length;
  const buf = header(MSG_WRITE, runs.length, body);
  let pos = WIRE_HEADER_BYTES;
  for (const r of runs) {
    buf.writeBigUInt64LE(BigInt(r.offset), pos);
    buf.writeUInt32LE(r.data.length, pos + 8);
    r.data.copy(buf, pos + RUN_HEADER_BYTES);
    pos += RUN_HEADER_BYTES + r.data.length;
  }
  return buf;
}

/** Body: u64 sizeBytes, u32 alignmentBytes, u32 specBytes, spec (UTF-8). */
export function encodeInfoReply(info: TargetInfo): Buffer {
  const spec = Buffer.from(info.spec, 'utf8');
  const buf = header(MSG_INFO_REPLY, 0, 16 + spec.length);
  buf.writeBigUInt64LE(BigInt(info.sizeBytes), WIRE_HEADER_BYTES);
  buf.writeUInt32LE(info.alignmentBytes, WIRE_HEADER_BYTES + 8);
  buf.writeUInt32LE(spec.length, WIRE_HEADER_BYTES + 12);
  spec.copy(buf, WIRE_HEADER_BYTES + 16);
  return buf;
}

/** Body: count × u64 hash, in range order. */
export function encodeHashReply(hashes: Buffer): Buffer {
  const buf = header(MSG_HASH_REPLY, hashes.length / HASH_BYTES, hashes.length);
  hashes.copy(buf, WIRE_HEADER_BYTES);
  return buf;
}

export function encodeWriteReply(runCount: number): Buffer {
  return header(MSG_WRITE_REPLY, runCount, 0);
}

export function encodeFlushReply(): Buffer {
  return header(MSG_FLUSH_REPLY, 0, 0);
}

/** Body: u16 codeBytes, code, u32 messageBytes, message (UTF-8). */
export function encodeErrorReply(code: string, message: string): Buffer {
  const c = Buffer.from(code, 'utf8');
  const m = Buffer.from(message, 'utf8');
  const buf = header(MSG_ERROR, 0, 2 + c.length + 4 + m.length);
  let pos = WIRE_HEADER_BYTES;
  buf.writeUInt16LE(c.length, pos);
  c.copy(buf, pos + 2);
  pos += 2 + c.length;
  buf.writeUInt32LE(m.length, pos);
  m.copy(buf, pos + 4);
  return buf;
}

function protocolError(message: string, offset: number): BlockrelayError {
  return new BlockrelayError('BR_RESYNC_PROTOCOL', `resync message damaged at byte ${offset}: ${message}`, { details: { offset } });
}

function need(buf: Buffer, offset: number, bytes: number, what: string): void {
  if (offset + bytes > buf.length) throw protocolError(`${what} needs ${bytes} bytes, message has ${buf.length - offset} left`, offset);
}

function readU64(buf: Buffer, offset: number, what: string): number {
  need(buf, offset, 8, what);
  const v = buf.readBigUInt64LE(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError(`${what} ${v} is beyond 2^53`, offset);
  return Number(v);
}

/** Checks the header and returns its type and count. */
export function decodeHeader(buf: Buffer): { type: number; count: number } {
  need(buf, 0, WIRE_HEADER_BYTES, 'header');
  const version = buf.readUInt8(1);
  if (version !== WIRE_VERSION) throw protocolError(`version ${version}, expected ${WIRE_VERSION}`, 1);
  return { type: buf.readUInt8(0), count: buf.readUInt32LE(4) };
}

function checkBlockSize(fineBlockBytes: number, offset: number): void {
  const pow2 = fineBlockBytes > 0 && (fineBlockBytes & (fineBlockBytes - 1)) === 0;
  if (!pow2 || fineBlockBytes < MIN_BLOCK_BYTES || fineBlockBytes > MAX_BLOCK_BYTES) {
    throw protocolError(`block size ${fineBlockBytes} is not a power of two in [${MIN_BLOCK_BYTES}, ${MAX_BLOCK_BYTES}]`, offset);
  }
}

/** Decodes and validates a whole request before anything acts on it. */
export function decodeRequest(buf: Buffer): WireRequest {
  const { type, count } = decodeHeader(buf);
  switch (type) {
    case MSG_INFO:
    case MSG_FLUSH:
      if (buf.length !== WIRE_HEADER_BYTES) throw protocolError(`${buf.length - WIRE_HEADER_BYTES} unexpected trailing bytes`, WIRE_HEADER_BYTES);
      return { type };
    case MSG_HASH: {
      if (count > MAX_RANGES_PER_REQUEST) throw protocolError(`${count} ranges, at most ${MAX_RANGES_PER_REQUEST}`, 4);
      const expected = WIRE_HEADER_BYTES + HASH_REQUEST_FIXED_BYTES + count * RANGE_BYTES;
      if (buf.length !== expected) throw protocolError(`hash request of ${count} ranges must be ${expected} bytes, is ${buf.length}`, Math.min(buf.length, expected));
      const fineBlockBytes = buf.readUInt32LE(WIRE_HEADER_BYTES);
      checkBlockSize(fineBlockBytes, WIRE_HEADER_BYTES);
      const groupBlocks = buf.readUInt32LE(WIRE_HEADER_BYTES + 4);
      if (groupBlocks < 1) throw protocolError('group of 0 blocks', WIRE_HEADER_BYTES + 4);
      const ranges: Extent[] = [];
      let span = 0;
      for (let i = 0, pos = WIRE_HEADER_BYTES + HASH_REQUEST_FIXED_BYTES; i < count; i++, pos += RANGE_BYTES) {
        const offset = readU64(buf, pos, 'range offset');
        const length = readU64(buf, pos + 8, 'range length');
        if (offset % fineBlockBytes !== 0) throw protocolError(`range offset ${offset} is not a multiple of the block size ${fineBlockBytes}`, pos);
        span += length;
        if (span > MAX_HASH_SPAN_BYTES) throw protocolError(`ranges cover more than ${MAX_HASH_SPAN_BYTES} bytes`, pos + 8);
        ranges.push({ offset, length });
      }
      return { type, request: { fineBlockBytes, groupBlocks, ranges } };
    }
    case MSG_WRITE: {
      const runs: WriteRun[] = [];
      let pos = WIRE_HEADER_BYTES;
      let total = 0;
      for (let i = 0; i < count; i++) {
        const offset = readU64(buf, pos, 'run offset');
        need(buf, pos + 8, 4, 'run length');
        const length = buf.readUInt32LE(pos + 8);
        total += length;
        if (total > MAX_WRITE_DATA_BYTES) throw protocolError(`runs carry more than ${MAX_WRITE_DATA_BYTES} bytes`, pos + 8);
        need(buf, pos + RUN_HEADER_BYTES, length, 'run data');
        runs.push({ offset, data: buf.subarray(pos + RUN_HEADER_BYTES, pos + RUN_HEADER_BYTES + length) });
        pos += RUN_HEADER_BYTES + length;
      }
      if (pos !== buf.length) throw protocolError(`${buf.length - pos} unexpected trailing bytes`, pos);
      return { type, runs };
    }
    default:
      throw protocolError(`unknown request type 0x${type.toString(16)}`, 0);
  }
}

/** Throws the error a target side reported, keeping its code when it is one of ours. */
function raiseErrorReply(buf: Buffer): never {
  let pos = WIRE_HEADER_BYTES;
  need(buf, pos, 2, 'error code length');
  const codeBytes = buf.readUInt16LE(pos);
  need(buf, pos + 2, codeBytes, 'error code');
  const code = buf.toString('utf8', pos + 2, pos + 2 + codeBytes);
  pos += 2 + codeBytes;
  need(buf, pos, 4, 'error message length');
  const messageBytes = buf.readUInt32LE(pos);
  need(buf, pos + 4, messageBytes, 'error message');
  const message = buf.toString('utf8', pos + 4, pos + 4 + messageBytes);
  const known: ErrorCode = isErrorCode(code) ? code : 'BR_INTERNAL';
  throw new BlockrelayError(known, `target side: ${message}`, { details: { remoteCode: code } });
}

/** Checks a reply's type (raising a reported error) and returns its count. */
export function expectReply(buf: Buffer, type: number): number {
  const h = decodeHeader(buf);
  if (h.type === MSG_ERROR) raiseErrorReply(buf);
  if (h.type !== type) throw protocolError(`reply type 0x${h.type.toString(16)}, expected 0x${type.toString(16)}`, 0);
  return h.count;
}

export function decodeInfoReply(buf: Buffer): TargetInfo {
  expectReply(buf, MSG_INFO_REPLY);
  const sizeBytes = readU64(buf, WIRE_HEADER_BYTES, 'size');
  need(buf, WIRE_HEADER_BYTES + 8, 8, 'alignment and spec length');
  const alignmentBytes = buf.readUInt32LE(WIRE_HEADER_BYTES + 8);
  const specBytes = buf.readUInt32LE(WIRE_HEADER_BYTES + 12);
  need(buf, WIRE_HEADER_BYTES + 16, specBytes, 'spec');
  return { sizeBytes, alignmentBytes, spec: buf.toString('utf8', WIRE_HEADER_BYTES + 16, WIRE_HEADER_BYTES + 16 + specBytes) };
}

/** Returns the hashes of a hash reply, checking there are exactly `expectedCount`. */
export function decodeHashReply(buf: Buffer, expectedCount: number): Buffer {
  const count = expectReply(buf, MSG_HASH_REPLY);
  if (count !== expectedCount) throw protocolError(`${count} hashes, expected ${expectedCount}`, 4);
  if (buf.length !== WIRE_HEADER_BYTES + count * HASH_BYTES) throw protocolError(`hash reply of ${count} hashes is ${buf.length} bytes`, WIRE_HEADER_BYTES);
  return buf.subarray(WIRE_HEADER_BYTES);
}
