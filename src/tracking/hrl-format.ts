import { randomBytes } from 'node:crypto';
import { hrlChecksum as hrlChecksumNative } from './hrl-checksum';

/**
 * The [MS-HRL] version 2 on-disk layout: every offset and size as a named
 * constant, and pure encode/decode functions for the three structures the
 * spec defines (file header, metadata header, metadata entry). All integers
 * are little-endian and the structs are packed (see docs/formats/ms-hrl.md).
 *
 * Decoding never validates; `hrl-reader.ts` applies the rules and raises the
 * coded errors, so a damaged structure can still be shown by `hrl inspect`.
 */

// ---- file header (_CTLOG_HEADER_PACKED, [MS-HRL] §2.2) ----
export const HRL_HEADER_SIZE = 4096;
export const HRL_COOKIE_OFFSET = 0;
export const HRL_COOKIE_SIZE = 8;
export const HRL_LOG_FORMAT_VERSION_OFFSET = 8;
export const HRL_TIMESTAMP_OFFSET = 12;
export const HRL_CREATOR_APPLICATION_OFFSET = 16;
export const HRL_CREATOR_APPLICATION_SIZE = 4;
export const HRL_CREATOR_VERSION_OFFSET = 20;
export const HRL_ORIGINAL_SIZE_OFFSET = 24;
export const HRL_CURRENT_SIZE_OFFSET = 32;
export const HRL_HEADER_CHECKSUM_OFFSET = 40;
export const HRL_EOL_LOCATION_OFFSET = 44;
export const HRL_ERROR_CODE_OFFSET = 52;
export const HRL_METADATA_SIZE_OFFSET = 56;
export const HRL_UNIQUE_ID_OFFSET = 60;
export const HRL_PREVIOUS_UNIQUE_ID_OFFSET = 76;
export const HRL_LAST_MODIFIED_TIMESTAMP_OFFSET = 92;
export const HRL_TOTAL_METADATA_ENTRIES_OFFSET = 96;
export const HRL_FILE_TYPE_OFFSET = 104;
export const HRL_FLAGS_OFFSET = 108;
export const HRL_FLAGS_SIZE = 2;
export const HRL_VHD2_DATA_WRITE_GUID_OFFSET = 110;
export const HRL_HEADER_RESERVED_OFFSET = 126;
export const HRL_HEADER_RESERVED_SIZE = 3970;
export const HRL_GUID_SIZE = 16;

/** The cookie "msctlog" plus a NUL in byte 7 (notes §5.3); readers compare the first 7 bytes. */
export const HRL_COOKIE = Buffer.from('msctlog\0', 'latin1');
export const HRL_COOKIE_COMPARED_BYTES = 7;
export const HRL_VERSION_2 = 0x0002_0000;
export const HRL_VERSION_1 = 0x0001_0000;
export const HRL_FILE_TYPE_HRL = 0;
/** What blockrelay writes as CreatorApplication ("br" + NULs); readers do not check it. */
export const HRL_CREATOR_APPLICATION = Buffer.from('br\0\0', 'latin1');
/** CreatorVersion: major in the high 16 bits, minor in the low 16 (0.1). */
export const HRL_CREATOR_VERSION = 0x0000_0001;

// ---- metadata header (_CTLOG_METADATA_HEADER_PACKED, §2.3) ----
export const HRL_METADATA_HEADER_SIZE = 32;
export const HRL_MH_PREVIOUS_LOCATION_OFFSET = 0;
export const HRL_MH_VALID_ENTRIES_OFFSET = 8;
export const HRL_MH_CHECKSUM_OFFSET = 12;
export const HRL_MH_RESERVED_OFFSET = 16;
export const HRL_MH_RESERVED_SIZE = 16;

// ---- metadata entry (_CTLOG_METADATA_ENTRY_PACKED, §2.4) ----
export const HRL_METADATA_ENTRY_SIZE = 32;
export const HRL_ME_BYTE_OFFSET_OFFSET = 0;
export const HRL_ME_CHECKSUM_OFFSET = 8;
export const HRL_ME_DATA_LENGTH_OFFSET = 12;
export const HRL_ME_TIMESTAMP_OFFSET = 16;
export const HRL_ME_META_OPERATION_OFFSET = 20;
export const HRL_ME_DATA_CHECKSUM_OFFSET = 21;
export const HRL_ME_LOCATION_OFFSET = 25;
export const HRL_ME_RESERVED_OFFSET = 26;
export const HRL_ME_RESERVED_SIZE = 6;
/** The only operation [MS-HRL] defines. */
export const HRL_META_OPERATION_WRITE = 1;

// ---- metadata block sizes ----
export const HRL_DEFAULT_METADATA_SIZE = 4096;
/** Smallest block blockrelay accepts: the header plus one entry slot. */
export const HRL_MIN_METADATA_SIZE = 64;
/** Largest block blockrelay accepts (bounds the reader's block buffer). */
export const HRL_MAX_METADATA_SIZE = 16 * 1024 * 1024;
/** DataLength is a ULONG. */
export const HRL_MAX_DATA_LENGTH = 0xffff_ffff;

/** Entry slots in a block of `metadataSizeBytes`: (4096 − 32) / 32 = 127 by default. */
export function hrlEntriesPerBlock(metadataSizeBytes: number): number {
  return Math.floor((metadataSizeBytes - HRL_METADATA_HEADER_SIZE) / HRL_METADATA_ENTRY_SIZE);
}

/** 2000-01-01T00:00:00Z, the epoch of every HRL timestamp. */
export const HRL_EPOCH_MS = Date.UTC(2000, 0, 1);

/** Converts Unix milliseconds to HRL seconds since 2000, clamped to the ULONG range. */
export function hrlTimestampFromMs(unixMs: number): number {
  const s = Math.floor((unixMs - HRL_EPOCH_MS) / 1000);
  return Math.min(0xffff_ffff, Math.max(0, s));
}

/** Converts HRL seconds since 2000 to an ISO-8601 string. */
export function hrlTimestampToIso(seconds: number): string {
  return new Date(HRL_EPOCH_MS + seconds * 1000).toISOString();
}

/**
 * The §2.6 checksum (bitwise NOT of the 32-bit byte sum, skipping the 4 bytes
 * at `ignoreOffset`; negative ignores nothing): the addon's fast path for
 * payloads, the JS loop for 32-byte structures.
 */
export function hrlChecksum(data: Uint8Array, ignoreOffset = -1): number {
  return hrlChecksumNative(data, ignoreOffset < 0 ? -1 : ignoreOffset);
}

/**
 * The 32-bit byte sum behind a checksum, so payloads read in pieces can be
 * summed piecewise: `~(sumA + sumB)` is the checksum of A followed by B.
 */
export function hrlByteSum(data: Uint8Array): number {
  return ~hrlChecksum(data) >>> 0;
}

/** Turns a byte sum back into the §2.6 checksum value. */
export function hrlChecksumFromSum(sum: number): number {
  return ~sum >>> 0;
}

// ---- GUIDs ----

const GUID_PATTERN = /^\{?([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})\}?$/i;

/**
 * Encodes a GUID string in the Windows in-memory layout (Data1..Data3
 * little-endian, Data4 as written), the reading taken for notes §5.5.
 */
export function guidToBytes(guid: string): Buffer {
  const m = GUID_PATTERN.exec(guid);
  if (m === null) throw new TypeError(`not a GUID: '${guid}'`);
  const out = Buffer.alloc(HRL_GUID_SIZE);
  out.writeUInt32LE(parseInt(m[1]!, 16), 0);
  out.writeUInt16LE(parseInt(m[2]!, 16), 4);
  out.writeUInt16LE(parseInt(m[3]!, 16), 6);
  Buffer.from(m[4]! + m[5]!, 'hex').copy(out, 8);
  return out;
}

/** Decodes 16 bytes in the Windows GUID layout to lower-case `xxxxxxxx-xxxx-…` text. */
export function guidFromBytes(bytes: Uint8Array): string {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, HRL_GUID_SIZE);
  const d1 = b.readUInt32LE(0).toString(16).padStart(8, '0');
  const d2 = b.readUInt16LE(4).toString(16).padStart(4, '0');
  const d3 = b.readUInt16LE(6).toString(16).padStart(4, '0');
  const d4 = b.subarray(8, 10).toString('hex');
  const d5 = b.subarray(10, 16).toString('hex');
  return `${d1}-${d2}-${d3}-${d4}-${d5}`;
}

/** A random (version 4) GUID as text. */
export function randomGuid(): string {
  const b = randomBytes(16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The all-zero GUID, used as PreviousUniqueId of the first log of a disk. */
export const NIL_GUID = '00000000-0000-0000-0000-000000000000';

// ---- 64-bit fields ----

const TWO_32 = 0x1_0000_0000;
/** High word of the largest safe integer (2^53 − 1). */
const MAX_SAFE_HIGH_WORD = 0x1f_ffff;

/**
 * Reads a ULONG64 as a JS number; values above 2^53 − 1 come back as
 * Infinity so range checks refuse them. Two 32-bit reads: no BigInt on the
 * hot path of every entry.
 */
export function readU64(buf: Buffer, offset: number): number {
  const low = buf.readUInt32LE(offset);
  const high = buf.readUInt32LE(offset + 4);
  return high > MAX_SAFE_HIGH_WORD ? Number.POSITIVE_INFINITY : high * TWO_32 + low;
}

/** Writes a safe non-negative integer as a ULONG64. */
function writeU64(buf: Buffer, offset: number, value: number): void {
  buf.writeUInt32LE(value % TWO_32, offset);
  buf.writeUInt32LE(Math.floor(value / TWO_32), offset + 4);
}

// ---- file header ----

export interface HrlHeader {
  /** The 8 cookie bytes as stored. */
  readonly cookie: Buffer;
  readonly logFormatVersion: number;
  /** Creation time, seconds since 2000-01-01 UTC. */
  readonly timestamp: number;
  readonly creatorApplication: Buffer;
  readonly creatorVersion: number;
  readonly originalSize: number;
  readonly currentSize: number;
  /** The stored checksum (decode) or ignored (encode computes it). */
  readonly checksum: number;
  /** 0 while the log is open. */
  readonly eolLocation: number;
  readonly errorCode: number;
  readonly metadataSize: number;
  readonly uniqueId: string;
  readonly previousUniqueId: string;
  readonly lastModifiedTimestamp: number;
  readonly totalMetadataEntries: number;
  readonly fileType: number;
  readonly flags: number;
  readonly vhd2DataWriteGuid: string;
}

/** Header fields a writer chooses; the rest get their version-2 defaults. */
export type HrlHeaderInput = Omit<HrlHeader, 'cookie' | 'logFormatVersion' | 'checksum' | 'creatorApplication' | 'creatorVersion' | 'fileType' | 'flags' | 'errorCode'> &
  Partial<Pick<HrlHeader, 'creatorApplication' | 'creatorVersion' | 'errorCode'>>;

/** Encodes a version-2 header (4096 bytes) with its checksum at offset 40. */
export function encodeHrlHeader(h: HrlHeaderInput): Buffer {
  const buf = Buffer.alloc(HRL_HEADER_SIZE);
  HRL_COOKIE.copy(buf, HRL_COOKIE_OFFSET);
  buf.writeUInt32LE(HRL_VERSION_2, HRL_LOG_FORMAT_VERSION_OFFSET);
  buf.writeUInt32LE(h.timestamp, HRL_TIMESTAMP_OFFSET);
  (h.creatorApplication ?? HRL_CREATOR_APPLICATION).copy(buf, HRL_CREATOR_APPLICATION_OFFSET, 0, HRL_CREATOR_APPLICATION_SIZE);
  buf.writeUInt32LE(h.creatorVersion ?? HRL_CREATOR_VERSION, HRL_CREATOR_VERSION_OFFSET);
  writeU64(buf, HRL_ORIGINAL_SIZE_OFFSET, h.originalSize);
  writeU64(buf, HRL_CURRENT_SIZE_OFFSET, h.currentSize);
  writeU64(buf, HRL_EOL_LOCATION_OFFSET, h.eolLocation);
  buf.writeInt32LE(h.errorCode ?? 0, HRL_ERROR_CODE_OFFSET);
  buf.writeUInt32LE(h.metadataSize, HRL_METADATA_SIZE_OFFSET);
  guidToBytes(h.uniqueId).copy(buf, HRL_UNIQUE_ID_OFFSET);
  guidToBytes(h.previousUniqueId).copy(buf, HRL_PREVIOUS_UNIQUE_ID_OFFSET);
  buf.writeUInt32LE(h.lastModifiedTimestamp, HRL_LAST_MODIFIED_TIMESTAMP_OFFSET);
  writeU64(buf, HRL_TOTAL_METADATA_ENTRIES_OFFSET, h.totalMetadataEntries);
  buf.writeUInt32LE(HRL_FILE_TYPE_HRL, HRL_FILE_TYPE_OFFSET);
  guidToBytes(h.vhd2DataWriteGuid).copy(buf, HRL_VHD2_DATA_WRITE_GUID_OFFSET);
  buf.writeUInt32LE(hrlChecksum(buf, HRL_HEADER_CHECKSUM_OFFSET), HRL_HEADER_CHECKSUM_OFFSET);
  return buf;
}

/** Decodes the header fields of a 4096-byte buffer without judging them. */
export function decodeHrlHeader(buf: Buffer): HrlHeader {
  return {
    cookie: Buffer.from(buf.subarray(HRL_COOKIE_OFFSET, HRL_COOKIE_OFFSET + HRL_COOKIE_SIZE)),
    logFormatVersion: buf.readUInt32LE(HRL_LOG_FORMAT_VERSION_OFFSET),
    timestamp: buf.readUInt32LE(HRL_TIMESTAMP_OFFSET),
    creatorApplication: Buffer.from(buf.subarray(HRL_CREATOR_APPLICATION_OFFSET, HRL_CREATOR_APPLICATION_OFFSET + HRL_CREATOR_APPLICATION_SIZE)),
    creatorVersion: buf.readUInt32LE(HRL_CREATOR_VERSION_OFFSET),
    originalSize: readU64(buf, HRL_ORIGINAL_SIZE_OFFSET),
    currentSize: readU64(buf, HRL_CURRENT_SIZE_OFFSET),
    checksum: buf.readUInt32LE(HRL_HEADER_CHECKSUM_OFFSET),
    eolLocation: readU64(buf, HRL_EOL_LOCATION_OFFSET),
    errorCode: buf.readInt32LE(HRL_ERROR_CODE_OFFSET),
    metadataSize: buf.readUInt32LE(HRL_METADATA_SIZE_OFFSET),
    uniqueId: guidFromBytes(buf.subarray(HRL_UNIQUE_ID_OFFSET)),
    previousUniqueId: guidFromBytes(buf.subarray(HRL_PREVIOUS_UNIQUE_ID_OFFSET)),
    lastModifiedTimestamp: buf.readUInt32LE(HRL_LAST_MODIFIED_TIMESTAMP_OFFSET),
    totalMetadataEntries: readU64(buf, HRL_TOTAL_METADATA_ENTRIES_OFFSET),
    fileType: buf.readUInt32LE(HRL_FILE_TYPE_OFFSET),
    flags: buf.readUInt16LE(HRL_FLAGS_OFFSET),
    vhd2DataWriteGuid: guidFromBytes(buf.subarray(HRL_VHD2_DATA_WRITE_GUID_OFFSET)),
  };
}

// ---- metadata header ----

export interface HrlMetadataHeader {
  /** Distance back from this block's start to the previous block's start; 0 in the first block. */
  readonly previousMetadataLocation: number;
  readonly validMetadataEntries: number;
  readonly checksum: number;
}

/** Encodes a 32-byte metadata header into `out` at `at`, computing its checksum. */
export function encodeHrlMetadataHeader(h: Omit<HrlMetadataHeader, 'checksum'>, out: Buffer = Buffer.alloc(HRL_METADATA_HEADER_SIZE), at = 0): Buffer {
  out.fill(0, at, at + HRL_METADATA_HEADER_SIZE);
  writeU64(out, at + HRL_MH_PREVIOUS_LOCATION_OFFSET, h.previousMetadataLocation);
  out.writeUInt32LE(h.validMetadataEntries, at + HRL_MH_VALID_ENTRIES_OFFSET);
  const view = out.subarray(at, at + HRL_METADATA_HEADER_SIZE);
  out.writeUInt32LE(hrlChecksum(view, HRL_MH_CHECKSUM_OFFSET), at + HRL_MH_CHECKSUM_OFFSET);
  return out;
}

export function decodeHrlMetadataHeader(buf: Buffer, at = 0): HrlMetadataHeader {
  return {
    previousMetadataLocation: readU64(buf, at + HRL_MH_PREVIOUS_LOCATION_OFFSET),
    validMetadataEntries: buf.readUInt32LE(at + HRL_MH_VALID_ENTRIES_OFFSET),
    checksum: buf.readUInt32LE(at + HRL_MH_CHECKSUM_OFFSET),
  };
}

/** The checksum a 32-byte metadata header at `at` should carry. */
export function computeHrlMetadataHeaderChecksum(buf: Buffer, at = 0): number {
  return hrlChecksum(buf.subarray(at, at + HRL_METADATA_HEADER_SIZE), HRL_MH_CHECKSUM_OFFSET);
}

// ---- metadata entry ----

export interface HrlMetadataEntry {
  /** Byte offset on the disk. */
  readonly byteOffset: number;
  readonly checksum: number;
  readonly dataLength: number;
  /** Seconds since 2000-01-01 UTC. */
  readonly timestamp: number;
  readonly metaOperation: number;
  /** §2.6 checksum of the payload; 0 means "not recorded" (see docs). */
  readonly dataChecksum: number;
  readonly location: number;
}

/** Encodes a 32-byte entry into `out` at `at`, computing its checksum (Location and Reserved 0). */
export function encodeHrlMetadataEntry(
  e: Omit<HrlMetadataEntry, 'checksum' | 'location' | 'metaOperation'> & { metaOperation?: number },
  out: Buffer = Buffer.alloc(HRL_METADATA_ENTRY_SIZE),
  at = 0,
): Buffer {
  out.fill(0, at, at + HRL_METADATA_ENTRY_SIZE);
  writeU64(out, at + HRL_ME_BYTE_OFFSET_OFFSET, e.byteOffset);
  out.writeUInt32LE(e.dataLength, at + HRL_ME_DATA_LENGTH_OFFSET);
  out.writeUInt32LE(e.timestamp, at + HRL_ME_TIMESTAMP_OFFSET);
  out.writeUInt8(e.metaOperation ?? HRL_META_OPERATION_WRITE, at + HRL_ME_META_OPERATION_OFFSET);
  out.writeUInt32LE(e.dataChecksum, at + HRL_ME_DATA_CHECKSUM_OFFSET);
  out.writeUInt32LE(computeHrlMetadataEntryChecksum(out, at), at + HRL_ME_CHECKSUM_OFFSET);
  return out;
}

export function decodeHrlMetadataEntry(buf: Buffer, at = 0): HrlMetadataEntry {
  return {
    byteOffset: readU64(buf, at + HRL_ME_BYTE_OFFSET_OFFSET),
    checksum: buf.readUInt32LE(at + HRL_ME_CHECKSUM_OFFSET),
    dataLength: buf.readUInt32LE(at + HRL_ME_DATA_LENGTH_OFFSET),
    timestamp: buf.readUInt32LE(at + HRL_ME_TIMESTAMP_OFFSET),
    metaOperation: buf.readUInt8(at + HRL_ME_META_OPERATION_OFFSET),
    dataChecksum: buf.readUInt32LE(at + HRL_ME_DATA_CHECKSUM_OFFSET),
    location: buf.readUInt8(at + HRL_ME_LOCATION_OFFSET),
  };
}

/** The checksum a 32-byte entry at `at` should carry. */
export function computeHrlMetadataEntryChecksum(buf: Buffer, at = 0): number {
  return hrlChecksum(buf.subarray(at, at + HRL_METADATA_ENTRY_SIZE), HRL_ME_CHECKSUM_OFFSET);
}

/** The checksum the 4096-byte header should carry. */
export function computeHrlHeaderChecksum(buf: Buffer): number {
  return hrlChecksum(buf.subarray(0, HRL_HEADER_SIZE), HRL_HEADER_CHECKSUM_OFFSET);
}

/** True when every byte of `buf[from, to)` is zero. */
export function isAllZero(buf: Buffer, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (buf[i] !== 0) return false;
  return true;
}
