import * as fsp from 'node:fs/promises';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import type { ErrorCode } from '../retry/error-codes';
import {
  HRL_COOKIE,
  HRL_COOKIE_COMPARED_BYTES,
  HRL_EOL_LOCATION_OFFSET,
  HRL_FILE_TYPE_HRL,
  HRL_FILE_TYPE_OFFSET,
  HRL_FLAGS_OFFSET,
  HRL_HEADER_CHECKSUM_OFFSET,
  HRL_HEADER_RESERVED_OFFSET,
  HRL_HEADER_SIZE,
  HRL_LOG_FORMAT_VERSION_OFFSET,
  HRL_MAX_METADATA_SIZE,
  HRL_METADATA_ENTRY_SIZE,
  HRL_METADATA_HEADER_SIZE,
  HRL_METADATA_SIZE_OFFSET,
  HRL_META_OPERATION_WRITE,
  HRL_ME_BYTE_OFFSET_OFFSET,
  HRL_ME_CHECKSUM_OFFSET,
  HRL_ME_DATA_CHECKSUM_OFFSET,
  HRL_ME_DATA_LENGTH_OFFSET,
  HRL_ME_LOCATION_OFFSET,
  HRL_ME_META_OPERATION_OFFSET,
  HRL_ME_RESERVED_OFFSET,
  HRL_ME_RESERVED_SIZE,
  HRL_MH_CHECKSUM_OFFSET,
  HRL_MH_PREVIOUS_LOCATION_OFFSET,
  HRL_MH_RESERVED_OFFSET,
  HRL_MH_RESERVED_SIZE,
  HRL_MH_VALID_ENTRIES_OFFSET,
  HRL_MIN_METADATA_SIZE,
  HRL_TOTAL_METADATA_ENTRIES_OFFSET,
  HRL_VERSION_1,
  HRL_VERSION_2,
  computeHrlHeaderChecksum,
  computeHrlMetadataHeaderChecksum,
  decodeHrlHeader,
  decodeHrlMetadataEntry,
  decodeHrlMetadataHeader,
  hrlByteSum,
  hrlChecksumFromSum,
  hrlEntriesPerBlock,
  isAllZero,
  readU64,
  type HrlHeader,
} from './hrl-format';

/** How much payload the verifier and the apply loop read at once. */
export const HRL_READ_CHUNK_BYTES = 4 * 1024 * 1024;

export interface HrlVerifyOptions {
  /** Refuse entries reaching past this disk size (BR_HRL_PAST_DISK_END). */
  readonly diskSizeBytes?: number;
  /** Refuse entries whose offset or length is not a multiple of this (BR_HRL_MISALIGNED). */
  readonly alignmentBytes?: number;
  /** Check payloads against DataChecksum (default true); false reads only the metadata. */
  readonly checkPayloads?: boolean;
  /** Also keep every entry in `HrlVerifiedLog.entryTable` (default false). */
  readonly collectEntries?: boolean;
}

/**
 * A verified log's entries in apply order as columns of typed arrays: one
 * decode of the metadata shared by whoever walks the log next (ranges,
 * apply) instead of an object per entry per walk. Entry i is
 * `[byteOffsets[i], +dataLengths[i])` on the disk, its payload at
 * `payloadFileOffsets[i]` in the log, its 32-byte entry at
 * `entryFileOffsets[i]`. The arrays may be longer than `count`.
 */
export interface HrlEntryTable {
  readonly count: number;
  readonly byteOffsets: Float64Array;
  readonly dataLengths: Float64Array;
  readonly payloadFileOffsets: Float64Array;
  readonly entryFileOffsets: Float64Array;
}

export interface HrlBlockInfo {
  /** File offset of the metadata block. */
  readonly offset: number;
  readonly previousMetadataLocation: number;
  readonly validEntries: number;
  /** File offset where this block's payloads start. */
  readonly payloadStart: number;
}

/** One logged write, in apply order. */
export interface HrlLogEntry {
  /** 0-based position in apply order. */
  readonly index: number;
  /** File offset of the 32-byte entry. */
  readonly entryFileOffset: number;
  /** File offset of the payload. */
  readonly payloadFileOffset: number;
  readonly byteOffset: number;
  readonly dataLength: number;
  readonly timestamp: number;
  readonly dataChecksum: number;
}

/**
 * An entry of an unsealed log whose payload fails its DataChecksum inside
 * the part of the log that was durable once: a power loss tore an in-place
 * rewrite (old entry with new payload bytes, or the reverse). Recovery
 * reports it instead of cutting the log there.
 */
export interface HrlTornEntry {
  /** File offset of the 32-byte entry. */
  readonly entryFileOffset: number;
  /** File offset of the payload. */
  readonly payloadFileOffset: number;
  readonly byteOffset: number;
  readonly dataLength: number;
  /** DataChecksum stored in the entry. */
  readonly storedChecksum: number;
  /** Checksum of the payload bytes present. */
  readonly actualChecksum: number;
  /** The 32 entry bytes as the scan read them (recovery rewrites its checksums in a copy). */
  readonly entry: Buffer;
}

/**
 * Tolerance of torn in-place rewrites, for recovery only (`verify()` never
 * takes it): blocks ending at or below `rewritableBelowBytes` are accepted
 * when their structure and entry checksums hold, and each payload that fails
 * its DataChecksum is added to `torn` instead of failing the walk.
 */
export interface HrlRewriteTolerance {
  readonly rewritableBelowBytes: number;
  readonly torn: HrlTornEntry[];
}

/** The result of a full verification. */
export interface HrlVerifiedLog {
  readonly path: string;
  readonly fileSizeBytes: number;
  readonly header: HrlHeader;
  /** Metadata blocks in file (apply) order. */
  readonly blocks: readonly HrlBlockInfo[];
  readonly entryCount: number;
  readonly payloadBytes: number;
  /** Entries with DataChecksum 0, whose payload cannot be checked (see docs/formats/ms-hrl.md). */
  readonly unverifiedPayloads: number;
  /** Every entry, when verified with `collectEntries`. */
  readonly entryTable?: HrlEntryTable;
}

/** Entries an entry table starts with before it grows (doubling): 64 Ki entries, 2 MiB. */
const ENTRY_TABLE_INITIAL_CAPACITY = 65_536;

/** A growable HrlEntryTable being filled by a verification. */
export class HrlEntryTableBuilder implements HrlEntryTable {
  count = 0;
  byteOffsets: Float64Array;
  dataLengths: Float64Array;
  payloadFileOffsets: Float64Array;
  entryFileOffsets: Float64Array;

  constructor(capacity: number) {
    const n = Math.max(16, capacity);
    this.byteOffsets = new Float64Array(n);
    this.dataLengths = new Float64Array(n);
    this.payloadFileOffsets = new Float64Array(n);
    this.entryFileOffsets = new Float64Array(n);
  }

  push(byteOffset: number, dataLength: number, payloadFileOffset: number, entryFileOffset: number): void {
    if (this.count === this.byteOffsets.length) {
      const grow = (a: Float64Array): Float64Array => {
        const b = new Float64Array(a.length * 2);
        b.set(a);
        return b;
      };
      this.byteOffsets = grow(this.byteOffsets);
      this.dataLengths = grow(this.dataLengths);
      this.payloadFileOffsets = grow(this.payloadFileOffsets);
      this.entryFileOffsets = grow(this.entryFileOffsets);
    }
    const i = this.count++;
    this.byteOffsets[i] = byteOffset;
    this.dataLengths[i] = dataLength;
    this.payloadFileOffsets[i] = payloadFileOffset;
    this.entryFileOffsets[i] = entryFileOffset;
  }
}

/** Builds the coded error for damage at `offset` in `file`. */
export function hrlDamage(code: ErrorCode, file: string, offset: number, message: string, details: Record<string, string | number> = {}): BlockrelayError {
  return new BlockrelayError(code, `${file} at byte ${offset}: ${message}`, { details: { file, offset, ...details } });
}

/**
 * A payload buffer handed from one closed log file to the next: every log
 * the chain receives is verified in full, and a fresh 4 MiB buffer per log
 * was that much garbage for the collector each time. A file opened while
 * the spare is in use allocates its own (and may leave it as the spare).
 */
let spareChunk: Buffer | undefined;

/**
 * A log file opened for verification and reading. `verify()` checks every
 * structure ([MS-HRL] §2.2-§2.6 plus the sanity rules of the notes §3) and
 * every payload before anything is yielded; `entries()` then walks the
 * verified blocks in apply order and `readPayload()` reads their data.
 *
 * A log may also be read from memory (`fromBytes`): the master target keeps
 * a log it applies on receipt in one buffer instead of a temp file. The
 * checks are the same; `view()` then hands out views of that buffer where a
 * file would be read into a scratch buffer.
 */
export class HrlLogFile {
  /** Payload read buffer, allocated on first use and kept for the file's life. */
  private chunk: Buffer | undefined;

  private constructor(readonly path: string, private readonly fh: fsp.FileHandle | undefined, readonly fileSizeBytes: number, private readonly bytes?: Buffer) {}

  /** A log whose whole content is `bytes`, named `name` in errors (nothing is copied; the caller keeps the buffer unchanged while it is read). */
  static fromBytes(name: string, bytes: Buffer): HrlLogFile {
    return new HrlLogFile(name, undefined, bytes.length, bytes);
  }

  /** True when the log is read from memory (`fromBytes`). */
  get inMemory(): boolean {
    return this.bytes !== undefined;
  }

  static async open(filePath: string): Promise<HrlLogFile> {
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(filePath, 'r');
    } catch (err) {
      throw wrapError(err, 'BR_IO', `cannot open HRL log ${filePath}`);
    }
    try {
      const st = await fh.stat();
      return new HrlLogFile(filePath, fh, st.size);
    } catch (err) {
      await fh.close().catch(() => undefined);
      throw wrapError(err, 'BR_IO', `cannot stat HRL log ${filePath}`);
    }
  }

  async close(): Promise<void> {
    await this.fh?.close().catch(() => undefined);
    // Callers await every read before closing, so nothing is reading into it.
    if (this.chunk !== undefined) spareChunk ??= this.chunk;
    this.chunk = undefined;
  }

  /** Reads exactly `length` bytes at `offset`, or fails with BR_HRL_TRUNCATED. */
  async readExact(offset: number, length: number, what: string, into?: Buffer): Promise<Buffer> {
    if (offset + length > this.fileSizeBytes) {
      throw hrlDamage('BR_HRL_TRUNCATED', this.path, offset, `${what} needs ${length} bytes but the file ends at ${this.fileSizeBytes}`, { fileSizeBytes: this.fileSizeBytes });
    }
    const buf = into ?? Buffer.alloc(length);
    if (this.bytes !== undefined) {
      this.bytes.copy(buf, 0, offset, offset + length);
      return buf;
    }
    let done = 0;
    while (done < length) {
      let n: number;
      try {
        ({ bytesRead: n } = await this.fh!.read(buf, done, length - done, offset + done));
      } catch (err) {
        throw wrapError(err, 'BR_IO', `reading ${this.path} at byte ${offset + done}`);
      }
      if (n === 0) throw hrlDamage('BR_HRL_TRUNCATED', this.path, offset + done, `${what} is cut short`);
      done += n;
    }
    return buf;
  }

  /**
   * `length` bytes at `offset`: a view of the log's buffer when it is in
   * memory, else read into `scratch` (at least `length` bytes) like
   * `readExact`. Either way the caller only reads the result.
   */
  async view(offset: number, length: number, what: string, scratch: Buffer): Promise<Buffer> {
    if (this.bytes === undefined || offset + length > this.fileSizeBytes) return this.readExact(offset, length, what, scratch.length === length ? scratch : scratch.subarray(0, length));
    return this.bytes.subarray(offset, offset + length);
  }

  /** Reads and checks the file header (cookie, version, checksum, fields), not EOLLocation. */
  async readHeader(): Promise<HrlHeader> {
    if (this.fileSizeBytes < HRL_HEADER_SIZE) {
      throw hrlDamage('BR_HRL_TRUNCATED', this.path, this.fileSizeBytes, `file is ${this.fileSizeBytes} bytes, shorter than the ${HRL_HEADER_SIZE}-byte header`);
    }
    const buf = await this.readExact(0, HRL_HEADER_SIZE, 'header');
    checkHeaderBytes(buf, this.path);
    return decodeHrlHeader(buf);
  }

  /**
   * Verifies the whole log. Throws the first damage found as a coded,
   * non-recoverable error naming the byte offset.
   */
  async verify(options: HrlVerifyOptions = {}): Promise<HrlVerifiedLog> {
    const header = await this.readHeader();
    const ms = header.metadataSize;
    const eol = header.eolLocation;
    if (eol === 0) throw hrlDamage('BR_HRL_UNSEALED', this.path, HRL_EOL_LOCATION_OFFSET, 'EOLLocation is 0: the log was not closed');
    if (eol < HRL_HEADER_SIZE + ms) {
      throw hrlDamage('BR_HRL_EOL_OUT_OF_RANGE', this.path, HRL_EOL_LOCATION_OFFSET, `EOLLocation ${eol} leaves no room for the header and one ${ms}-byte metadata block`);
    }
    if (eol > this.fileSizeBytes) {
      throw hrlDamage('BR_HRL_TRUNCATED', this.path, this.fileSizeBytes, `EOLLocation is ${eol} but the file ends at ${this.fileSizeBytes}`, { eolLocation: eol });
    }
    // Sized by the header's count, bounded by what the file can hold; the count is checked below.
    // Sized from the header's count only up to a modest start: the count is
    // checked against the blocks after the walk, and a damaged header must
    // not cost memory in proportion to what it claims (the table grows).
    const table = options.collectEntries === true ? new HrlEntryTableBuilder(Math.min(header.totalMetadataEntries, ENTRY_TABLE_INITIAL_CAPACITY, Math.floor(this.fileSizeBytes / HRL_METADATA_ENTRY_SIZE))) : undefined;
    const { blocks, entryCount, payloadBytes, unverified } = await this.verifyChain(eol - ms, ms, options, table);
    if (entryCount !== header.totalMetadataEntries) {
      throw hrlDamage('BR_HRL_ENTRY_COUNT_MISMATCH', this.path, HRL_TOTAL_METADATA_ENTRIES_OFFSET, `TotalMetadataEntries is ${header.totalMetadataEntries} but the blocks hold ${entryCount} valid entries`, { expected: entryCount });
    }
    return { path: this.path, fileSizeBytes: this.fileSizeBytes, header, blocks, entryCount, payloadBytes, unverifiedPayloads: unverified, ...(table === undefined ? {} : { entryTable: table }) };
  }

  /**
   * Verifies the chain that ends with the metadata block at `lastOffset`:
   * the backward walk, then every block, entry and (unless turned off)
   * payload in file order. Used by `verify()` with EOLLocation − MetadataSize
   * and by recovery with a remembered end of an unsealed log (with `tolerance`
   * for the part below the end a flush once made durable).
   */
  async verifyChain(lastOffset: number, ms: number, options: HrlVerifyOptions = {}, table?: HrlEntryTableBuilder, tolerance?: HrlRewriteTolerance): Promise<{ blocks: HrlBlockInfo[]; entryCount: number; payloadBytes: number; unverified: number }> {
    const blockOffsets = await this.walkChain(lastOffset, ms);
    const blocks: HrlBlockInfo[] = [];
    const block = Buffer.alloc(ms);
    let payloadStart = HRL_HEADER_SIZE;
    let entryCount = 0;
    let payloadBytes = 0;
    let unverified = 0;
    for (let i = blockOffsets.length - 1; i >= 0; i--) {
      const offset = blockOffsets[i]!;
      const bytes = await this.view(offset, ms, 'metadata block', block);
      const checked = checkBlockEntries(bytes, offset, payloadStart, this.path, options, table);
      if (options.checkPayloads !== false) {
        const torn = tolerance !== undefined && offset + ms <= tolerance.rewritableBelowBytes ? tolerance.torn : undefined;
        await this.verifyPayloads(bytes, offset, payloadStart, checked.validEntries, torn);
      }
      unverified += checked.unverified;
      blocks.push({ offset, previousMetadataLocation: checked.previousMetadataLocation, validEntries: checked.validEntries, payloadStart });
      entryCount += checked.validEntries;
      payloadBytes += offset - payloadStart;
      payloadStart = offset + ms;
    }
    return { blocks, entryCount, payloadBytes, unverified };
  }

  /**
   * The entries of a verified log in apply order. Each block is read again
   * and its checksums compared again, so a file changed since `verify()`
   * stops the walk instead of yielding different data.
   */
  async *entries(verified: HrlVerifiedLog): AsyncGenerator<HrlLogEntry> {
    const ms = verified.header.metadataSize;
    const scratch = Buffer.alloc(ms);
    let index = 0;
    for (const info of verified.blocks) {
      const block = await this.view(info.offset, ms, 'metadata block', scratch);
      checkBlockEntries(block, info.offset, info.payloadStart, this.path, {});
      let payload = info.payloadStart;
      for (let e = 0; e < info.validEntries; e++) {
        const at = HRL_METADATA_HEADER_SIZE + e * HRL_METADATA_ENTRY_SIZE;
        const d = decodeHrlMetadataEntry(block, at);
        yield { index: index++, entryFileOffset: info.offset + at, payloadFileOffset: payload, byteOffset: d.byteOffset, dataLength: d.dataLength, timestamp: d.timestamp, dataChecksum: d.dataChecksum };
        payload += d.dataLength;
      }
    }
  }

  /**
   * The entries of a verified log as a table: the one its verification
   * kept (`collectEntries`), else each block read and checked again as
   * `entries()` does, without an object per entry.
   */
  async entryTable(verified: HrlVerifiedLog): Promise<HrlEntryTable> {
    if (verified.entryTable !== undefined) return verified.entryTable;
    const ms = verified.header.metadataSize;
    const scratch = Buffer.alloc(ms);
    const table = new HrlEntryTableBuilder(verified.entryCount);
    for (const info of verified.blocks) {
      const block = await this.view(info.offset, ms, 'metadata block', scratch);
      checkBlockEntries(block, info.offset, info.payloadStart, this.path, {}, table);
    }
    return table;
  }

  /** Reads `length` payload bytes of `entry` starting `from` bytes into it. */
  async readPayload(entry: HrlLogEntry, from: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.readExact(entry.payloadFileOffset + from, length, 'payload', into);
  }

  /**
   * Pass 1 of [MS-HRL] §2.5: from the last block back to the first, checking
   * each metadata header. Returns block offsets, last block first. The chain
   * must move back by at least one whole block each step, so it ends.
   */
  private async walkChain(lastOffset: number, ms: number): Promise<number[]> {
    const offsets: number[] = [];
    const head = Buffer.alloc(HRL_METADATA_HEADER_SIZE);
    let cur = lastOffset;
    for (;;) {
      await this.readExact(cur, HRL_METADATA_HEADER_SIZE, 'metadata header', head);
      checkMetadataHeader(head, cur, ms, this.path);
      offsets.push(cur);
      const raw = head.readBigUInt64LE(HRL_MH_PREVIOUS_LOCATION_OFFSET);
      if (raw === 0n) return offsets;
      if (raw >= 1n << 63n || raw < BigInt(ms)) {
        throw hrlDamage('BR_HRL_CHAIN_LOOP', this.path, cur + HRL_MH_PREVIOUS_LOCATION_OFFSET, `PreviousMetadataLocation ${raw} does not move back past a whole ${ms}-byte block; the chain would loop`, { value: raw.toString() });
      }
      const prev = cur - Number(raw);
      if (prev < HRL_HEADER_SIZE) {
        throw hrlDamage('BR_HRL_CHAIN_OUT_OF_RANGE', this.path, cur + HRL_MH_PREVIOUS_LOCATION_OFFSET, `PreviousMetadataLocation ${raw} points to ${prev}, before the end of the header`, { value: raw.toString() });
      }
      cur = prev;
    }
  }

  /**
   * Checks every payload of a block against its DataChecksum. The payload
   * region `[payloadStart, blockOffset)` is read in chunks of at most
   * HRL_READ_CHUNK_BYTES (one buffer per log file, reused) and each entry's
   * byte sum is accumulated across chunk boundaries. With `torn`, a
   * mismatch is added there (recovery's tolerance of torn rewrites) instead
   * of thrown.
   */
  async verifyPayloads(block: Buffer, blockOffset: number, payloadStart: number, validEntries: number, torn?: HrlTornEntry[]): Promise<void> {
    let entry = -1;
    let entryLeft = 0;
    let entryStart = payloadStart;
    let sum = 0;
    let expected = 0;
    const finishEntry = (): void => {
      if (entry < 0 || expected === 0) return;
      const actual = hrlChecksumFromSum(sum);
      if (actual !== expected) {
        const entryOffset = blockOffset + HRL_METADATA_HEADER_SIZE + entry * HRL_METADATA_ENTRY_SIZE;
        if (torn !== undefined) {
          const at = entryOffset - blockOffset;
          torn.push({ entryFileOffset: entryOffset, payloadFileOffset: entryStart, byteOffset: readU64(block, at + HRL_ME_BYTE_OFFSET_OFFSET), dataLength: block.readUInt32LE(at + HRL_ME_DATA_LENGTH_OFFSET), storedChecksum: expected, actualChecksum: actual, entry: Buffer.from(block.subarray(at, at + HRL_METADATA_ENTRY_SIZE)) });
          return;
        }
        throw hrlDamage('BR_HRL_DATA_CHECKSUM', this.path, entryStart, `payload of the entry at byte ${entryOffset} has checksum 0x${hex32(actual)}, DataChecksum says 0x${hex32(expected)}`, { entryOffset });
      }
    };
    const nextEntry = (at: number): void => {
      finishEntry();
      entry++;
      const field = HRL_METADATA_HEADER_SIZE + entry * HRL_METADATA_ENTRY_SIZE;
      entryLeft = block.readUInt32LE(field + HRL_ME_DATA_LENGTH_OFFSET);
      expected = block.readUInt32LE(field + HRL_ME_DATA_CHECKSUM_OFFSET);
      entryStart = at;
      sum = 0;
    };
    while (entry + 1 < validEntries && entryLeft === 0) nextEntry(payloadStart);
    for (let at = payloadStart; at < blockOffset; ) {
      const n = Math.min(HRL_READ_CHUNK_BYTES, blockOffset - at);
      if (this.chunk === undefined && this.bytes === undefined) {
        this.chunk = spareChunk ?? Buffer.allocUnsafe(HRL_READ_CHUNK_BYTES);
        spareChunk = undefined;
      }
      const chunk = this.bytes !== undefined ? await this.view(at, n, 'payload', EMPTY) : await this.readExact(at, n, 'payload', this.chunk!.subarray(0, n));
      let pos = 0;
      while (pos < n) {
        const take = Math.min(entryLeft, n - pos);
        if (expected !== 0) sum = (sum + hrlByteSum(chunk.subarray(pos, pos + take))) >>> 0;
        pos += take;
        entryLeft -= take;
        while (entryLeft === 0 && entry + 1 < validEntries) nextEntry(at + pos);
        if (entryLeft === 0 && pos < n) break; // cannot happen after checkBlockEntries: lengths fill the region
      }
      at += n;
    }
    finishEntry();
  }
}

/** The scratch of a view that never reads a file. */
const EMPTY = Buffer.alloc(0);

function hex32(n: number): string {
  return n.toString(16).padStart(8, '0');
}

/** Cookie, version, checksum and must-be-zero fields of a 4096-byte header. */
export function checkHeaderBytes(buf: Buffer, file: string): void {
  if (!buf.subarray(0, HRL_COOKIE_COMPARED_BYTES).equals(HRL_COOKIE.subarray(0, HRL_COOKIE_COMPARED_BYTES))) {
    throw hrlDamage('BR_HRL_BAD_COOKIE', file, 0, `cookie is '${buf.subarray(0, 8).toString('latin1').replace(/[^\x20-\x7e]/g, '.')}', not 'msctlog'`);
  }
  const version = buf.readUInt32LE(HRL_LOG_FORMAT_VERSION_OFFSET);
  if (version !== HRL_VERSION_2) {
    const why = version === HRL_VERSION_1 ? 'version 1 (Windows Server 2012 local format) is not supported' : 'unknown version';
    throw hrlDamage('BR_HRL_UNSUPPORTED_VERSION', file, HRL_LOG_FORMAT_VERSION_OFFSET, `LogFormatVersion 0x${hex32(version)}: ${why}; expected 0x00020000`, { version });
  }
  const stored = buf.readUInt32LE(HRL_HEADER_CHECKSUM_OFFSET);
  const actual = computeHrlHeaderChecksum(buf);
  if (stored !== actual) {
    throw hrlDamage('BR_HRL_HEADER_CHECKSUM', file, HRL_HEADER_CHECKSUM_OFFSET, `header checksum is 0x${hex32(stored)}, computed 0x${hex32(actual)}`);
  }
  const fileType = buf.readUInt32LE(HRL_FILE_TYPE_OFFSET);
  if (fileType !== HRL_FILE_TYPE_HRL) throw hrlDamage('BR_HRL_HEADER_FIELD', file, HRL_FILE_TYPE_OFFSET, `FileType is ${fileType}, expected 0`);
  if (buf.readUInt16LE(HRL_FLAGS_OFFSET) !== 0) throw hrlDamage('BR_HRL_HEADER_FIELD', file, HRL_FLAGS_OFFSET, 'Flags must be 0');
  for (let i = HRL_HEADER_RESERVED_OFFSET; i < HRL_HEADER_SIZE; i++) {
    if (buf[i] !== 0) throw hrlDamage('BR_HRL_HEADER_FIELD', file, i, 'header Reserved bytes must be 0');
  }
  const ms = buf.readUInt32LE(HRL_METADATA_SIZE_OFFSET);
  if (ms < HRL_MIN_METADATA_SIZE || ms > HRL_MAX_METADATA_SIZE || ms % HRL_METADATA_ENTRY_SIZE !== 0) {
    throw hrlDamage('BR_HRL_HEADER_FIELD', file, HRL_METADATA_SIZE_OFFSET, `MetadataSize ${ms} is not a multiple of 32 in [${HRL_MIN_METADATA_SIZE}, ${HRL_MAX_METADATA_SIZE}]`);
  }
}

/** Checksum, Reserved and ValidMetadataEntries of the 32-byte metadata header at the start of `head`. */
export function checkMetadataHeader(head: Buffer, blockOffset: number, ms: number, file: string): void {
  const stored = head.readUInt32LE(HRL_MH_CHECKSUM_OFFSET);
  const actual = computeHrlMetadataHeaderChecksum(head, 0);
  if (stored !== actual) {
    throw hrlDamage('BR_HRL_METADATA_CHECKSUM', file, blockOffset + HRL_MH_CHECKSUM_OFFSET, `metadata header checksum is 0x${hex32(stored)}, computed 0x${hex32(actual)}`, { blockOffset });
  }
  if (!isAllZero(head, HRL_MH_RESERVED_OFFSET, HRL_MH_RESERVED_OFFSET + HRL_MH_RESERVED_SIZE)) {
    throw hrlDamage('BR_HRL_METADATA_FIELD', file, blockOffset + HRL_MH_RESERVED_OFFSET, 'metadata header Reserved bytes must be 0', { blockOffset });
  }
  const valid = head.readUInt32LE(HRL_MH_VALID_ENTRIES_OFFSET);
  const capacity = hrlEntriesPerBlock(ms);
  if (valid > capacity) {
    throw hrlDamage('BR_HRL_METADATA_FIELD', file, blockOffset + HRL_MH_VALID_ENTRIES_OFFSET, `ValidMetadataEntries ${valid} exceeds the ${capacity} slots of a ${ms}-byte block`, { blockOffset });
  }
}

/**
 * Checks a whole metadata block read into `block`: its header, each valid
 * entry (checksum, operation, must-be-zero bytes, range, disk bounds) and
 * that the payload lengths fill `[payloadStart, blockOffset)` exactly.
 */
export function checkBlockEntries(block: Buffer, blockOffset: number, payloadStart: number, file: string, options: HrlVerifyOptions, table?: HrlEntryTableBuilder): { validEntries: number; previousMetadataLocation: number; unverified: number } {
  checkMetadataHeader(block, blockOffset, block.length, file);
  const head = decodeHrlMetadataHeader(block, 0);
  let total = 0;
  let unverified = 0;
  const align = options.alignmentBytes ?? 1;
  for (let e = 0; e < head.validMetadataEntries; e++) {
    const at = HRL_METADATA_HEADER_SIZE + e * HRL_METADATA_ENTRY_SIZE;
    const entryOffset = blockOffset + at;
    const stored = block.readUInt32LE(at + HRL_ME_CHECKSUM_OFFSET);
    const actual = entryChecksum(block, at);
    if (stored !== actual) {
      throw hrlDamage('BR_HRL_ENTRY_CHECKSUM', file, entryOffset + HRL_ME_CHECKSUM_OFFSET, `metadata entry checksum is 0x${hex32(stored)}, computed 0x${hex32(actual)}`, { entryOffset });
    }
    // Fields read in place, not decoded into an object: this runs for
    // every entry of every log the chain verifies.
    const metaOperation = block[at + HRL_ME_META_OPERATION_OFFSET]!;
    const byteOffset = readU64(block, at + HRL_ME_BYTE_OFFSET_OFFSET);
    const dataLength = block.readUInt32LE(at + HRL_ME_DATA_LENGTH_OFFSET);
    if (metaOperation !== HRL_META_OPERATION_WRITE) {
      throw hrlDamage('BR_HRL_UNSUPPORTED_OPERATION', file, entryOffset + HRL_ME_META_OPERATION_OFFSET, `MetaOperation ${metaOperation} is not 1 (write)`, { entryOffset });
    }
    if (block[at + HRL_ME_LOCATION_OFFSET] !== 0 || !isAllZero(block, at + HRL_ME_RESERVED_OFFSET, at + HRL_ME_RESERVED_OFFSET + HRL_ME_RESERVED_SIZE)) {
      throw hrlDamage('BR_HRL_ENTRY_FIELD', file, entryOffset + HRL_ME_LOCATION_OFFSET, 'entry Location and Reserved bytes must be 0', { entryOffset });
    }
    if (!Number.isFinite(byteOffset) || byteOffset + dataLength > Number.MAX_SAFE_INTEGER) {
      throw hrlDamage('BR_HRL_ENTRY_FIELD', file, entryOffset, 'entry ByteOffset + DataLength exceeds 2^53', { entryOffset });
    }
    if (options.diskSizeBytes !== undefined && byteOffset + dataLength > options.diskSizeBytes) {
      throw hrlDamage('BR_HRL_PAST_DISK_END', file, entryOffset, `entry writes [${byteOffset}, ${byteOffset + dataLength}) past the disk end ${options.diskSizeBytes}`, { entryOffset, byteOffset: byteOffset, dataLength: dataLength, diskSizeBytes: options.diskSizeBytes });
    }
    if (byteOffset % align !== 0 || dataLength % align !== 0) {
      throw hrlDamage('BR_HRL_MISALIGNED', file, entryOffset, `entry [${byteOffset}, +${dataLength}) is not aligned to ${align} bytes`, { entryOffset, alignmentBytes: align });
    }
    if (block.readUInt32LE(at + HRL_ME_DATA_CHECKSUM_OFFSET) === 0) unverified++;
    table?.push(byteOffset, dataLength, payloadStart + total, entryOffset);
    total += dataLength;
  }
  if (payloadStart + total !== blockOffset) {
    throw hrlDamage('BR_HRL_PAYLOAD_MISFIT', file, blockOffset, `payload lengths sum to ${total} but the space from ${payloadStart} to this block is ${blockOffset - payloadStart}`, { payloadStart, payloadBytes: total });
  }
  return { validEntries: head.validMetadataEntries, previousMetadataLocation: head.previousMetadataLocation, unverified };
}

/**
 * The §2.6 checksum of the 32-byte entry at `at` (its Checksum field
 * skipped), summed here rather than through a view per entry.
 */
function entryChecksum(block: Buffer, at: number): number {
  let sum = 0;
  for (let i = 0; i < HRL_METADATA_ENTRY_SIZE; i++) {
    if (i === HRL_ME_CHECKSUM_OFFSET) i += 4;
    sum += block[at + i]!;
  }
  return ~sum >>> 0;
}

/** Opens, verifies and closes a log. */
export async function verifyHrlLog(filePath: string, options: HrlVerifyOptions = {}): Promise<HrlVerifiedLog> {
  const log = await HrlLogFile.open(filePath);
  try {
    return await log.verify(options);
  } finally {
    await log.close();
  }
}
