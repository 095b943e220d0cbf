import { BlockrelayError } from '../../retry/blockrelay-error';

/**
 * Byte layout of a VMware hosted sparse extent ("Virtual Disk Format 5.0",
 * section "Hosted Sparse Extent Header"), the file a monolithicSparse VMDK
 * is. All integers little-endian; offsets in the header count 512-byte
 * sectors. See docs/formats/vmdk.md.
 */
export const SECTOR_BYTES = 512;
/** 'K','D','M','V' read as a little-endian uint32. */
export const SPARSE_MAGIC = 0x564d444b;
export const HEADER_BYTES = 512;

/** Field offsets within the 512-byte header. */
export const HDR = {
  magic: 0, // uint32
  version: 4, // uint32
  flags: 8, // uint32
  capacity: 12, // uint64 sectors
  grainSize: 20, // uint64 sectors
  descriptorOffset: 28, // uint64 sectors
  descriptorSize: 36, // uint64 sectors
  numGTEsPerGT: 44, // uint32
  rgdOffset: 48, // uint64 sectors
  gdOffset: 56, // uint64 sectors
  overHead: 64, // uint64 sectors
  uncleanShutdown: 72, // uint8
  singleEndLineChar: 73, // '\n'
  nonEndLineChar: 74, // ' '
  doubleEndLineChar1: 75, // '\r'
  doubleEndLineChar2: 76, // '\n'
  compressAlgorithm: 77, // uint16
} as const;

/** Header flag bits. */
export const FLAG_VALID_NEWLINE_TEST = 1 << 0;
export const FLAG_REDUNDANT_GRAIN_TABLE = 1 << 1;
/** GTE value 1 means "grain reads as zeroes" (qemu's zeroed_grain, VMware's zeroed-grain GTE). */
export const FLAG_ZEROED_GRAIN_GTE = 1 << 2;
export const FLAG_COMPRESSED_GRAINS = 1 << 16;
export const FLAG_MARKERS = 1 << 17;
const KNOWN_FLAGS = FLAG_VALID_NEWLINE_TEST | FLAG_REDUNDANT_GRAIN_TABLE | FLAG_ZEROED_GRAIN_GTE | FLAG_COMPRESSED_GRAINS | FLAG_MARKERS;

/** compressAlgorithm value for deflate (zlib stream), the only one VMware defines. */
export const COMPRESSION_DEFLATE = 1;
/** gdOffset meaning "the grain directory is found through the footer" (streamOptimized). */
export const GD_AT_END = 0xffffffffffffffffn;
/** How a decoded header says GD_AT_END (the field does not fit a safe integer). */
export const GD_OFFSET_AT_END = -1;
/**
 * streamOptimized tail: footer marker sector, footer (a header copy with
 * the real gdOffset), end-of-stream marker sector — the last 1536 bytes.
 */
export const FOOTER_MARKER_FROM_END = 1536;
export const FOOTER_FROM_END = 1024;
/** Marker types of streamOptimized metadata markers (uint32 at offset 12 of a marker sector). */
export const MARKER_FOOTER = 3;
/** A grain marker: uint64 lba (sectors), uint32 compressed size, then the data. */
export const GRAIN_MARKER_BYTES = 12;

/** Grain table entry values with special meaning. */
export const GTE_UNALLOCATED = 0;
export const GTE_ZEROED = 1;
export const GTE_BYTES = 4;

/** What blockrelay creates: 64 KiB grains, 512 entries per grain table (one GT maps 32 MiB). */
export const DEFAULT_GRAIN_SECTORS = 128;
export const DEFAULT_GTES_PER_GT = 512;
/** The embedded descriptor's reserved space, as VMware and qemu make it. */
export const DEFAULT_DESCRIPTOR_SECTORS = 20;
/** GTEs are uint32 sector numbers, so an extent file ends before 2 TiB. */
export const MAX_CAPACITY_SECTORS = 2 ** 32 - 1;
/** Largest grain we accept from foreign files (1 MiB): bounds per-grain buffers. */
export const MAX_GRAIN_SECTORS = 2048;
/** Largest embedded descriptor we read (1 MiB). */
export const MAX_DESCRIPTOR_SECTORS = 2048;

export interface SparseHeader {
  readonly version: number;
  readonly flags: number;
  readonly capacitySectors: number;
  readonly grainSectors: number;
  readonly descriptorOffsetSectors: number;
  readonly descriptorSectors: number;
  readonly gtesPerGt: number;
  readonly rgdOffsetSectors: number;
  readonly gdOffsetSectors: number;
  readonly overheadSectors: number;
  readonly uncleanShutdown: boolean;
  readonly compressAlgorithm: number;
}

/** Number of grain tables (= grain directory entries) for a capacity. */
export function gtCount(h: Pick<SparseHeader, 'capacitySectors' | 'grainSectors' | 'gtesPerGt'>): number {
  return Math.ceil(h.capacitySectors / (h.grainSectors * h.gtesPerGt));
}

/** Sectors one grain table occupies. */
export function gtSectors(h: Pick<SparseHeader, 'gtesPerGt'>): number {
  return Math.ceil((h.gtesPerGt * GTE_BYTES) / SECTOR_BYTES);
}

function u64(buf: Buffer, at: number, what: string, file: string): number {
  const v = buf.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(file, at, `${what} ${v} is out of range`);
  return Number(v);
}

export function corrupt(file: string, byteOffset: number, why: string): BlockrelayError {
  return new BlockrelayError('BR_TARGET_CORRUPT', `${file}: ${why} (byte offset ${byteOffset})`, { details: { file, byteOffset } });
}

/**
 * Decodes and validates a sparse extent header against the file's size.
 * Every field a reader relies on is checked here, so later code can index
 * tables without bounds surprises; damage names the field's byte offset.
 */
export function decodeSparseHeader(buf: Buffer, fileSizeBytes: number, file: string, options: { allowGdAtEnd?: boolean } = { allowGdAtEnd: true }): SparseHeader {
  if (buf.length < HEADER_BYTES || fileSizeBytes < HEADER_BYTES) throw corrupt(file, 0, `file of ${fileSizeBytes} bytes is too short for a sparse extent header`);
  if (buf.readUInt32LE(HDR.magic) !== SPARSE_MAGIC) throw corrupt(file, HDR.magic, 'bad magic: not a KDMV sparse extent');
  const version = buf.readUInt32LE(HDR.version);
  if (version < 1 || version > 3) throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${file}: sparse extent version ${version} is not supported`, { details: { file, byteOffset: HDR.version } });
  const flags = buf.readUInt32LE(HDR.flags);
  if ((flags & ~KNOWN_FLAGS) !== 0) throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${file}: unknown header flags 0x${flags.toString(16)}`, { details: { file, byteOffset: HDR.flags } });
  const compressAlgorithm = buf.readUInt16LE(HDR.compressAlgorithm);
  const compressed = (flags & FLAG_COMPRESSED_GRAINS) !== 0;
  // streamOptimized: deflate-compressed grains behind markers. Anything
  // else compressed, or markers without compression, we cannot read.
  if (compressed !== (compressAlgorithm === COMPRESSION_DEFLATE) || (compressed && (flags & FLAG_MARKERS) === 0) || (!compressed && (flags & FLAG_MARKERS) !== 0)) {
    throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${file}: compression flags 0x${flags.toString(16)} with algorithm ${compressAlgorithm} are not supported (only streamOptimized deflate)`, { details: { file, byteOffset: HDR.flags } });
  }
  const gdAtEnd = buf.readBigUInt64LE(HDR.gdOffset) === GD_AT_END;
  if (gdAtEnd && !options.allowGdAtEnd) throw corrupt(file, HDR.gdOffset, 'grain directory is "at the end" but this header is itself the footer');
  const h: SparseHeader = {
    version,
    flags,
    capacitySectors: u64(buf, HDR.capacity, 'capacity', file),
    grainSectors: u64(buf, HDR.grainSize, 'grainSize', file),
    descriptorOffsetSectors: u64(buf, HDR.descriptorOffset, 'descriptorOffset', file),
    descriptorSectors: u64(buf, HDR.descriptorSize, 'descriptorSize', file),
    gtesPerGt: buf.readUInt32LE(HDR.numGTEsPerGT),
    rgdOffsetSectors: u64(buf, HDR.rgdOffset, 'rgdOffset', file),
    gdOffsetSectors: gdAtEnd ? GD_OFFSET_AT_END : u64(buf, HDR.gdOffset, 'gdOffset', file),
    overheadSectors: u64(buf, HDR.overHead, 'overHead', file),
    uncleanShutdown: buf[HDR.uncleanShutdown] !== 0,
    compressAlgorithm,
  };
  if ((flags & FLAG_VALID_NEWLINE_TEST) !== 0) {
    // A descriptor moved through a text-mode transfer breaks these bytes
    // first; the image is then damaged everywhere.
    const nl = buf.subarray(HDR.singleEndLineChar, HDR.doubleEndLineChar2 + 1);
    if (!nl.equals(Buffer.from('\n \r\n', 'latin1'))) throw corrupt(file, HDR.singleEndLineChar, 'newline detection bytes are damaged (text-mode transfer?)');
  }
  if (h.capacitySectors === 0 || h.capacitySectors > MAX_CAPACITY_SECTORS) throw corrupt(file, HDR.capacity, `capacity ${h.capacitySectors} sectors is out of range`);
  if (h.grainSectors < 8 || h.grainSectors > MAX_GRAIN_SECTORS || (h.grainSectors & (h.grainSectors - 1)) !== 0) {
    throw corrupt(file, HDR.grainSize, `grainSize ${h.grainSectors} sectors is not a power of two between 8 and ${MAX_GRAIN_SECTORS}`);
  }
  if (h.gtesPerGt === 0 || h.gtesPerGt > 512 || (h.gtesPerGt * GTE_BYTES) % SECTOR_BYTES !== 0) {
    throw corrupt(file, HDR.numGTEsPerGT, `numGTEsPerGT ${h.gtesPerGt} is not a multiple of 128 up to 512`);
  }
  const fileSectors = Math.floor(fileSizeBytes / SECTOR_BYTES);
  if (h.descriptorOffsetSectors !== 0) {
    if (h.descriptorSectors === 0 || h.descriptorSectors > MAX_DESCRIPTOR_SECTORS || h.descriptorOffsetSectors + h.descriptorSectors > fileSectors) {
      throw corrupt(file, HDR.descriptorOffset, `embedded descriptor (sector ${h.descriptorOffsetSectors}, ${h.descriptorSectors} sectors) lies outside the ${fileSectors}-sector file`);
    }
  }
  const gdSectors = Math.ceil((gtCount(h) * GTE_BYTES) / SECTOR_BYTES);
  // A stream's real header (with the GD) is in the footer; the caller reads it.
  if (gdAtEnd) return h;
  if (h.gdOffsetSectors === 0 || h.gdOffsetSectors + gdSectors > fileSectors) {
    throw corrupt(file, HDR.gdOffset, `grain directory (sector ${h.gdOffsetSectors}, ${gdSectors} sectors) lies outside the ${fileSectors}-sector file`);
  }
  if ((flags & FLAG_REDUNDANT_GRAIN_TABLE) !== 0 && (h.rgdOffsetSectors === 0 || h.rgdOffsetSectors + gdSectors > fileSectors)) {
    throw corrupt(file, HDR.rgdOffset, `redundant grain directory (sector ${h.rgdOffsetSectors}) lies outside the ${fileSectors}-sector file`);
  }
  if (h.overheadSectors > fileSectors) throw corrupt(file, HDR.overHead, `file is truncated: ${fileSectors} sectors, overHead says ${h.overheadSectors}`);
  return h;
}

/** Encodes a header; the inverse of decodeSparseHeader for what we write. */
export function encodeSparseHeader(h: SparseHeader): Buffer {
  const buf = Buffer.alloc(HEADER_BYTES);
  buf.writeUInt32LE(SPARSE_MAGIC, HDR.magic);
  buf.writeUInt32LE(h.version, HDR.version);
  buf.writeUInt32LE(h.flags, HDR.flags);
  buf.writeBigUInt64LE(BigInt(h.capacitySectors), HDR.capacity);
  buf.writeBigUInt64LE(BigInt(h.grainSectors), HDR.grainSize);
  buf.writeBigUInt64LE(BigInt(h.descriptorOffsetSectors), HDR.descriptorOffset);
  buf.writeBigUInt64LE(BigInt(h.descriptorSectors), HDR.descriptorSize);
  buf.writeUInt32LE(h.gtesPerGt, HDR.numGTEsPerGT);
  buf.writeBigUInt64LE(BigInt(h.rgdOffsetSectors), HDR.rgdOffset);
  buf.writeBigUInt64LE(BigInt(h.gdOffsetSectors), HDR.gdOffset);
  buf.writeBigUInt64LE(BigInt(h.overheadSectors), HDR.overHead);
  buf[HDR.uncleanShutdown] = h.uncleanShutdown ? 1 : 0;
  buf.write('\n \r\n', HDR.singleEndLineChar, 'latin1');
  buf.writeUInt16LE(h.compressAlgorithm, HDR.compressAlgorithm);
  return buf;
}

/** Where a new extent's structures go: header, descriptor, RGD + its GTs, GD + its GTs, then grains. */
export interface SparseLayout {
  readonly header: SparseHeader;
  readonly gdSectors: number;
  /** First GT of each directory; GT i sits at `firstGt + i * gtSectors`. */
  readonly rgdFirstGtSector: number;
  readonly gdFirstGtSector: number;
}

/** The layout blockrelay creates, the same shape VMware and qemu use, with every GT preallocated. */
export function planSparseLayout(capacitySectors: number): SparseLayout {
  const base = { capacitySectors, grainSectors: DEFAULT_GRAIN_SECTORS, gtesPerGt: DEFAULT_GTES_PER_GT };
  const tables = gtCount(base);
  const gdSectors = Math.ceil((tables * GTE_BYTES) / SECTOR_BYTES);
  const tableSectors = tables * gtSectors(base);
  const descriptorOffsetSectors = 1;
  const rgdOffsetSectors = descriptorOffsetSectors + DEFAULT_DESCRIPTOR_SECTORS;
  const gdOffsetSectors = rgdOffsetSectors + gdSectors + tableSectors;
  const end = gdOffsetSectors + gdSectors + tableSectors;
  const overheadSectors = Math.ceil(end / DEFAULT_GRAIN_SECTORS) * DEFAULT_GRAIN_SECTORS;
  return {
    header: {
      version: 1,
      flags: FLAG_VALID_NEWLINE_TEST | FLAG_REDUNDANT_GRAIN_TABLE,
      ...base,
      descriptorOffsetSectors,
      descriptorSectors: DEFAULT_DESCRIPTOR_SECTORS,
      rgdOffsetSectors,
      gdOffsetSectors,
      overheadSectors,
      uncleanShutdown: false,
      compressAlgorithm: 0,
    },
    gdSectors,
    rgdFirstGtSector: rgdOffsetSectors + gdSectors,
    gdFirstGtSector: gdOffsetSectors + gdSectors,
  };
}
