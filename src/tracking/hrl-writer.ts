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
  /** Overwrites of an exact extent replace the earlier entry in place (see HrlWriter). */
  coalesceOverwrites: true,
} as const;

/**
 * Most coalescible entries a log's writer remembers (TypeScript and native
 * alike): about 25 MB of map per open log at most. At the bound new entries are not
 * remembered (they are appended, never rewritten); overlaps still forget.
 */
export const HRL_COALESCE_MAX_ENTRIES = 262_144;

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
  /**
   * Rewrite an entry in place when a later append covers exactly its extent
   * and nothing appended in between overlaps it (default true). Off, every
   * append adds an entry (tests that count entries or compare bytes).
   */
  readonly coalesceOverwrites?: boolean;
  /** Bound of the coalescible-entry map (default HRL_COALESCE_MAX_ENTRIES; smaller in tests). */
  readonly coalesceMaxEntries?: number;
  /**
   * Pieces shorter than this are never rewritten in place, only appended
   * (default 1: every piece may be). Small rewrites save few bytes and cost
   * map upkeep and a positional write each; the change tracker sets 32 KiB.
   */
  readonly coalesceMinBytes?: number;
  /** Creates the log file (default: fs/promises open with 'wx+', refusing an existing file). */
  readonly openFile?: (filePath: string) => Promise<HrlWriterFile>;
  /**
   * The file is a scratch name the caller renames into place after `seal()`
   * and a crash before that rename discards (undo segments: `<seq>.undo.hrl.tmp`).
   * Nothing may read it unsealed, so nothing needs to be durable before the
   * seal: `create` skips the anchor's fdatasync and the directory sync, and
   * `seal` fdatasyncs once, after the header is written, making payloads,
   * blocks and header durable together before the caller's rename. Three
   * syncs of a log's file become one, and a directory sync goes (the
   * caller's sync after the rename covers the name). Default false: a log
   * recoverable unsealed (`recoverHrlLog`) needs every sync.
   */
  readonly scratchUntilSealed?: boolean;
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

/** An entry of the open log no later entry overlaps: it may be rewritten in place. */
interface CoalescibleEntry {
  readonly byteOffset: number;
  readonly length: number;
  /** File position of the payload; while at or past the written end it is still in the staging buffer. */
  readonly payloadPos: number;
  /** Slot of the entry in its metadata block. */
  readonly slot: number;
  /** File position of the 32-byte entry once its block is closed; -1 while it is in the open block. */
  entryPos: number;
}

/**
 * The coalescible entries of the open log, sorted by disk offset. Their
 * extents are pairwise disjoint (an overlapping append removes them), so
 * their ends are sorted too and the overlaps of a range are one run.
 * Bounded: at `maxEntries` new entries are not inserted.
 */
class CoalescibleEntries {
  private readonly items: CoalescibleEntry[] = [];

  constructor(private readonly maxEntries: number) {}

  get size(): number {
    return this.items.length;
  }

  /** The entry with exactly the extent `[byteOffset, byteOffset + length)`, if any. */
  exact(byteOffset: number, length: number): CoalescibleEntry | undefined {
    const e = this.items[this.firstAtOrAfter(byteOffset)];
    return e !== undefined && e.byteOffset === byteOffset && e.length === length ? e : undefined;
  }

  /** Forgets every entry overlapping `[byteOffset, byteOffset + length)`: a later entry now does. */
  removeOverlapping(byteOffset: number, length: number): void {
    const hi = this.firstAtOrAfter(byteOffset + length);
    let lo = hi;
    while (lo > 0 && this.items[lo - 1]!.byteOffset + this.items[lo - 1]!.length > byteOffset) lo--;
    if (lo < hi) this.items.splice(lo, hi - lo);
  }

  /** Inserts an entry overlapping none held (call removeOverlapping first); false at the bound. */
  insert(e: CoalescibleEntry): boolean {
    if (this.items.length >= this.maxEntries) return false;
    this.items.splice(this.firstAtOrAfter(e.byteOffset), 0, e);
    return true;
  }

  /** Index of the first entry starting at or after `byteOffset`. */
  private firstAtOrAfter(byteOffset: number): number {
    let lo = 0;
    let hi = this.items.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.items[mid]!.byteOffset < byteOffset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}

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
 * Overwrites coalesce (option `coalesceOverwrites`, default on): a recovery
 * point exists only at a cut, never inside a log, so a piece covering
 * exactly the extent of an earlier entry that no later entry overlaps
 * replaces that entry's payload, DataChecksum and TimeStamp in place (in
 * memory while staged, else a positional write of the payload and then one
 * of the 32-byte entry on its own, which lies in one sector). The log then
 * grows with the distinct extents written, not with the churn. Entry order
 * stays apply order; timestamps are no longer monotonic. A `flush()` after
 * a rewrite fdatasyncs even when the log's end did not move.
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
 * power loss) use the TypeScript path below, which writes byte-identical logs
 * with coalescing off. With it on, the native appender appends a piece the
 * TypeScript path would rewrite when the earlier entry's range is still in
 * flight to the file (a spare buffer being written): the logs then differ in
 * bytes, never in what they apply.
 */
export class HrlWriter {
  /** The file's name; `renamed` updates it when the caller moves the file. */
  get path(): string {
    return this.filePath;
  }
  private filePath: string;
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
  /** Entries that may be rewritten in place; undefined with coalescing off. */
  private readonly coalescible: CoalescibleEntries | undefined;
  /** The coalescible entries of the open block, given their file position when it closes. */
  private openBlockCoalescible: CoalescibleEntry[] = [];
  /** Set by a rewrite, cleared by a sync: flush() must fdatasync even if the end did not move. */
  private rewrittenSinceSync = false;
  private rewrites = 0;
  private rewrittenByteCount = 0;
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
    this.filePath = filePath;
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
    this.coalesceOverwrites = options.coalesceOverwrites ?? HRL_WRITER_DEFAULTS.coalesceOverwrites;
    this.coalesceMaxEntries = options.coalesceMaxEntries ?? HRL_COALESCE_MAX_ENTRIES;
    this.coalesceMinBytes = options.coalesceMinBytes ?? 1;
    this.coalescible = this.coalesceOverwrites ? new CoalescibleEntries(this.coalesceMaxEntries) : undefined;
    this.scratchUntilSealed = options.scratchUntilSealed ?? false;
  }

  /** See `HrlWriterOptions.scratchUntilSealed`: only the seal's last sync makes anything durable. */
  private readonly scratchUntilSealed: boolean;

  /** Whether overwrites of an exact extent rewrite the earlier entry in place. */
  readonly coalesceOverwrites: boolean;
  private readonly coalesceMaxEntries: number;
  private readonly coalesceMinBytes: number;

  /**
   * Creates the log (refusing an existing file), writes the open header and
   * the anchor block, and makes both durable together with the directory entry.
   */
  static async create(filePath: string, options: HrlWriterOptions = {}): Promise<HrlWriter> {
    const ms = options.metadataSizeBytes ?? HRL_WRITER_DEFAULTS.metadataSizeBytes;
    if (!Number.isInteger(ms) || ms < HRL_MIN_METADATA_SIZE || ms > HRL_MAX_METADATA_SIZE || ms % HRL_METADATA_ENTRY_SIZE !== 0) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `metadataSizeBytes must be a multiple of 32 in [${HRL_MIN_METADATA_SIZE}, ${HRL_MAX_METADATA_SIZE}], got ${ms}`);
    }
    const maxCoalescible = options.coalesceMaxEntries ?? HRL_COALESCE_MAX_ENTRIES;
    if (!Number.isInteger(maxCoalescible) || maxCoalescible < 0 || maxCoalescible > HRL_COALESCE_MAX_ENTRIES) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `coalesceMaxEntries must be in [0, ${HRL_COALESCE_MAX_ENTRIES}], got ${maxCoalescible}`);
    }
    const minCoalesced = options.coalesceMinBytes ?? 1;
    if (!Number.isInteger(minCoalesced) || minCoalesced < 1 || minCoalesced > HRL_MAX_DATA_LENGTH) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `coalesceMinBytes must be in [1, ${HRL_MAX_DATA_LENGTH}], got ${minCoalesced}`);
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
      if (!writer.scratchUntilSealed) await syncDirectory(path.dirname(filePath));
      const native = options.openFile === undefined ? loadNativeTap() : undefined;
      const fd = (fh as Partial<fsp.FileHandle>).fd;
      if (native !== undefined && typeof fd === 'number') {
        writer.core = new native.HrlAppender(fd, writer.metadataSizeBytes, writer.maxEntryBytes, writer.staging.length, writer.writtenEnd, writer.lastBlockOffset,
          writer.coalesceOverwrites ? writer.coalesceMaxEntries : 0, writer.coalesceMinBytes);
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

  /**
   * Tells the writer its file was renamed (the tracker makes the next log
   * ahead under another name and renames it at the cut), so its messages
   * and `seal()` name the file where it is. The open descriptor is unaffected.
   */
  renamed(newPath: string): void {
    this.filePath = newPath;
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

  /** Appended pieces that rewrote an earlier entry in place instead of adding one. */
  get rewriteCount(): number {
    if (this.core !== undefined) return this.core.state()[5] ?? 0;
    return this.rewrites;
  }

  /** Payload bytes those rewrites wrote (bytes the log did not grow by). */
  get rewrittenBytes(): number {
    if (this.core !== undefined) return this.core.state()[6] ?? 0;
    return this.rewrittenByteCount;
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
      const hit = this.coalescible?.exact(byteOffset, data.length);
      if (hit === undefined) {
        this.coalescible?.removeOverlapping(byteOffset, data.length);
        this.placePiece(byteOffset, data, hrlChecksum(data));
        return Promise.resolve();
      }
      // A rewrite in place needing a positional write queues like any I/O.
      if (this.rewritesInMemory(hit)) {
        this.rewriteInMemory(hit, data, hrlChecksum(data));
        return Promise.resolve();
      }
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
   * promise `append` returns is already resolved, unless (TypeScript path
   * only) the append rewrites in place an entry already handed to the file.
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
      // A rewrite in place leaves the end where it was, yet must become durable.
      // Taken (cleared) before the sync: a rewrite after this point sets it again for the next flush.
      const rewritten = (this.core?.takeRewrittenSinceSync() ?? false) || this.rewrittenSinceSync;
      this.rewrittenSinceSync = false;
      if (this.durableEnd === this.writtenEnd && !rewritten) return;
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
        // The payloads and blocks must be durable before the header claims
        // them: a crash in between would leave a sealed header over missing
        // data. A scratch file has no such moment (its name appears only
        // after this seal, by the caller's rename), so its one sync follows
        // the header.
        if (!this.scratchUntilSealed) await this.fh.datasync();
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
    this.writtenEnd = HRL_HEADER_SIZE + this.metadataSizeBytes;
    // A scratch file is not read before its seal (see scratchUntilSealed): its anchor need not be durable yet.
    if (this.scratchUntilSealed) return;
    await this.fh.datasync();
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

  /**
   * Adds the entry and stages the payload of a piece that fits the open
   * block and the staging buffer (overlapping coalescible entries already
   * removed), and remembers it as coalescible.
   */
  private placePiece(byteOffset: number, piece: Uint8Array, dataChecksum: number): void {
    this.remember(byteOffset, piece.length, this.writtenEnd + this.stagedBytes);
    this.addEntry(byteOffset, piece, dataChecksum);
    this.staging.set(piece, this.stagedBytes);
    this.stagedBytes += piece.length;
  }

  /** Records the entry about to take the open block's next slot, its payload at `payloadPos`. */
  private remember(byteOffset: number, length: number, payloadPos: number): void {
    if (this.coalescible === undefined || length < this.coalesceMinBytes) return;
    const e: CoalescibleEntry = { byteOffset, length, payloadPos, slot: this.entriesInBlock, entryPos: -1 };
    if (this.coalescible.insert(e)) this.openBlockCoalescible.push(e);
  }

  private async appendPiece(byteOffset: number, piece: Uint8Array, dataChecksum: number): Promise<void> {
    if (this.coalescible !== undefined) {
      const hit = this.coalescible.exact(byteOffset, piece.length);
      if (hit !== undefined && entryRewritable(hit)) {
        await this.rewrite(hit, piece, dataChecksum);
        return;
      }
      this.coalescible.removeOverlapping(byteOffset, piece.length);
    }
    if (this.entriesInBlock === this.entriesPerBlock) await this.closeBlock();
    if (piece.length <= this.staging.length - this.stagedBytes) {
      this.placePiece(byteOffset, piece, dataChecksum);
      return;
    }
    await this.writeStaged();
    this.remember(byteOffset, piece.length, this.writtenEnd);
    this.addEntry(byteOffset, piece, dataChecksum);
    if (piece.length >= this.staging.length) {
      const buf = Buffer.from(piece.buffer, piece.byteOffset, piece.length);
      await this.io('write', () => this.fh.write(buf, 0, buf.length, this.writtenEnd));
      this.writtenEnd += piece.length;
    } else {
      this.staging.set(piece, 0);
      this.stagedBytes = piece.length;
    }
  }

  /** True when both the payload and the entry of `e` are still in memory (staging buffer, open block). */
  private rewritesInMemory(e: CoalescibleEntry): boolean {
    return e.payloadPos >= this.writtenEnd && e.entryPos < 0;
  }

  private rewriteInMemory(e: CoalescibleEntry, piece: Uint8Array, dataChecksum: number): void {
    this.staging.set(piece, e.payloadPos - this.writtenEnd);
    this.encodeRewrittenEntry(e, dataChecksum, this.block, HRL_METADATA_HEADER_SIZE + e.slot * HRL_METADATA_ENTRY_SIZE);
    this.countRewrite(piece.length);
  }

  /**
   * Rewrites entry `e` in place with `piece`: payload first, then the
   * 32-byte entry as a write of its own (32-aligned, see entryRewritable:
   * inside one sector, so a power loss leaves it old or new, never torn).
   * Either may still be in memory.
   */
  private async rewrite(e: CoalescibleEntry, piece: Uint8Array, dataChecksum: number): Promise<void> {
    if (this.rewritesInMemory(e)) {
      this.rewriteInMemory(e, piece, dataChecksum);
      return;
    }
    if (e.payloadPos >= this.writtenEnd) {
      this.staging.set(piece, e.payloadPos - this.writtenEnd);
    } else {
      const buf = Buffer.from(piece.buffer, piece.byteOffset, piece.length);
      await this.io('rewrite', () => this.fh.write(buf, 0, buf.length, e.payloadPos));
    }
    if (e.entryPos < 0) {
      this.encodeRewrittenEntry(e, dataChecksum, this.block, HRL_METADATA_HEADER_SIZE + e.slot * HRL_METADATA_ENTRY_SIZE);
    } else {
      const entry = this.encodeRewrittenEntry(e, dataChecksum, Buffer.alloc(HRL_METADATA_ENTRY_SIZE), 0);
      await this.io('rewrite', () => this.fh.write(entry, 0, entry.length, e.entryPos));
    }
    this.countRewrite(piece.length);
  }

  private encodeRewrittenEntry(e: CoalescibleEntry, dataChecksum: number, out: Buffer, at: number): Buffer {
    return encodeHrlMetadataEntry({ byteOffset: e.byteOffset, dataLength: e.length, timestamp: hrlTimestampFromMs(this.clock.now()), dataChecksum }, out, at);
  }

  private countRewrite(length: number): void {
    this.rewrites++;
    this.rewrittenByteCount += length;
    this.rewrittenSinceSync = true;
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
    for (const e of this.openBlockCoalescible) e.entryPos = blockOffset + HRL_METADATA_HEADER_SIZE + e.slot * HRL_METADATA_ENTRY_SIZE;
    this.openBlockCoalescible = [];
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

/**
 * Whether the 32-byte entry of `e` may be rewritten: in the open block
 * always; in the file only at a 32-aligned position, where it cannot cross
 * a 512-byte sector (nor a page): a power loss then leaves it old or new,
 * never half of each (which recovery would take for a damaged block and cut
 * there). Blocks follow payloads of any length, so their offsets are not
 * always aligned; such an entry is appended again instead.
 */
function entryRewritable(e: CoalescibleEntry): boolean {
  return e.entryPos < 0 || e.entryPos % HRL_METADATA_ENTRY_SIZE === 0;
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

