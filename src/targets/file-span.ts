import type * as fsp from 'node:fs/promises';
import { MAX_HASHED_READ_BYTES, preadHashBlocks } from '../platform/block-hashing';
import { canPunchHoles, fileAllocation, type FileExtentOps } from '../platform/file-extents';
import { PoolJobLimit } from '../platform/pool-job-limit';
import { DurablePageDropper } from '../platform/page-cache';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import type { AllocationExtent, PageCachePolicy } from './disk-target';

/** Largest zero buffer written at once where a range cannot be punched: bounds memory for huge ranges. */
const ZERO_CHUNK_BYTES = 1024 * 1024;
/** Data extents are widened outward to this: the usual filesystem block, and no finer than callers need. */
export const FILE_SPAN_EXTENT_GRANULARITY_BYTES = 4096;

/** How a span was opened; see {@link FileSpan}. */
export interface FileSpanOptions {
  /** The file, for error messages. */
  readonly path: string;
  readonly handle: fsp.FileHandle;
  /** Where the span's byte 0 lies in the file. */
  readonly fileOffsetBytes: number;
  /** Bytes in the span. */
  readonly sizeBytes: number;
  /** A regular file (holes, SEEK_DATA) rather than a block device. */
  readonly regularFile: boolean;
  /** The span may punch holes (probed by the caller, or by {@link FileSpan.probePunching}). */
  readonly punchHoles: boolean;
  /** Punches cover whole multiples of this; edges outside are written as zeroes (1 for files: the kernel zeroes partial blocks). */
  readonly punchAlignBytes?: number;
  /**
   * The span ends where the file ends and nothing follows it, so zeroing up
   * to the end may cut the file and grow it back (the regrown part is a
   * hole). False where something lives after the span (a VHD footer).
   */
  readonly ownsFileTail: boolean;
  readonly ops: FileExtentOps;
  /**
   * The error a read that meets the end of the file throws, given the file
   * offset where the file ended; without it those bytes read as zeroes.
   * Formats whose extent must hold every byte (a flat VMDK) say so here.
   */
  readonly shortReadError?: (fileOffset: number) => Error;
  /**
   * The bound on this file's thread-pool jobs in flight; by default one of
   * its own (TARGET_POOL_JOBS in src/platform/pool-job-limit.ts). Spans of
   * one file may share one.
   */
  readonly poolJobs?: PoolJobLimit;
  /** What becomes of synced pages: see OpenOptions.pageCache ('keep' by default). */
  readonly pageCache?: PageCachePolicy;
}

/**
 * A run of a disk's bytes lying in order in one open file: span byte i is
 * file byte `fileOffsetBytes + i`. The file I/O every file-backed target
 * shares (raw files and devices, a fixed VHD's data, each extent of a flat
 * VMDK): positional reads (a file shortened behind our back reads as zeroes
 * past its end), writes, zeroing that punches holes where the filesystem
 * can, an allocation map from lseek(SEEK_DATA / SEEK_HOLE), and native
 * read-and-hash for resync.
 *
 * A span checks no bounds or alignment: its target does, before calling.
 * Failures are BR_IO naming the file. Holes and punches are used only when
 * the span starts on a filesystem block (`fileOffsetBytes` a multiple of
 * 4 KiB); otherwise the span reports one data extent and writes zeroes.
 */
export class FileSpan {
  readonly path: string;
  readonly sizeBytes: number;
  private readonly handle: fsp.FileHandle;
  private readonly fileOffset: number;
  /** The first failed datasync, if any: see {@link FileSpan.datasync}. */
  private syncFailure: unknown;
  private readonly syncsInFlight = new Set<Promise<void>>();
  private readonly regularFile: boolean;
  private readonly ownsFileTail: boolean;
  private readonly punchAlignBytes: number;
  private readonly ops: FileExtentOps;
  private readonly shortReadError: ((fileOffset: number) => Error) | undefined;
  /** Whether holes can be punched; turns false when the filesystem refuses one. */
  private punching: boolean;
  private closed = false;
  /** Hole punches and hashed reads on the thread pool: close() waits for them before the descriptor goes. */
  private readonly poolOps = new Set<Promise<unknown>>();
  /**
   * Every call below that runs on the thread pool goes through this bound:
   * on a hung device each keeps a pool thread, and callers fan out (a
   * resync writes a request's runs all at once), so without it one hung
   * file could hold every thread of the process and stall its other disks.
   */
  private readonly poolJobs: PoolJobLimit;
  /** With pageCache 'drop-durable': drops the file's clean pages after each successful datasync. */
  private readonly dropper: DurablePageDropper | undefined;

  constructor(options: FileSpanOptions) {
    this.path = options.path;
    this.handle = options.handle;
    this.fileOffset = options.fileOffsetBytes;
    this.sizeBytes = options.sizeBytes;
    this.regularFile = options.regularFile;
    this.ownsFileTail = options.ownsFileTail;
    this.punchAlignBytes = options.punchAlignBytes ?? 1;
    this.shortReadError = options.shortReadError;
    this.poolJobs = options.poolJobs ?? new PoolJobLimit();
    // Its pool job counts against this file's bound like every other.
    this.dropper = options.pageCache === 'drop-durable' ? new DurablePageDropper(() => this.handle.fd, (job) => this.poolJobs.run(job)) : undefined;
    const blockAligned = this.fileOffset % FILE_SPAN_EXTENT_GRANULARITY_BYTES === 0;
    this.punching = options.punchHoles && blockAligned;
    // The seeks and the punch refuse a descriptor that close() has let go.
    const ops = options.ops;
    const guard = (): void => {
      if (this.closed) throw new BlockrelayError('BR_TARGET_CLOSED', `${this.path} was used after close`, { details: { path: this.path } });
    };
    this.ops = {
      seekData: (fd, offset) => {
        guard();
        return ops.seekData(fd, offset);
      },
      seekHole: (fd, offset) => {
        guard();
        return ops.seekHole(fd, offset);
      },
      punchHole: (fd, offset, length) => {
        guard();
        return ops.punchHole(fd, offset, length);
      },
    };
    this.mapsHoles = this.regularFile && blockAligned;
  }

  /** Whether `extents` reports holes (a regular file, block-aligned span). */
  private readonly mapsHoles: boolean;

  /**
   * Whether a writable regular file can punch holes, asked without touching
   * its contents (see canPunchHoles). Anything odd (EPERM on an append-only
   * file) counts as no: zeroes are then written, and a real I/O problem
   * shows on the first write.
   */
  static async probePunching(handle: fsp.FileHandle, fileSizeBytes: number, ops: FileExtentOps): Promise<boolean> {
    try {
      return await canPunchHoles(handle.fd, fileSizeBytes, ops);
    } catch {
      return false;
    }
  }

  /** The open descriptor (valid until close). */
  get fd(): number {
    return this.handle.fd;
  }

  /** Whether zeroing frees space (holes), as `capabilities.discard` reports. */
  get punchesHoles(): boolean {
    return this.punching;
  }

  /** Reads `length` bytes at span offset `offset` into `out` at `outOffset`. */
  async readInto(out: Buffer, outOffset: number, offset: number, length: number): Promise<void> {
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.io(() => this.handle.read(out, outOffset + done, length - done, this.fileOffset + offset + done), 'read');
      // A file shortened behind our back reads as zeroes past its end, unless the format says that is damage.
      if (bytesRead === 0) {
        if (this.shortReadError !== undefined) throw this.shortReadError(this.fileOffset + offset + done);
        out.fill(0, outOffset + done, outOffset + length);
        return;
      }
      done += bytesRead;
    }
  }

  /** Writes `length` bytes of `data` from `dataOffset` at span offset `offset`. */
  async write(data: Buffer, dataOffset: number, offset: number, length: number): Promise<void> {
    let done = 0;
    while (done < length) {
      const { bytesWritten } = await this.io(() => this.handle.write(data, dataOffset + done, length - done, this.fileOffset + offset + done), 'write');
      done += bytesWritten;
    }
  }

  /**
   * Makes `[offset, offset + length)` read as zeroes: punched where the file
   * can (the aligned middle; edges written), cut and regrown at the end of a
   * file the span owns the tail of, written as zeroes otherwise.
   */
  async zero(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    const end = offset + length;
    if (this.punching) {
      const align = this.punchAlignBytes;
      const from = Math.ceil(offset / align) * align;
      const to = Math.floor(end / align) * align;
      if (to > from && (await this.punchHole(from, to - from))) {
        await this.writeZeroBytes(offset, from - offset);
        await this.writeZeroBytes(to, end - to);
        return;
      }
    }
    if (this.regularFile && this.ownsFileTail && end === this.sizeBytes) {
      // The tail of a file can be released without fallocate: cut the file
      // at `offset` and grow it back; the regrown part is a hole.
      await this.io(() => this.handle.truncate(this.fileOffset + offset), 'truncate');
      await this.io(() => this.handle.truncate(this.fileOffset + this.sizeBytes), 'truncate');
      return;
    }
    await this.writeZeroBytes(offset, length);
  }

  /** The span's allocation map: holes as zero extents where the file has them, else one data extent. */
  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    if (length === 0) return;
    if (!this.mapsHoles) {
      yield { offset, length, zero: false };
      return;
    }
    const walk = fileAllocation(this.handle.fd, this.fileOffset + offset, length, { granularityBytes: FILE_SPAN_EXTENT_GRANULARITY_BYTES, ops: this.ops });
    // Pulled by hand so a failed seek is wrapped as BR_IO with the path, while
    // BR_TARGET_CLOSED (a close during the walk) passes through unchanged.
    try {
      for (;;) {
        const next = await this.io(() => walk.next(), 'lseek(SEEK_DATA/SEEK_HOLE)');
        if (next.done === true) return;
        yield { offset: next.value.offset - this.fileOffset, length: next.value.length, zero: next.value.zero };
      }
    } finally {
      await walk.return(undefined);
    }
  }

  /** Reads and hashes natively on the thread pool (see DiskTarget.hashBlocks). */
  async hashBlocks(offset: number, length: number, blockSizeBytes: number, into?: Buffer): Promise<Buffer> {
    if (into !== undefined && into.length < length) throw new RangeError(`hashBlocks: into holds ${into.length} bytes, ${length} needed`);
    if (length === 0) return Buffer.alloc(0);
    // One native call reads at most MAX_HASHED_READ_BYTES; split on block boundaries.
    const step = Math.floor(MAX_HASHED_READ_BYTES / blockSizeBytes) * blockSizeBytes;
    const parts: Buffer[] = [];
    for (let at = 0; at < length; at += step) {
      // close() waits only for reads already on the pool: none may start after it.
      if (this.closed) throw new BlockrelayError('BR_TARGET_CLOSED', `${this.path} was used after close`, { details: { path: this.path } });
      const n = Math.min(step, length - at);
      const pending = this.io(() => preadHashBlocks(this.handle.fd, this.fileOffset + offset + at, n, blockSizeBytes, into?.subarray(at, at + n)), 'read');
      this.poolOps.add(pending);
      try {
        parts.push((await pending).hashes);
      } finally {
        this.poolOps.delete(pending);
      }
    }
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
  }

  /**
   * fdatasync. Once one failed, every later call fails too: the kernel
   * reports a writeback error to one fdatasync per open file and marks the
   * pages it could not write clean, so a later sync would succeed although
   * writes made before the failure may be gone. Whoever wrote through this
   * span must not take that success for durability (raw, VHD and flat VMDK
   * targets, the resync target service's background flushes).
   */
  async datasync(): Promise<void> {
    this.throwIfSyncFailed();
    const sync = this.io(() => this.handle.datasync(), 'flush').catch((err: unknown) => {
      this.syncFailure ??= err;
      throw err;
    });
    this.syncsInFlight.add(sync);
    try {
      await sync;
    } finally {
      this.syncsInFlight.delete(sync);
    }
    // Another fdatasync running beside this one (a background writeback)
    // may be the one the kernel told of a failed page write, and it may
    // return after this one: this sync is good only if those were too.
    if (this.syncsInFlight.size > 0) await Promise.allSettled([...this.syncsInFlight]);
    this.throwIfSyncFailed();
    this.dropper?.synced();
  }

  private throwIfSyncFailed(): void {
    if (this.syncFailure !== undefined) {
      throw new BlockrelayError('BR_IO', `flush on ${this.path}: an earlier flush failed, so writes before it may be lost; no flush succeeds on this handle again`, { cause: this.syncFailure });
    }
  }

  /** Closes the descriptor once the work on the thread pool that holds it has settled. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // A punch or hashed read still running on the thread pool holds the descriptor number.
    await Promise.allSettled([...this.poolOps]);
    await this.dropper?.close();
    await this.handle.close();
  }

  /** Writes `length` zero bytes at `offset` through a bounded buffer. */
  private async writeZeroBytes(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    const zeroes = Buffer.alloc(Math.min(length, ZERO_CHUNK_BYTES));
    for (let at = offset; at < offset + length; at += zeroes.length) {
      const n = Math.min(zeroes.length, offset + length - at);
      await this.write(zeroes, 0, at, n);
    }
  }

  /**
   * Punches `[offset, offset + length)`. False when the filesystem refused
   * (EOPNOTSUPP): punching is then withdrawn and the caller writes zeroes.
   */
  private async punchHole(offset: number, length: number): Promise<boolean> {
    const pending = this.io(() => this.ops.punchHole(this.handle.fd, this.fileOffset + offset, length), 'fallocate(PUNCH_HOLE)');
    this.poolOps.add(pending);
    try {
      if ((await pending) === 'punched') return true;
    } finally {
      this.poolOps.delete(pending);
    }
    this.punching = false;
    return false;
  }

  private async io<T>(op: () => Promise<T>, what: string): Promise<T> {
    try {
      return await this.poolJobs.run(op);
    } catch (err) {
      throw wrapError(err, 'BR_IO', `${what} on ${this.path} failed`);
    }
  }
}
