/**
 * The one interface every replication target and every disk spec opens to:
 * raw files and block devices, VMDK (sparse and flat), fixed VHD, Azure page
 * blobs, and NBD exports (read side). Every implementation runs the same
 * conformance suite (`test/targets/conformance.ts`).
 *
 * Offsets and lengths are byte counts held in JS numbers: exact up to 2^53,
 * far above the 8 TiB page-blob limit. Requests outside `[0, sizeBytes)` or
 * off the target's alignment are refused with coded errors, never clipped.
 */
export interface DiskTargetCapabilities {
  /** Unwritten ranges cost no storage and read as zeroes. */
  readonly sparse: boolean;
  /** `discard` really releases storage (otherwise it writes zeroes). */
  readonly discard: boolean;
  /** Offsets and lengths of writes must be multiples of this (1 = any byte). */
  readonly alignmentBytes: number;
  /** The target refuses writes. */
  readonly readOnly: boolean;
}

/** A byte range of a disk. */
export interface Extent {
  readonly offset: number;
  readonly length: number;
}

/** An extent reported by `extents()`: `zero` means it reads as zeroes without data stored. */
export interface AllocationExtent extends Extent {
  readonly zero: boolean;
}

export interface DiskTarget {
  /** The disk spec this target was opened from, e.g. `vmdk:/data/disk0.vmdk`. */
  readonly spec: string;
  readonly sizeBytes: number;
  readonly capabilities: DiskTargetCapabilities;
  /** The disk's identity where the format stores one (VMDK ddb.uuid, VHD unique id), else undefined. */
  readonly diskUuid: string | undefined;

  /** Reads `length` bytes at `offset`; holes read as zeroes. */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Writes `data` at `offset`. Durable only after `flush()`. The target
   * must not keep `data` once the promise resolves: callers reuse their
   * buffers at once (the master target's logs held in memory are reused
   * buffers, src/transport/held-log.ts), so a write-behind target must copy.
   */
  write(offset: number, data: Buffer): Promise<void>;
  /** Makes `[offset, offset + length)` read as zeroes, sparsely where the format can. */
  writeZeroes(offset: number, length: number): Promise<void>;
  /** Hints that the range is unused; afterwards it reads as zeroes. */
  discard(offset: number, length: number): Promise<void>;
  /** Makes every completed write durable. */
  flush(): Promise<void>;
  /**
   * Allocation map of `[offset, offset + length)` in order, covering the whole
   * range: data extents and zero extents. Targets that cannot tell report one
   * data extent for the whole range.
   */
  extents(offset: number, length: number): AsyncIterable<AllocationExtent>;
  /**
   * Optional fast path for bulk comparison (a resync hashing a whole disk):
   * reads `[offset, offset + length)` and returns XXH64 (seed 0) of each
   * block of `blockSizeBytes` (the last may be shorter), 8 bytes per block,
   * little-endian, in block order: the hashes BlockHasher.hashBlocks gives
   * over `read(offset, length)`. With `into` the bytes are left there too.
   * Offered where the bytes lie in order in a local file (raw), where native
   * code can read and hash them off the main thread in one pass.
   */
  hashBlocks?(offset: number, length: number, blockSizeBytes: number, into?: Buffer): Promise<Buffer>;
  /**
   * Optional fast path for reading many ranges (an undo journal's
   * pre-images): fills each request's buffer with `buffer.length` bytes from
   * `offset`, no fresh buffers. Resolves, per request, whether its range
   * read as zeroes without data stored (what `extents()` calls `zero`).
   */
  readMany?(requests: readonly DiskReadRequest[]): Promise<boolean[]>;
  /**
   * Optional fast path for writing many ranges (a span of a log's writes):
   * the same as `write` for each request in order (later bytes win where
   * they overlap), in one call; on a failure some of the requests may have
   * been written, as with a failed run of writes. Like `write`, it must not
   * keep the callers' buffers after it resolves.
   */
  writeMany?(requests: readonly DiskWriteRequest[]): Promise<void>;
  /** Flushes, releases locks and leases, and marks the image clean. Idempotent. */
  close(): Promise<void>;
}

/** One write of `DiskTarget.writeMany`: `data` at `offset`. */
export interface DiskWriteRequest {
  readonly offset: number;
  readonly data: Buffer;
}

/** One read of `DiskTarget.readMany`: `buffer.length` bytes at `offset` into `buffer`. */
export interface DiskReadRequest {
  readonly offset: number;
  readonly buffer: Buffer;
}

/** How to open a disk spec. */
export interface OpenOptions {
  /** Create the disk with this size; refused if a disk that is not ours exists there. */
  readonly create?: { readonly sizeBytes: number; readonly diskUuid?: string };
  readonly readOnly?: boolean;
  /**
   * What becomes of written pages in the page cache once a flush (or the
   * target's own background sync) made them durable: 'keep' (the default:
   * the kernel decides) or 'drop-durable' (dropped at once, the way a
   * hypervisor's cache=none disk never fills the host's cache). For a
   * replication target: written at the churn's rate, read back only for
   * pre-images and resync, its cached pages only crowd out others, and on a
   * VM with free page reporting every fresh page costs a host fault
   * (docs/transport.md, "Page cache that grows"). File targets only; the
   * others ignore it.
   */
  readonly pageCache?: PageCachePolicy;
}

/** See {@link OpenOptions.pageCache}. */
export type PageCachePolicy = 'keep' | 'drop-durable';
