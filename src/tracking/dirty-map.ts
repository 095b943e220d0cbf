import { loadNative } from '../platform/native';
import { BlockrelayError } from '../retry/blockrelay-error';
import {
  DIRTY_MAP_FORMAT_VERSION,
  DIRTY_MAP_MAGIC,
  DM_BODY_BYTES_OFFSET,
  DM_BODY_CHECKSUM_OFFSET,
  DM_BODY_OFFSET,
  DM_DIRTY_BLOCKS_OFFSET,
  DM_DISK_SIZE_OFFSET,
  DM_GRANULARITY_OFFSET,
  DM_HEADER_BYTES,
  DM_HEADER_CHECKSUM_OFFSET,
  DM_MAGIC_OFFSET,
  DM_RESERVED_BYTES,
  DM_RESERVED_OFFSET,
  DM_VERSION_OFFSET,
} from './dirty-map-format';

/** A run of dirty bytes on the disk: `[offset, offset + length)`. */
export interface DirtyExtent {
  readonly offset: number;
  readonly length: number;
}

/** One bounded slice of {@link DirtyMap.extents}. */
export interface DirtyExtentBatch {
  readonly extents: DirtyExtent[];
  /** Where the next batch starts, or undefined when the range is done. */
  readonly nextOffset: number | undefined;
}

/** Counts of the addon's chunk representations, see {@link DirtyMap.chunkStats}. */
export interface DirtyMapChunkStats {
  readonly runChunks: number;
  readonly bitmapChunks: number;
  readonly fullChunks: number;
  readonly pages: number;
}

export const DIRTY_MAP_DEFAULT_GRANULARITY_BYTES = 4096;
export const DIRTY_MAP_MIN_GRANULARITY_BYTES = 512;
export const DIRTY_MAP_MAX_GRANULARITY_BYTES = 1024 * 1024;
/** 1 PiB: above every virtual disk format we serve (VHDX 64 TiB). */
export const DIRTY_MAP_MAX_DISK_SIZE_BYTES = 2 ** 50;
/** Most extents one call into the addon returns. */
export const DIRTY_MAP_EXTENT_BATCH_MAX = 65536;
/** Extents fetched per addon call while iterating {@link DirtyMap.extents}. */
export const DIRTY_MAP_EXTENT_BATCH_DEFAULT = 4096;

interface NativeDirtyMap {
  mark(firstBlock: number, endBlock: number): void;
  markMany(blockPairs: Float64Array): void;
  clear(firstBlock: number, endBlock: number): void;
  anyDirty(firstBlock: number, endBlock: number): boolean;
  extents(fromBlock: number, toBlock: number, maxExtents: number): Float64Array;
  dirtyBlocks(): number;
  memoryBytes(): number;
  merge(other: NativeDirtyMap): boolean;
  clearAll(): void;
  encodeBody(reserveBytes: number): Buffer;
  decodeBody(bytes: Uint8Array, offset: number, length: number): { offset: number; reason: string } | null | undefined;
  checkInvariants(): string | null;
  stats(): Float64Array;
}

interface DirtyMapAddon {
  DirtyMap: new (blockCount: number) => NativeDirtyMap;
  xxh64(data: Uint8Array, offset: number, length: number): bigint | undefined;
}

function addon(): DirtyMapAddon {
  return loadNative<DirtyMapAddon>();
}

function describe(value: unknown): string {
  if (typeof value === 'number') return String(value);
  if (value === null) return 'null';
  if (typeof value === 'object') return (value as object).constructor?.name ?? 'object';
  return typeof value;
}

function requireInteger(name: string, value: number, min: number, max: number): void {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} must be an integer from ${min} to ${max}, got ${describe(value)}`);
  }
}

function isValidGranularity(value: number): boolean {
  return (
    Number.isSafeInteger(value) &&
    value >= DIRTY_MAP_MIN_GRANULARITY_BYTES &&
    value <= DIRTY_MAP_MAX_GRANULARITY_BYTES &&
    (value & (value - 1)) === 0
  );
}

/** XXH64 (seed 0) of data[offset, offset + length), computed by the addon. */
export function xxh64(data: Uint8Array, offset = 0, length = data.length - offset): bigint {
  if (!(data instanceof Uint8Array)) throw new TypeError(`xxh64: data must be a Uint8Array, got ${describe(data)}`);
  requireInteger('xxh64: offset', offset, 0, data.length);
  requireInteger('xxh64: length', length, 0, data.length - offset);
  const hash = addon().xxh64(data, offset, length);
  if (hash === undefined) throw new Error('addon refused xxh64 arguments');
  return hash;
}

/**
 * The set of changed blocks of one disk, held sparsely by the native addon.
 *
 * The disk is cut into blocks of `granularityBytes`; the last block may be
 * partial when the disk size is not a multiple of it. Every range argument is
 * in bytes and must lie inside the disk: a range reaching past the end is
 * refused with `BR_DIRTYMAP_RANGE` and changes nothing.
 *
 * Memory: an empty map costs little more than its page directory; a few
 * thousand scattered extents on a 2 TiB disk cost a few hundred KiB; a fully
 * dirty one about 130 KiB; the worst case (every 64 Ki-block chunk broken
 * into more than 1024 runs) is a flat bitmap plus 0.4%: 64.25 MiB for
 * 2 TiB at 4 KiB.
 * See {@link DirtyMap.memoryBytes}.
 *
 * All methods are synchronous and run on the calling thread.
 */
export class DirtyMap {
  readonly diskSizeBytes: number;
  readonly granularityBytes: number;
  /** Blocks tracked, the last possibly partial. */
  readonly blockCount: number;
  readonly #native: NativeDirtyMap;

  /**
   * @param diskSizeBytes size of the disk, 1 byte to 1 PiB.
   * @param granularityBytes block size, a power of two from 512 bytes to 1 MiB.
   * @throws RangeError naming the argument that is out of range.
   */
  constructor(diskSizeBytes: number, granularityBytes = DIRTY_MAP_DEFAULT_GRANULARITY_BYTES) {
    requireInteger('DirtyMap: diskSizeBytes', diskSizeBytes, 1, DIRTY_MAP_MAX_DISK_SIZE_BYTES);
    if (!isValidGranularity(granularityBytes)) {
      throw new RangeError(
        `DirtyMap: granularityBytes must be a power of two from ${DIRTY_MAP_MIN_GRANULARITY_BYTES} to ${DIRTY_MAP_MAX_GRANULARITY_BYTES}, got ${describe(granularityBytes)}`,
      );
    }
    this.diskSizeBytes = diskSizeBytes;
    this.granularityBytes = granularityBytes;
    this.blockCount = Math.ceil(diskSizeBytes / granularityBytes);
    this.#native = new (addon().DirtyMap)(this.blockCount);
  }

  /**
   * Records a write of `length` bytes at `offset`: every block the range
   * touches becomes dirty, so a write of a few bytes dirties its whole block
   * and a write across a block boundary dirties both blocks. A zero length
   * marks nothing.
   *
   * @throws BlockrelayError `BR_DIRTYMAP_RANGE` when the range passes the disk end.
   */
  mark(offset: number, length: number): void {
    this.#checkRange('mark', offset, length);
    if (length === 0) return;
    const g = this.granularityBytes;
    this.#native.mark(Math.floor(offset / g), Math.ceil((offset + length) / g));
  }

  /**
   * {@link DirtyMap.mark} for many ranges in one call into the addon, for
   * callers that hold a batch (folding a log's entries into the map):
   * `ranges` holds `offset, length` pairs. Every pair is checked before any
   * is marked, so a bad pair marks nothing.
   *
   * @throws BlockrelayError `BR_DIRTYMAP_RANGE` naming the first pair that
   *   passes the disk end; RangeError for a malformed pair.
   */
  markMany(ranges: Float64Array | readonly number[]): void {
    if (ranges.length % 2 !== 0) throw new RangeError(`DirtyMap.markMany: ranges must hold offset, length pairs, got ${ranges.length} numbers`);
    const g = this.granularityBytes;
    const blocks = new Float64Array(ranges.length);
    for (let i = 0; i < ranges.length; i += 2) {
      const offset = ranges[i]!;
      const length = ranges[i + 1]!;
      this.#checkRange('markMany', offset, length, i / 2);
      blocks[i] = Math.floor(offset / g);
      blocks[i + 1] = length === 0 ? blocks[i]! : Math.ceil((offset + length) / g);
    }
    this.#native.markMany(blocks);
  }

  /**
   * True when any block touching `[offset, offset + length)` is dirty. With
   * no length, asks about the block holding `offset`. A zero length is never
   * dirty.
   *
   * @throws BlockrelayError `BR_DIRTYMAP_RANGE` when the range passes the disk end.
   */
  isDirty(offset: number, length = 1): boolean {
    this.#checkRange('isDirty', offset, length);
    if (length === 0) return false;
    const g = this.granularityBytes;
    return this.#native.anyDirty(Math.floor(offset / g), Math.ceil((offset + length) / g));
  }

  /**
   * Forgets the changes in `[offset, offset + length)`, but only for blocks
   * the range covers entirely. A block the range covers only in part stays
   * dirty, because the rest of it may hold a change the caller never copied:
   * the resync and shipping paths clear exactly what they have copied or
   * shipped, and clearing must never lose a change they did not see. A
   * range that reaches the disk end covers the last (partial) block.
   *
   * @throws BlockrelayError `BR_DIRTYMAP_RANGE` when the range passes the disk end.
   */
  clear(offset: number, length: number): void {
    this.#checkRange('clear', offset, length);
    const g = this.granularityBytes;
    const end = offset + length;
    const first = Math.ceil(offset / g);
    const last = end === this.diskSizeBytes ? this.blockCount : Math.floor(end / g);
    if (first < last) this.#native.clear(first, last);
  }

  /** Forgets every change and gives back the memory that held them. */
  clearAll(): void {
    this.#native.clearAll();
  }

  /**
   * Up to `maxExtents` coalesced dirty extents in `[offset, offset + length)`,
   * ascending, adjacent dirty blocks merged into one extent, and extents
   * clipped to the range and to the disk end. Continue from `nextOffset`
   * until it is undefined.
   */
  extentBatch(offset: number, length: number, maxExtents = DIRTY_MAP_EXTENT_BATCH_DEFAULT): DirtyExtentBatch {
    this.#checkRange('extentBatch', offset, length);
    requireInteger('DirtyMap.extentBatch: maxExtents', maxExtents, 1, DIRTY_MAP_EXTENT_BATCH_MAX);
    const end = offset + length;
    if (length === 0) return { extents: [], nextOffset: undefined };
    const g = this.granularityBytes;
    const toBlock = Math.ceil(end / g);
    const raw = this.#native.extents(Math.floor(offset / g), toBlock, maxExtents);
    const extents: DirtyExtent[] = [];
    for (let i = 1; i + 1 < raw.length; i += 2) {
      const start = Math.max(raw[i]! * g, offset);
      const stop = Math.min(raw[i + 1]! * g, end);
      extents.push({ offset: start, length: stop - start });
    }
    const resumeBlock = raw[0]!;
    return { extents, nextOffset: resumeBlock < toBlock ? resumeBlock * g : undefined };
  }

  /**
   * Iterates the coalesced dirty extents of `[offset, offset + length)`
   * (default: the whole disk), fetching `batchSize` extents per addon call so
   * a map fragmented into millions of extents never becomes one huge array.
   * Changes made to the map while iterating are seen from the next batch on.
   */
  *extents(offset = 0, length = Math.max(0, this.diskSizeBytes - offset), batchSize = DIRTY_MAP_EXTENT_BATCH_DEFAULT): Generator<DirtyExtent, void, undefined> {
    this.#checkRange('extents', offset, length);
    const end = offset + length;
    let next: number | undefined = offset;
    while (next !== undefined) {
      const batch = this.extentBatch(next, end - next, batchSize);
      yield* batch.extents;
      next = batch.nextOffset;
    }
  }

  /** Number of dirty blocks. */
  get dirtyBlockCount(): number {
    return this.#native.dirtyBlocks();
  }

  /** Dirty bytes: dirty blocks times the granularity, the last block clipped at the disk end. */
  dirtyBytes(): number {
    const blocks = this.#native.dirtyBlocks();
    if (blocks === 0) return 0;
    const bytes = blocks * this.granularityBytes;
    const lastBlockShortBy = this.blockCount * this.granularityBytes - this.diskSizeBytes;
    if (lastBlockShortBy > 0 && this.#native.anyDirty(this.blockCount - 1, this.blockCount)) return bytes - lastBlockShortBy;
    return bytes;
  }

  /**
   * The heap the addon holds for this map, by its own accounting: every
   * allocation's size plus 16 bytes of allocator overhead each.
   */
  memoryBytes(): number {
    return this.#native.memoryBytes();
  }

  /**
   * Adds every dirty block of `other` (a union), e.g. to fold the extents of
   * logs that were never shipped back into the map.
   *
   * @throws BlockrelayError `BR_DIRTYMAP_MISMATCH` when the maps track
   *   different disk sizes or granularities.
   */
  merge(other: DirtyMap): void {
    if (!(other instanceof DirtyMap)) throw new TypeError(`DirtyMap.merge: other must be a DirtyMap, got ${describe(other)}`);
    if (other.diskSizeBytes !== this.diskSizeBytes || other.granularityBytes !== this.granularityBytes) {
      throw new BlockrelayError(
        'BR_DIRTYMAP_MISMATCH',
        `cannot merge a map of ${other.diskSizeBytes} bytes at ${other.granularityBytes}-byte blocks into one of ${this.diskSizeBytes} bytes at ${this.granularityBytes}-byte blocks`,
        { details: { diskSizeBytes: this.diskSizeBytes, granularityBytes: this.granularityBytes, otherDiskSizeBytes: other.diskSizeBytes, otherGranularityBytes: other.granularityBytes } },
      );
    }
    if (!this.#native.merge(other.#native)) throw new Error('addon refused to merge two maps of the same geometry');
  }

  /**
   * The map in the persisted format of docs/formats/dirty-map.md: a 64-byte
   * header with both checksums, then one record per chunk holding changes.
   */
  serialize(): Buffer {
    const out = this.#native.encodeBody(DM_HEADER_BYTES);
    const bodyBytes = out.length - DM_HEADER_BYTES;
    DIRTY_MAP_MAGIC.copy(out, DM_MAGIC_OFFSET);
    out.writeUInt32LE(DIRTY_MAP_FORMAT_VERSION, DM_VERSION_OFFSET);
    out.writeUInt32LE(this.granularityBytes, DM_GRANULARITY_OFFSET);
    out.writeBigUInt64LE(BigInt(this.diskSizeBytes), DM_DISK_SIZE_OFFSET);
    out.writeBigUInt64LE(BigInt(this.#native.dirtyBlocks()), DM_DIRTY_BLOCKS_OFFSET);
    out.writeBigUInt64LE(BigInt(bodyBytes), DM_BODY_BYTES_OFFSET);
    out.writeBigUInt64LE(xxh64(out, DM_BODY_OFFSET, bodyBytes), DM_BODY_CHECKSUM_OFFSET);
    out.fill(0, DM_RESERVED_OFFSET, DM_RESERVED_OFFSET + DM_RESERVED_BYTES);
    out.writeBigUInt64LE(xxh64(out, 0, DM_HEADER_CHECKSUM_OFFSET), DM_HEADER_CHECKSUM_OFFSET);
    return out;
  }

  /**
   * Reads a map written by {@link DirtyMap.serialize}. Every check passes
   * before the map is returned; nothing is trusted before its checksum.
   *
   * @throws BlockrelayError `BR_DIRTYMAP_CORRUPT` naming the byte offset of
   *   the damage (also in `details.offset`) and what is wrong there.
   */
  static deserialize(bytes: Uint8Array): DirtyMap {
    if (!(bytes instanceof Uint8Array)) throw new TypeError(`DirtyMap.deserialize: bytes must be a Uint8Array, got ${describe(bytes)}`);
    const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const corrupt = (offset: number, what: string): BlockrelayError =>
      new BlockrelayError('BR_DIRTYMAP_CORRUPT', `dirty map damaged at byte ${offset}: ${what}`, { details: { offset, fileBytes: buf.length } });

    if (buf.length < DM_HEADER_BYTES) throw corrupt(buf.length, `file ends after ${buf.length} bytes, inside the ${DM_HEADER_BYTES}-byte header`);
    if (!buf.subarray(DM_MAGIC_OFFSET, DM_MAGIC_OFFSET + DIRTY_MAP_MAGIC.length).equals(DIRTY_MAP_MAGIC)) {
      throw corrupt(DM_MAGIC_OFFSET, 'magic is not "BRDIRTYM"; this is not a dirty map');
    }
    const version = buf.readUInt32LE(DM_VERSION_OFFSET);
    if (version !== DIRTY_MAP_FORMAT_VERSION) throw corrupt(DM_VERSION_OFFSET, `format version ${version} is not ${DIRTY_MAP_FORMAT_VERSION}`);
    const headerChecksum = buf.readBigUInt64LE(DM_HEADER_CHECKSUM_OFFSET);
    if (xxh64(buf, 0, DM_HEADER_CHECKSUM_OFFSET) !== headerChecksum) throw corrupt(DM_HEADER_CHECKSUM_OFFSET, 'header checksum does not match the header');

    // The header is intact from here on; its values can still be nonsense
    // written by a broken writer, so each is checked before use.
    const granularityBytes = buf.readUInt32LE(DM_GRANULARITY_OFFSET);
    if (!isValidGranularity(granularityBytes)) throw corrupt(DM_GRANULARITY_OFFSET, `granularity ${granularityBytes} is not a power of two from 512 to 1 MiB`);
    const diskSize = buf.readBigUInt64LE(DM_DISK_SIZE_OFFSET);
    if (diskSize < 1n || diskSize > BigInt(DIRTY_MAP_MAX_DISK_SIZE_BYTES)) throw corrupt(DM_DISK_SIZE_OFFSET, `disk size ${diskSize} is outside 1 byte to 1 PiB`);
    const diskSizeBytes = Number(diskSize);
    const blockCount = Math.ceil(diskSizeBytes / granularityBytes);
    const dirtyBlocks = buf.readBigUInt64LE(DM_DIRTY_BLOCKS_OFFSET);
    if (dirtyBlocks > BigInt(blockCount)) throw corrupt(DM_DIRTY_BLOCKS_OFFSET, `dirty block count ${dirtyBlocks} exceeds the disk's ${blockCount} blocks`);
    for (let i = DM_RESERVED_OFFSET; i < DM_RESERVED_OFFSET + DM_RESERVED_BYTES; i++) {
      if (buf[i] !== 0) throw corrupt(i, 'reserved byte is not zero');
    }
    const bodyBytes = buf.readBigUInt64LE(DM_BODY_BYTES_OFFSET);
    const haveBody = BigInt(buf.length - DM_BODY_OFFSET);
    if (bodyBytes > haveBody) throw corrupt(buf.length, `file ends ${bodyBytes - haveBody} bytes before the ${bodyBytes}-byte body does`);
    if (bodyBytes < haveBody) throw corrupt(DM_BODY_OFFSET + Number(bodyBytes), `${haveBody - bodyBytes} bytes follow the end of the body`);
    const bodyChecksum = buf.readBigUInt64LE(DM_BODY_CHECKSUM_OFFSET);
    if (xxh64(buf, DM_BODY_OFFSET, Number(bodyBytes)) !== bodyChecksum) throw corrupt(DM_BODY_OFFSET, 'body checksum does not match the body');

    const map = new DirtyMap(diskSizeBytes, granularityBytes);
    const failure = map.#native.decodeBody(buf, DM_BODY_OFFSET, Number(bodyBytes));
    if (failure === undefined) throw new Error('addon refused decodeBody arguments');
    if (failure !== null) throw corrupt(DM_BODY_OFFSET + failure.offset, failure.reason);
    const decodedBlocks = map.dirtyBlockCount;
    if (BigInt(decodedBlocks) !== dirtyBlocks) {
      map.clearAll();
      throw corrupt(DM_DIRTY_BLOCKS_OFFSET, `header counts ${dirtyBlocks} dirty blocks, the body holds ${decodedBlocks}`);
    }
    return map;
  }

  /**
   * How the addon holds the map: chunks of 65536 blocks stored as run
   * arrays, as bitmaps, or as "all dirty", and the pages of 512 chunk slots.
   * For tests and diagnostics.
   */
  chunkStats(): DirtyMapChunkStats {
    const raw = this.#native.stats();
    return { runChunks: raw[0]!, bitmapChunks: raw[1]!, fullChunks: raw[2]!, pages: raw[3]! };
  }

  /**
   * Walks the addon's structures and returns what is inconsistent, or null.
   * For tests; costs a full scan.
   */
  checkInvariants(): string | null {
    return this.#native.checkInvariants();
  }

  /**
   * Checks one range argument. Runs on every write, so the fast path does
   * plain comparisons and builds no strings; messages are made on failure.
   */
  #checkRange(method: string, offset: number, length: number, pair = -1): void {
    if (
      Number.isSafeInteger(offset) &&
      Number.isSafeInteger(length) &&
      offset >= 0 &&
      length >= 0 &&
      offset + length <= this.diskSizeBytes
    ) {
      return;
    }
    const where = pair < 0 ? `DirtyMap.${method}` : `DirtyMap.${method} (pair ${pair})`;
    requireInteger(`${where}: offset`, offset, 0, DIRTY_MAP_MAX_DISK_SIZE_BYTES);
    requireInteger(`${where}: length`, length, 0, DIRTY_MAP_MAX_DISK_SIZE_BYTES);
    throw new BlockrelayError(
      'BR_DIRTYMAP_RANGE',
      `${where}: range [${offset}, ${offset + length}) reaches past the disk end at ${this.diskSizeBytes}`,
      { details: { offset, length, diskSizeBytes: this.diskSizeBytes } },
    );
  }
}
