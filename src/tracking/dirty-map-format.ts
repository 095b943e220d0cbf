/**
 * Layout of a persisted dirty map (`DirtyMap.serialize()`), version 1.
 * Described in full in docs/formats/dirty-map.md; every multi-byte field is
 * little-endian. The header is built and checked in TypeScript; the body is
 * written and decoded by the addon (native/dirty-map.cc), whose record kinds
 * and chunk size are repeated here so the document has one source.
 */

/** "BRDIRTYM": identifies the file; a reader refuses anything else. */
export const DIRTY_MAP_MAGIC = Buffer.from('BRDIRTYM', 'latin1');
export const DIRTY_MAP_FORMAT_VERSION = 1;

/** 8 bytes: {@link DIRTY_MAP_MAGIC}. */
export const DM_MAGIC_OFFSET = 0;
/** u32: {@link DIRTY_MAP_FORMAT_VERSION}. */
export const DM_VERSION_OFFSET = 8;
/** u32: bytes per block, a power of two from 512 to 1 MiB. */
export const DM_GRANULARITY_OFFSET = 12;
/** u64: size of the tracked disk in bytes. */
export const DM_DISK_SIZE_OFFSET = 16;
/** u64: number of dirty blocks, checked against the decoded body. */
export const DM_DIRTY_BLOCKS_OFFSET = 24;
/** u64: length of the body in bytes; the file is exactly header + body. */
export const DM_BODY_BYTES_OFFSET = 32;
/** u64: XXH64 (seed 0) of the body bytes. */
export const DM_BODY_CHECKSUM_OFFSET = 40;
/** 8 bytes: reserved, written as zero, refused when not zero. */
export const DM_RESERVED_OFFSET = 48;
/** u64: XXH64 (seed 0) of header bytes [0, 56). */
export const DM_HEADER_CHECKSUM_OFFSET = 56;
/** The header is 64 bytes; the body starts right after it. */
export const DM_HEADER_BYTES = 64;
export const DM_BODY_OFFSET = DM_HEADER_BYTES;
export const DM_RESERVED_BYTES = 8;

/** Blocks per chunk: the body holds one record per chunk with dirty blocks. */
export const DM_CHUNK_BLOCKS = 65536;
/** Record kind: every block of the chunk is dirty; no payload. */
export const DM_RECORD_FULL = 1;
/** Record kind: varint run count, then (gap, length - 1) varint pairs. */
export const DM_RECORD_RUNS = 2;
/** Record kind: ceil(chunkBlocks / 8) bytes, bit i (LSB first) = block i. */
export const DM_RECORD_BITMAP = 3;
