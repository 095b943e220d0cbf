import { randomUUID } from 'node:crypto';
import { BlockrelayError } from '../../retry/blockrelay-error';

/**
 * The 512-byte VHD "hard disk footer" (Microsoft, "Virtual Hard Disk Image
 * Format Specification", October 2006). A fixed VHD is the raw disk data
 * followed by this footer; an Azure page blob holding a disk is the same
 * bytes. Every field is big-endian. `docs/formats/vhd.md` describes the
 * layout and how blockrelay reacts to damage.
 */
export const VHD_FOOTER_SIZE_BYTES = 512;

/** Byte offsets of the footer fields, from the start of the footer. */
export const VHD_FOOTER_OFFSETS = {
  cookie: 0, // 8 bytes, ASCII "conectix"
  features: 8, // u32
  fileFormatVersion: 12, // u32
  dataOffset: 16, // u64, all ones for a fixed disk
  timestamp: 24, // u32, seconds since 2000-01-01T00:00:00Z
  creatorApplication: 28, // 4 bytes
  creatorVersion: 32, // u32, major << 16 | minor
  creatorHostOs: 36, // 4 bytes
  originalSize: 40, // u64, bytes
  currentSize: 48, // u64, bytes
  diskGeometry: 56, // u16 cylinders, u8 heads, u8 sectors per track
  diskType: 60, // u32
  checksum: 64, // u32
  uniqueId: 68, // 16 bytes
  savedState: 84, // u8
  reserved: 85, // 427 bytes of zeroes
} as const;

export const VHD_COOKIE = 'conectix';
/** The "reserved" feature bit the spec says must always be set. */
export const VHD_FEATURES_RESERVED = 0x0000_0002;
export const VHD_FILE_FORMAT_VERSION = 0x0001_0000;
/** Data offset of a fixed disk: there is no further header structure. */
export const VHD_FIXED_DATA_OFFSET = 0xffff_ffff_ffff_ffffn;
export const VHD_TIMESTAMP_EPOCH_MS = Date.UTC(2000, 0, 1);
export const VHD_SECTOR_SIZE_BYTES = 512;

/**
 * Creator application written by blockrelay. qemu (block/vpc.c) derives the
 * disk size from the CHS geometry for unknown creators and for "vpc "/"qemu",
 * which truncates sizes the geometry cannot express exactly; for "win "
 * (Hyper-V) it trusts the current-size field, as Hyper-V and Azure do. Our
 * disks are made for Hyper-V/Azure semantics, where current size is the
 * truth, so we write the Hyper-V creator so that qemu agrees with Azure about
 * the size.
 */
export const VHD_CREATOR_APPLICATION = 'win ';
/** Creator version: Hyper-V's 10.0, for the same reason as the creator application. */
export const VHD_CREATOR_VERSION = 0x000a_0000;
/** Creator host OS: "Wi2k" (Windows), the value the spec gives for Windows hosts. */
export const VHD_CREATOR_HOST_OS = 'Wi2k';

export const VhdDiskType = {
  none: 0,
  fixed: 2,
  dynamic: 3,
  differencing: 4,
} as const;

/** Largest sector count the CHS geometry can express (65535 × 16 × 255). */
export const VHD_MAX_GEOMETRY_SECTORS = 65535 * 16 * 255;

export interface VhdGeometry {
  readonly cylinders: number;
  readonly heads: number;
  readonly sectorsPerTrack: number;
}

/** The decoded footer. Sizes are byte counts; text fields are the raw 4 ASCII bytes. */
export interface VhdFooter {
  readonly features: number;
  readonly fileFormatVersion: number;
  readonly dataOffset: bigint;
  readonly timestampSeconds: number;
  readonly creatorApplication: string;
  readonly creatorVersion: number;
  readonly creatorHostOs: string;
  readonly originalSizeBytes: number;
  readonly currentSizeBytes: number;
  readonly geometry: VhdGeometry;
  readonly diskType: number;
  /** The checksum stored in the footer (on encode it is recomputed). */
  readonly checksum: number;
  /** Unique id as an RFC 4122 string, bytes in stored order. */
  readonly uniqueId: string;
  readonly savedState: boolean;
}

/**
 * One's complement of the sum of all footer bytes, with the checksum field
 * counted as zero.
 */
export function vhdChecksum(footer: Buffer): number {
  if (footer.length !== VHD_FOOTER_SIZE_BYTES) throw new RangeError(`VHD footer must be ${VHD_FOOTER_SIZE_BYTES} bytes, got ${footer.length}`);
  let sum = 0;
  for (let i = 0; i < footer.length; i++) {
    if (i >= VHD_FOOTER_OFFSETS.checksum && i < VHD_FOOTER_OFFSETS.checksum + 4) continue;
    sum += footer[i]!;
  }
  return ~sum >>> 0;
}

/**
 * CHS geometry for a disk of `sizeBytes`, by the algorithm in the VHD
 * specification's appendix. The geometry may cover fewer sectors than the
 * disk; readers that follow Hyper-V use the current size instead.
 */
export function vhdGeometry(sizeBytes: number): VhdGeometry {
  let totalSectors = Math.floor(sizeBytes / VHD_SECTOR_SIZE_BYTES);
  if (totalSectors > VHD_MAX_GEOMETRY_SECTORS) totalSectors = VHD_MAX_GEOMETRY_SECTORS;
  let sectorsPerTrack: number;
  let heads: number;
  let cylinderTimesHeads: number;
  if (totalSectors >= 65535 * 16 * 63) {
    sectorsPerTrack = 255;
    heads = 16;
    cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
  } else {
    sectorsPerTrack = 17;
    cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
    heads = Math.max(4, Math.floor((cylinderTimesHeads + 1023) / 1024));
    if (cylinderTimesHeads >= heads * 1024 || heads > 16) {
      sectorsPerTrack = 31;
      heads = 16;
      cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
    }
    if (cylinderTimesHeads >= heads * 1024) {
      sectorsPerTrack = 63;
      heads = 16;
      cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
    }
  }
  return { cylinders: Math.floor(cylinderTimesHeads / heads), heads, sectorsPerTrack };
}

/** The footer blockrelay writes for a new fixed disk of `sizeBytes`. */
export function newFixedVhdFooter(sizeBytes: number, options: { uniqueId?: string; nowMs: number }): VhdFooter {
  return {
    features: VHD_FEATURES_RESERVED,
    fileFormatVersion: VHD_FILE_FORMAT_VERSION,
    dataOffset: VHD_FIXED_DATA_OFFSET,
    timestampSeconds: Math.max(0, Math.floor((options.nowMs - VHD_TIMESTAMP_EPOCH_MS) / 1000)),
    creatorApplication: VHD_CREATOR_APPLICATION,
    creatorVersion: VHD_CREATOR_VERSION,
    creatorHostOs: VHD_CREATOR_HOST_OS,
    originalSizeBytes: sizeBytes,
    currentSizeBytes: sizeBytes,
    geometry: vhdGeometry(sizeBytes),
    diskType: VhdDiskType.fixed,
    checksum: 0,
    uniqueId: options.uniqueId ?? randomUUID(),
    savedState: false,
  };
}

const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Whether `text` is a UUID in the 8-4-4-4-12 hex form. */
export function isUuid(text: string): boolean {
  return UUID_PATTERN.test(text);
}

/** Encodes `footer` into 512 bytes, computing the checksum (the `checksum` field is ignored). */
export function encodeVhdFooter(footer: VhdFooter): Buffer {
  const buf = Buffer.alloc(VHD_FOOTER_SIZE_BYTES);
  const o = VHD_FOOTER_OFFSETS;
  if (!isUuid(footer.uniqueId)) throw new RangeError(`VHD unique id must be a UUID, got ${JSON.stringify(footer.uniqueId)}`);
  if (footer.creatorApplication.length !== 4 || footer.creatorHostOs.length !== 4) {
    throw new RangeError('VHD creator application and host OS must be 4 characters');
  }
  buf.write(VHD_COOKIE, o.cookie, 'latin1');
  buf.writeUInt32BE(footer.features >>> 0, o.features);
  buf.writeUInt32BE(footer.fileFormatVersion >>> 0, o.fileFormatVersion);
  buf.writeBigUInt64BE(footer.dataOffset, o.dataOffset);
  buf.writeUInt32BE(footer.timestampSeconds >>> 0, o.timestamp);
  buf.write(footer.creatorApplication, o.creatorApplication, 'latin1');
  buf.writeUInt32BE(footer.creatorVersion >>> 0, o.creatorVersion);
  buf.write(footer.creatorHostOs, o.creatorHostOs, 'latin1');
  buf.writeBigUInt64BE(BigInt(footer.originalSizeBytes), o.originalSize);
  buf.writeBigUInt64BE(BigInt(footer.currentSizeBytes), o.currentSize);
  buf.writeUInt16BE(footer.geometry.cylinders, o.diskGeometry);
  buf.writeUInt8(footer.geometry.heads, o.diskGeometry + 2);
  buf.writeUInt8(footer.geometry.sectorsPerTrack, o.diskGeometry + 3);
  buf.writeUInt32BE(footer.diskType >>> 0, o.diskType);
  Buffer.from(footer.uniqueId.replace(/-/g, ''), 'hex').copy(buf, o.uniqueId);
  buf.writeUInt8(footer.savedState ? 1 : 0, o.savedState);
  buf.writeUInt32BE(vhdChecksum(buf), o.checksum);
  return buf;
}

function corrupt(message: string, offset: number, where: string, extra: Record<string, string | number> = {}): BlockrelayError {
  return new BlockrelayError('BR_VHD_FOOTER_CORRUPT', `${where}: VHD footer ${message} at byte offset ${offset}`, {
    details: { offset, where, ...extra },
  });
}

function readSize(buf: Buffer, fieldOffset: number, footerOffset: number, where: string, name: string): number {
  const value = buf.readBigUInt64BE(fieldOffset);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw corrupt(`${name} ${value} is beyond any disk blockrelay handles`, footerOffset + fieldOffset, where);
  }
  return Number(value);
}

/**
 * Decodes and validates a footer read from byte `footerOffset` of `where`
 * (a file path or blob URL, for messages). Checks the cookie, the checksum
 * and the file format version; damage is a BR_VHD_FOOTER_CORRUPT error whose
 * message and `details.offset` name the absolute byte offset of the bad field.
 * Disk type and size are left to the caller, which knows the container.
 */
export function decodeVhdFooter(buf: Buffer, footerOffset: number, where: string): VhdFooter {
  const o = VHD_FOOTER_OFFSETS;
  if (buf.length !== VHD_FOOTER_SIZE_BYTES) {
    throw corrupt(`is ${buf.length} bytes instead of ${VHD_FOOTER_SIZE_BYTES}`, footerOffset, where);
  }
  const cookie = buf.toString('latin1', o.cookie, o.cookie + 8);
  if (cookie !== VHD_COOKIE) {
    throw corrupt(`cookie is ${JSON.stringify(cookie)} instead of "conectix"`, footerOffset + o.cookie, where);
  }
  const stored = buf.readUInt32BE(o.checksum);
  const computed = vhdChecksum(buf);
  if (stored !== computed) {
    throw corrupt(`checksum 0x${hex32(stored)} does not match the computed 0x${hex32(computed)}`, footerOffset + o.checksum, where, {
      storedChecksum: stored,
      computedChecksum: computed,
    });
  }
  const fileFormatVersion = buf.readUInt32BE(o.fileFormatVersion);
  if (fileFormatVersion !== VHD_FILE_FORMAT_VERSION) {
    throw corrupt(`file format version 0x${hex32(fileFormatVersion)} is not 0x00010000`, footerOffset + o.fileFormatVersion, where);
  }
  const uid = buf.toString('hex', o.uniqueId, o.uniqueId + 16);
  return {
    features: buf.readUInt32BE(o.features),
    fileFormatVersion,
    dataOffset: buf.readBigUInt64BE(o.dataOffset),
    timestampSeconds: buf.readUInt32BE(o.timestamp),
    creatorApplication: buf.toString('latin1', o.creatorApplication, o.creatorApplication + 4),
    creatorVersion: buf.readUInt32BE(o.creatorVersion),
    creatorHostOs: buf.toString('latin1', o.creatorHostOs, o.creatorHostOs + 4),
    originalSizeBytes: readSize(buf, o.originalSize, footerOffset, where, 'original size'),
    currentSizeBytes: readSize(buf, o.currentSize, footerOffset, where, 'current size'),
    geometry: {
      cylinders: buf.readUInt16BE(o.diskGeometry),
      heads: buf.readUInt8(o.diskGeometry + 2),
      sectorsPerTrack: buf.readUInt8(o.diskGeometry + 3),
    },
    diskType: buf.readUInt32BE(o.diskType),
    checksum: stored,
    uniqueId: `${uid.slice(0, 8)}-${uid.slice(8, 12)}-${uid.slice(12, 16)}-${uid.slice(16, 20)}-${uid.slice(20)}`,
    savedState: buf.readUInt8(o.savedState) !== 0,
  };
}

/**
 * Checks that a decoded footer describes a fixed disk whose data is exactly
 * `containerSizeBytes - 512` bytes long (a file's or page blob's size).
 * Throws BR_VHD_NOT_FIXED or BR_VHD_SIZE_MISMATCH naming the offset.
 */
export function checkFixedVhdFooter(footer: VhdFooter, containerSizeBytes: number, where: string): void {
  const footerOffset = containerSizeBytes - VHD_FOOTER_SIZE_BYTES;
  if (footer.diskType !== VhdDiskType.fixed) {
    const offset = footerOffset + VHD_FOOTER_OFFSETS.diskType;
    throw new BlockrelayError(
      'BR_VHD_NOT_FIXED',
      `${where}: VHD disk type ${footer.diskType} at byte offset ${offset} is not 2 (fixed); dynamic and differencing VHDs are not targets`,
      { details: { offset, where, diskType: footer.diskType } },
    );
  }
  if (footer.currentSizeBytes !== footerOffset || footer.currentSizeBytes % VHD_SECTOR_SIZE_BYTES !== 0) {
    const offset = footerOffset + VHD_FOOTER_OFFSETS.currentSize;
    throw new BlockrelayError(
      'BR_VHD_SIZE_MISMATCH',
      `${where}: VHD current size ${footer.currentSizeBytes} at byte offset ${offset} does not match the ${footerOffset} data bytes before the footer (or is not a multiple of 512); the image is truncated or not a fixed VHD`,
      { details: { offset, where, currentSizeBytes: footer.currentSizeBytes, dataBytes: footerOffset } },
    );
  }
}

function hex32(value: number): string {
  return value.toString(16).padStart(8, '0');
}
