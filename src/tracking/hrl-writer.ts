import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { systemClock, type Clock } from '../platform/clock';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import { syncDirectory } from '../platform/durable-file';
import { loadNativeTap, type NativeHrlAppender } from '../platform/native';
import * as os from 'node:os';
import {
  HRL_DEFAULT_METADATA_SIZE,
  HRL_HEADER_SIZE,
  HRL_MAX_DATA_LENGTH,
  HRL_MAX_METADATA_SIZE,
  HRL_METADATA_ENTRY_SIZE,
  HRL_METADATA_HEADER_SIZE,
  HRL_MIN_METADATA_SIZE,
  NIL_GUID,
  encodeHrlHeader,
  encodeHrlMetadataEntry,
  encodeHrlMetadataHeader,
  hrlChecksum,
  hrlEntriesPerBlock,
  hrlTimestampFromMs,
  randomGuid,
} from './hrl-format';

/** Defaults, units in the names. */
export const HRL_WRITER_DEFAULTS = {
  metadataSizeBytes: HRL_DEFAULT_METADATA_SIZE,
  /** Writes longer than this become several entries (bounds reader and apply buffers). */
  maxEntryBytes: 1024 * 1024,
  /** Small payloads are gathered here before one positional write. */
  stagingBytes: 1024 * 1024,
} as const;

/**
 * The file operations the writer uses (a subset of fs/promises FileHandle).
 * Tests pass their own to record writes and syncs and build the images a
 * power loss could leave.
 */
export interface HrlWriterFile {
  write(buffer: Buffer, offset: number, length: number, position: number): Promise<unknown>;
  writev(buffers: Buffer[], position: number): Promise<unknown>;
  datasync(): Promise<void>;
  close(): Promise<void>;
}

export interface HrlWriterOptions {
  readonly uniqueId?: string;
  /** UniqueId of the previous log of this disk; the nil GUID for the first. */
  readonly previousUniqueId?: string;
  readonly vhd2DataWriteGuid?: string;
  readonly metadataSizeBytes?: number;
  readonly maxEntryBytes?: number;
  readonly stagingBytes?: number;
  readonly clock?: Clock;
  /** Creates the log file (default: fs/promises open with 'wx+', refusing an existing file). */
  readonly openFile?: (filePath: string) => Promise<HrlWriterFile>;
}

/** What `seal()` reports. */
export interface HrlSealedLog {
  readonly path: string;
  readonly uniqueId: string;
  readonly previousUniqueId: string;
  /** EOLLocation = file size. */
  readonly sizeBytes: number;
  readonly entryCount: number;
}

const ZERO_CHUNK_CHECKSUM = 0xffff_ffff;

/**
 * Appends writes to a new [MS-HRL] v2 log. Layout: the 4096-byte header
 * (EOLLocation 0 while open), an empty anchor metadata block at 4096, then
 * payloads each followed by the metadata block describing them.
 *
 * Memory is bounded by one metadata block plus the staging buffer; payloads
 * larger than the staging buffer are written straight from the caller's
 * buffer before `append` resolves, so callers may reuse buffers afterwards.
 *
 * `flush()` closes the current (possibly partial) metadata block and
 * fdatasyncs, so everything appended before it survives a crash and is found
 * by `recoverHrlLog` (hrl-recovery.ts). `seal()` writes EOLLocation,
 * CurrentSize, TotalMetadataEntries and the header checksum.
 *
 * Operations are serialised internally; concurrent calls run in call order.
 * A failed write or fdatasync poisons the writer: every later append, flush
 * and seal rejects with that first error (only `close()` still works), so no
 * caller takes a later, empty fdatasync for durability.
 *
 * A log opened on a real file (no `openFile` injected) appends through the
 * addon's HrlAppender (native/hrl-appender.cc), which writes the same layout
 * and which the source tap's native connection threads append to directly
 * (see `nativeAppender`). Appends are then synchronous (a copy, and now and
 * then a positional write of the staging buffer); flush and seal keep their
 * fdatasyncs on the libuv thread pool. Injected files (tests that simulate
 * power loss) use the TypeScript path below, which writes byte-identical logs.
 */
export class HrlWriter {
  readonly path: string;
  readonly uniqueId: string;
  readonly previousUniqueId: string;
  readonly metadataSizeBytes: number;
  private readonly vhd2DataWriteGuid: string;
  private readonly maxEntryBytes: number;
  private readonly clock: Clock;
  private readonly createdTimestamp: number;
  private readonly entriesPerBlock: number;
  private readonly block: Buffer;
  private readonly staging: Buffer;
  private stagedBytes = 0;
  /** Everything before this file offset has been handed to the kernel. */
  private writtenEnd = 0;
  private entriesInBlock = 0;
  private lastBlockOffset = HRL_HEADER_SIZE;
  private totalEntries = 0;
  private durableEnd = 0;
  private state: 'open' | 'sealed' | 'closed' = 'open';
  private queue: Promise<unknown> = Promise.resolve();
  /** Operations queued or running; the append fast path needs 0. */
  private queued = 0;
  private zeroChunk: Buffer | undefined;
  /** The native appender holding the open block and staging buffer, when the file is real. */
  private core: NativeHrlAppender | undefined;
  /** Set by seal() and close(): appends after them fail, as queued ones would in the TypeScript path. */
  private finishing = false;
  /**
   * The first failed write or sync. Every later operation (but close) fails
   * with it: after a failed fdatasync Linux marks the pages clean and reports
   * the error once, so a second fdatasync would "succeed" with the data gone.
   */
  private failure: BlockrelayError | undefined;

  private constructor(private readonly fh: HrlWriterFile, filePath: string, options: HrlWriterOptions) {
    this.path = filePath;
    this.uniqueId = options.uniqueId ?? randomGuid();
    this.previousUniqueId = options.previousUniqueId ?? NIL_GUID;
    this.vhd2DataWriteGuid = options.vhd2DataWriteGuid ?? NIL_GUID;
    this.metadataSizeBytes = options.metadataSizeBytes ?? HRL_WRITER_DEFAULTS.metadataSizeBytes;
    this.maxEntryBytes = options.maxEntryBytes ?? HRL_WRITER_DEFAULTS.maxEntryBytes;
    this.clock = options.clock ?? systemClock;
    this.createdTimestamp = hrlTimestampFromMs(this.clock.now());
    this.entriesPerBlock = hrlEntriesPerBlock(this.metadataSizeBytes);
    this.block = Buffer.alloc(this.metadataSizeBytes);
    this.staging = Buffer.alloc(options.stagingBytes ?? HRL_WRITER_DEFAULTS.stagingBytes);
  }

  /**
   * Creates the log (refusing an existing file), writes the open header and
   * the anchor block, and makes both durable together with the directory entry.
   */
  static async create(filePath: string, options: HrlWriterOptions = {}): Promise<HrlWriter> {
    const ms = options.metadataSizeBytes ?? HRL_WRITER_DEFAULTS.metadataSizeBytes;
    if (!Number.isInteger(ms) || ms < HRL_MIN_METADATA_SIZE || ms > HRL_MAX_METADATA_SIZE || ms % HRL_METADATA_ENTRY_SIZE !== 0) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `metadataSizeBytes must be a multiple of 32 in [${HRL_MIN_METADATA_SIZE}, ${HRL_MAX_METADATA_SIZE}], got ${ms}`);
    }
    const maxEntry = options.maxEntryBytes ?? HRL_WRITER_DEFAULTS.maxEntryBytes;
    if (!Number.isInteger(maxEntry) || maxEntry < 1 || maxEntry > HRL_MAX_DATA_LENGTH) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `maxEntryBytes must be in [1, ${HRL_MAX_DATA_LENGTH}], got ${maxEntry}`);
    }
    let fh: HrlWriterFile;
    try {
      fh = await (options.openFile ?? ((p: string) => fsp.open(p, 'wx+')))(filePath);
    } catch (err) {
      throw wrapError(err, 'BR_IO', `cannot create HRL log ${filePath}`);
    }
    const writer = new HrlWriter(fh, filePath, options);
    try {
      await writer.writeAnchor();
      await syncDirectory(path.dirname(filePath));
      const native = options.openFile === undefined ? loadNativeTap() : undefined;
      const fd = (fh as Partial<fsp.FileHandle>).fd;
      if (native !== undefined && typeof fd === 'number') {
        writer.core = new native.HrlAppender(fd, writer.metadataSizeBytes, writer.maxEntryBytes, writer.staging.length, writer.writtenEnd, writer.lastBlockOffset);
      }
    } catch (err) {
      await fh.close().catch(() => undefined);
      throw wrapError(err, 'BR_IO', `cannot initialise HRL log ${filePath}`);
    }
    return writer;
  }

  /**
   * The native appender of this log, for the source tap's connection threads
   * (undefined for injected files or without the addon). Its appends are this
   * log's appends.
   */
  get nativeAppender(): NativeHrlAppender | undefined {
    return this.core;
  }

  /** Bytes the log occupies once everything appended is written (payloads plus the open block). */
  get sizeBytes(): number {
    if (this.core !== undefined) return this.core.sizeBytes();
    return this.writtenEnd + this.stagedBytes + (this.entriesInBlock > 0 ? this.metadataSizeBytes : 0);
  }

  /** Entries appended so far. */
  get entryCount(): number {
    if (this.core !== undefined) {
      const st = this.core.state();
      return st[3]! + st[2]!;
    }
    return this.totalEntries + this.entriesInBlock;
  }

  /** End of the last block made durable by `flush()` (or by creation). */
  get durableEndBytes(): number {
    return this.durableEnd;
  }

  /** Logs `data` for disk bytes `[byteOffset, byteOffset + data.length)`. */
  append(byteOffset: number, data: Uint8Array): Promise<void> {
    checkRange(byteOffset, data.length);
    if (this.core !== undefined) {
      const append = (): number => this.core!.append(byteOffset, data, hrlTimestampFromMs(this.clock.now()));
      // Behind a queued operation (a zero range being logged off the main thread) it waits its turn.
      if (this.queued > 0) return this.serial(() => this.nativeCall('write', append));
      return this.nativeCall('write', append);
    }
    // Fast path: nothing queued and the write fits the open block and the
    // staging buffer, so it is only a copy; no I/O, no promise chain.
    if (this.appendsInMemory(data.length)) {
      this.addEntry(byteOffset, data, hrlChecksum(data));
      this.staging.set(data, this.stagedBytes);
      this.stagedBytes += data.length;
      return Promise.resolve();
    }
    return this.serial(async () => {
      for (let at = 0; at < data.length; at += this.maxEntryBytes) {
        const piece = data.subarray(at, Math.min(data.length, at + this.maxEntryBytes));
        await this.appendPiece(byteOffset + at, piece, hrlChecksum(piece));
      }
    });
  }

  /**
   * True when an append of `length` bytes would complete synchronously (a
   * copy into the open block and the staging buffer, no I/O): then the
   * promise `append` returns is already resolved.
   */
  appendsInMemory(length: number): boolean {
    if (this.failure !== undefined) return false;
    if (this.core !== undefined) return this.queued === 0 && this.state === 'open' && !this.finishing && length > 0;
    return this.queued === 0 && this.state === 'open' && length > 0 && length <= this.maxEntryBytes &&
      this.entriesInBlock < this.entriesPerBlock && length <= this.staging.length - this.stagedBytes;
  }

  /**
   * Logs that `[byteOffset, byteOffset + length)` now reads as zeroes.
   * [MS-HRL] has only write operations, so the range becomes zero-filled
   * write entries of at most `maxEntryBytes` each.
   */
  appendZeroes(byteOffset: number, length: number): Promise<void> {
    checkRange(byteOffset, length);
    const core = this.core;
    if (core !== undefined) {
      // On the libuv thread pool: a large range is that many bytes of zero
      // entries to write, which must not stall the event loop.
      return this.serial(async () => {
        const errno = await core.appendZeroesAsync(byteOffset, length, hrlTimestampFromMs(this.clock.now()));
        if (errno !== 0) throw this.poison(wrapError(errnoError(errno), 'BR_IO', `HRL log ${this.path}: write failed`));
      });
    }
    return this.serial(async () => {
      this.zeroChunk ??= Buffer.alloc(this.maxEntryBytes);
      for (let at = 0; at < length; at += this.maxEntryBytes) {
        const n = Math.min(this.maxEntryBytes, length - at);
        await this.appendPiece(byteOffset + at, this.zeroChunk.subarray(0, n), ZERO_CHUNK_CHECKSUM);
      }
    });
  }

  /** Closes the current metadata block (if it holds entries) and makes the log durable. */
  flush(): Promise<void> {
    return this.serial(async () => {
      if (this.core !== undefined) this.syncFromCore(this.core.closeBlock(), 'write');
      else if (this.entriesInBlock > 0) await this.closeBlock();
      // Nothing written since the last sync: an idle FLUSH costs no fdatasync.
      if (this.durableEnd === this.writtenEnd) return;
      await this.io('fdatasync', () => this.fh.datasync());
      this.durableEnd = this.writtenEnd;
    });
  }

  /** Finishes the log: last block, EOLLocation, counts and checksum, fsync, close. */
  seal(): Promise<HrlSealedLog> {
    if (this.state === 'open') this.finishing = true;
    return this.serial(async () => {
      if (this.core !== undefined) this.syncFromCore(this.core.finish(), 'write');
      else if (this.entriesInBlock > 0) await this.closeBlock();
      const eol = this.writtenEnd;
      const header = encodeHrlHeader({
        timestamp: this.createdTimestamp,
        originalSize: 0,
        currentSize: eol,
        eolLocation: eol,
        metadataSize: this.metadataSizeBytes,
        uniqueId: this.uniqueId,
        previousUniqueId: this.previousUniqueId,
        lastModifiedTimestamp: hrlTimestampFromMs(this.clock.now()),
        totalMetadataEntries: this.totalEntries,
        vhd2DataWriteGuid: this.vhd2DataWriteGuid,
      });
      await this.io('seal', async () => {
        // The payloads and blocks must be durable before the header claims them.
        await this.fh.datasync();
        await this.fh.write(header, 0, header.length, 0);
        await this.fh.datasync();
        await this.fh.close();
      });
      this.durableEnd = eol;
      this.state = 'sealed';
      return { path: this.path, uniqueId: this.uniqueId, previousUniqueId: this.previousUniqueId, sizeBytes: eol, entryCount: this.totalEntries };
    });
  }

  /** Closes the file without sealing (the log stays recoverable up to its last flush). Idempotent. */
  async close(): Promise<void> {
    if (this.state !== 'open') return;
    this.state = 'closed';
    this.finishing = true;
    // A zero range being logged on the thread pool finishes first: the
    // abandon would otherwise wait for it on the main thread.
    await this.queue.catch(() => undefined);
    this.core?.abandon();
    await this.fh.close().catch(() => undefined);
  }

  /** Runs a synchronous native append; its errno becomes the error the TypeScript path would throw. */
  private nativeCall(what: string, fn: () => number): Promise<void> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.state !== 'open' || this.finishing) return Promise.reject(new BlockrelayError('BR_HRL_CLOSED', `HRL log ${this.path} is ${this.state === 'open' ? 'sealing' : this.state}`));
    const errno = fn();
    if (errno === 0) return Promise.resolve();
    return Promise.reject(this.poison(wrapError(errnoError(errno), 'BR_IO', `HRL log ${this.path}: ${what} failed`)));
  }

  /** Records the first failure; returns it (the one every later operation rejects with). */
  private poison(err: BlockrelayError): BlockrelayError {
    this.failure ??= err;
    return this.failure;
  }

  /** Takes the file offsets from the native appender after a block close; throws its errno. */
  private syncFromCore(errno: number, what: string): void {
    if (errno !== 0) throw this.poison(wrapError(errnoError(errno), 'BR_IO', `HRL log ${this.path}: ${what} failed`));
    const st = this.core!.state();
    this.writtenEnd = st[0]!;
    this.totalEntries = st[3]!;
    this.stagedBytes = 0;
    this.entriesInBlock = 0;
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = async (): Promise<T> => {
      try {
        if (this.state !== 'open') throw new BlockrelayError('BR_HRL_CLOSED', `HRL log ${this.path} is ${this.state}`);
        if (this.failure !== undefined) throw this.failure;
        return await fn();
      } finally {
        this.queued--;
      }
    };
    this.queued++;
    const next = this.queue.then(run, run);
    this.queue = next.catch(() => undefined);
    return next;
  }

  private async writeAnchor(): Promise<void> {
    const header = encodeHrlHeader({
      timestamp: this.createdTimestamp,
      originalSize: 0,
      currentSize: 0,
      eolLocation: 0,
      metadataSize: this.metadataSizeBytes,
      uniqueId: this.uniqueId,
      previousUniqueId: this.previousUniqueId,
      lastModifiedTimestamp: this.createdTimestamp,
      totalMetadataEntries: 0,
      vhd2DataWriteGuid: this.vhd2DataWriteGuid,
    });
    // The empty first block at 4096 (as in the spec's example) anchors the
    // chain, so recovery of an unsealed log can find every later block by
    // its PreviousMetadataLocation.
    const anchor = Buffer.alloc(this.metadataSizeBytes);
    encodeHrlMetadataHeader({ previousMetadataLocation: 0, validMetadataEntries: 0 }, anchor, 0);
    await this.fh.writev([header, anchor], 0);
    await this.fh.datasync();
    this.writtenEnd = HRL_HEADER_SIZE + this.metadataSizeBytes;
    this.durableEnd = this.writtenEnd;
  }

  private addEntry(byteOffset: number, piece: Uint8Array, dataChecksum: number): void {
    encodeHrlMetadataEntry(
      { byteOffset, dataLength: piece.length, timestamp: hrlTimestampFromMs(this.clock.now()), dataChecksum },
      this.block,
      HRL_METADATA_HEADER_SIZE + this.entriesInBlock * HRL_METADATA_ENTRY_SIZE,
    );
    this.entriesInBlock++;
  }

  private async appendPiece(byteOffset: number, piece: Uint8Array, dataChecksum: number): Promise<void> {
    if (this.entriesInBlock === this.entriesPerBlock) await this.closeBlock();
    this.addEntry(byteOffset, piece, dataChecksum);
    if (piece.length <= this.staging.length - this.stagedBytes) {
      this.staging.set(piece, this.stagedBytes);
      this.stagedBytes += piece.length;
      return;
    }
    await this.writeStaged();
    if (piece.length >= this.staging.length) {
      const buf = Buffer.from(piece.buffer, piece.byteOffset, piece.length);
      await this.io('write', () => this.fh.write(buf, 0, buf.length, this.writtenEnd));
      this.writtenEnd += piece.length;
    } else {
      this.staging.set(piece, 0);
      this.stagedBytes = piece.length;
    }
  }

  private async writeStaged(): Promise<void> {
    if (this.stagedBytes === 0) return;
    const n = this.stagedBytes;
    await this.io('write', () => this.fh.write(this.staging, 0, n, this.writtenEnd));
    this.writtenEnd += n;
    this.stagedBytes = 0;
  }

  /** Writes staged payloads and the current block right after them. */
  private async closeBlock(): Promise<void> {
    const blockOffset = this.writtenEnd + this.stagedBytes;
    encodeHrlMetadataHeader({ previousMetadataLocation: blockOffset - this.lastBlockOffset, validMetadataEntries: this.entriesInBlock }, this.block, 0);
    const parts = this.stagedBytes > 0 ? [this.staging.subarray(0, this.stagedBytes), this.block] : [this.block];
    await this.io('write', () => this.fh.writev(parts, this.writtenEnd));
    this.writtenEnd = blockOffset + this.metadataSizeBytes;
    this.stagedBytes = 0;
    this.lastBlockOffset = blockOffset;
    this.totalEntries += this.entriesInBlock;
    this.entriesInBlock = 0;
    this.block.fill(0);
  }

  private async io<T>(what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      throw this.poison(wrapError(err, 'BR_IO', `HRL log ${this.path}: ${what} failed`));
    }
  }
}

/** An Error carrying an errno's name as `code`, as Node's own I/O errors do. */
function errnoError(errno: number): NodeJS.ErrnoException {
  const name = Object.entries(os.constants.errno).find(([, n]) => n === errno)?.[0] ?? `errno ${errno}`;
  return Object.assign(new Error(`${name}: native log write failed`), { code: name, errno });
}

function checkRange(byteOffset: number, length: number): void {
  if (!Number.isSafeInteger(byteOffset) || byteOffset < 0 || !Number.isSafeInteger(length) || length < 0 || byteOffset + length > Number.MAX_SAFE_INTEGER) {
    throw new BlockrelayError('BR_INTERNAL', `HRL append range out of bounds: offset ${byteOffset}, length ${length}`);
  }
}

