import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as zlib from 'node:zlib';
import * as path from 'node:path';
import { BlockrelayError, wrapError } from '../../retry/blockrelay-error';
import type { AllocationExtent, DiskReadRequest, DiskTarget, DiskTargetCapabilities, PageCachePolicy } from '../disk-target';
import type { DiskUuidClaim } from '../disk-uuid-registry';
import { checkOpen, checkRequest } from '../request-bounds';
import { newCid } from './vmdk-content-id';
import { defaultDdb, descriptorSectorsNeeded, fromVmwareUuid, NO_PARENT_CID, parseDescriptor, randomCid, renderDescriptor, replaceCid, type VmdkDescriptor } from './vmdk-descriptor';
import {
  corrupt,
  decodeSparseHeader,
  encodeSparseHeader,
  FLAG_COMPRESSED_GRAINS,
  FLAG_REDUNDANT_GRAIN_TABLE,
  FOOTER_FROM_END,
  FOOTER_MARKER_FROM_END,
  GD_OFFSET_AT_END,
  GRAIN_MARKER_BYTES,
  MARKER_FOOTER,
  SPARSE_MAGIC,
  FLAG_ZEROED_GRAIN_GTE,
  GTE_BYTES,
  GTE_UNALLOCATED,
  GTE_ZEROED,
  HDR,
  HEADER_BYTES,
  MAX_CAPACITY_SECTORS,
  planSparseLayout,
  SECTOR_BYTES,
  gtCount,
  gtSectors,
  type SparseHeader,
} from './vmdk-format';
import { BackgroundSync } from '../../platform/background-sync';
import { DurablePageDropper } from '../../platform/page-cache';
import { buffersAfter, writevAll } from '../../platform/io-vectors';
import { readAt, writeAt, type PositionedIoError, type PositionedPiece } from './positioned-writes';

/** Clean grain tables kept in memory (2 KiB each: 8 MiB, mapping 128 GiB). Dirty ones stay until flushed. */
const MAX_CACHED_GTS = 4096;
/** New grains written before metadata is flushed on its own (1 GiB of 64 KiB grains): bounds dirty state and loss on a crash. */
const MAX_UNFLUSHED_GRAINS = 16384;
/** Largest read when scanning grain tables at open. */
const TABLE_SCAN_BYTES = 1024 * 1024;
/**
 * File reads of one `readMany` in flight at once: the grains of random disk
 * offsets lie at scattered file positions, and one positional read at a
 * time leaves the thread pool (4 threads) idle between calls. (Writes gain
 * nothing from it: buffered writes to one file serialise on its inode lock,
 * and a batched apply measured no faster than one write per entry.)
 */
const BATCH_IO_CONCURRENCY = 4;
/** Bytes written since the last sync after which a sync starts in the background (see `kickWriteback`). */
const WRITEBACK_BYTES = 32 * 1024 * 1024;
/** Shared, never-written zero source for zero checks and zero writes (max grain is 1 MiB). */
const ZEROES = Buffer.alloc(1024 * 1024);

function isAllZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZEROES.length) {
    const n = Math.min(ZEROES.length, buf.length - at);
    if (!buf.subarray(at, at + n).equals(ZEROES.subarray(0, n))) return false;
  }
  return true;
}

interface FileRun {
  position: number;
  buffers: Buffer[];
  bytes: number;
}

/** Groups (position, buffer) pieces into runs of adjacent file positions for readv/writev. */
function coalesce(pieces: Array<{ position: number; buffer: Buffer }>): FileRun[] {
  const runs: FileRun[] = [];
  for (const p of pieces) {
    const last = runs[runs.length - 1];
    if (last !== undefined && last.position + last.bytes === p.position && last.buffers.length < 512) {
      last.buffers.push(p.buffer);
      last.bytes += p.buffer.length;
    } else {
      runs.push({ position: p.position, buffers: [p.buffer], bytes: p.buffer.length });
    }
  }
  return runs;
}

/** Runs `fn` over `items` with at most `limit` running at once; rejects with the first failure after all have settled. */
async function inParallel<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: { err: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const item = items[next++]!;
      try {
        await fn(item);
      } catch (err) {
        failure ??= { err };
        next = items.length;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (failure !== undefined) throw failure.err;
}

/**
 * A monolithicSparse VMDK: one hosted sparse extent with its descriptor
 * embedded. Data lives in 64 KiB grains appended at the end of the file;
 * grain tables (GTs) map grains, and a grain directory (GD) plus a redundant
 * copy (RGD) map GTs.
 *
 * Crash order: a new grain's data is written at the end of the file, but its
 * GT entry is only changed in memory; `flush()` first makes the data durable
 * (fdatasync), then writes the GT entries to both the GD's and the RGD's GT,
 * then syncs again. A crash therefore never leaves a GT entry pointing at a
 * grain whose data did not reach the disk; at worst unflushed grains are
 * orphaned at the end of the file. While open for writing the header's
 * `uncleanShutdown` byte is 1; a clean close sets it back to 0. An image
 * found unclean is checked before use: every GT entry of both directories is
 * validated and the copies compared; the redundant copy is repaired from the
 * primary when they differ.
 *
 * Requests are serialised: allocation order and GT updates must not
 * interleave, and the master target applies one log at a time anyway.
 */
export class VmdkSparseTarget implements DiskTarget {
  /** Bytes written after which a sync starts in the background; tests lower it to reach that path with small images. */
  static writebackBytes = WRITEBACK_BYTES;
  readonly capabilities: DiskTargetCapabilities;
  readonly diskUuid: string | undefined;
  readonly sizeBytes: number;
  private readonly grainBytes: number;
  private readonly gtSectors: number;
  private readonly zeroedGrainGte: boolean;
  /** streamOptimized: grains are deflate streams behind grain markers; read-only. */
  private readonly compressed: boolean;
  private readonly cache = new Map<number, Uint32Array>();
  private readonly loading = new Map<number, Promise<Uint32Array | undefined>>();
  private readonly dirty = new Map<number, Uint32Array>();
  private gdDirty = false;
  private nextGrainSector: number;
  /** Sector after the last byte GT entries may point into. */
  private dataEndSector: number;
  private unflushedGrains = 0;
  private wroteData = false;
  /** Syncs started in the background as grains are written; the first error one met is reported by the next flush. */
  private readonly writeback = new BackgroundSync(() => this.handle.datasync().then(() => this.dropper?.synced()), () => VmdkSparseTarget.writebackBytes);
  /**
   * With pageCache 'drop-durable': drops the file's clean pages after every
   * sync. Grain tables stay in this object's own cache, so what is dropped
   * is grain data, read back only for pre-images and resync.
   */
  private readonly dropper: DurablePageDropper | undefined;
  /** True while flushLocked runs: its own grain-table writes start no background sync (see kickWriteback). */
  private flushing = false;
  /** Whether this session already gave the embedded descriptor a new CID. */
  private cidBumped = false;
  private closed = false;
  private tail: Promise<unknown> = Promise.resolve();
  /** Sector ranges [from, to) no grain or GT may overlap: header, descriptor, GD, RGD. */
  private readonly reserved: Array<[number, number]>;

  private constructor(
    readonly spec: string,
    private readonly file: string,
    private readonly handle: fsp.FileHandle,
    private header: SparseHeader,
    readonly descriptor: VmdkDescriptor | undefined,
    private readonly gd: Uint32Array,
    private readonly rgd: Uint32Array | undefined,
    fileSizeBytes: number,
    readOnly: boolean,
    private readonly claim: DiskUuidClaim | undefined,
    pageCache: PageCachePolicy,
  ) {
    this.dropper = pageCache === 'drop-durable' && !readOnly ? new DurablePageDropper(() => this.handle.fd) : undefined;
    this.sizeBytes = header.capacitySectors * SECTOR_BYTES;
    this.grainBytes = header.grainSectors * SECTOR_BYTES;
    this.gtSectors = gtSectors(header);
    this.zeroedGrainGte = (header.flags & FLAG_ZEROED_GRAIN_GTE) !== 0;
    this.compressed = (header.flags & FLAG_COMPRESSED_GRAINS) !== 0;
    const fileSectors = Math.floor(fileSizeBytes / SECTOR_BYTES);
    this.dataEndSector = fileSectors;
    this.nextGrainSector = Math.max(header.overheadSectors, Math.ceil(fileSizeBytes / this.grainBytes) * header.grainSectors);
    this.capabilities = { sparse: true, discard: false, alignmentBytes: SECTOR_BYTES, readOnly };
    this.diskUuid = fromVmwareUuid(descriptor?.ddb.get('ddb.uuid'));
    const dirSectors = Math.ceil((gd.length * GTE_BYTES) / SECTOR_BYTES);
    this.reserved = [[0, 1], [header.gdOffsetSectors, header.gdOffsetSectors + dirSectors]];
    if (header.descriptorOffsetSectors !== 0) this.reserved.push([header.descriptorOffsetSectors, header.descriptorOffsetSectors + header.descriptorSectors]);
    if (rgd !== undefined) this.reserved.push([header.rgdOffsetSectors, header.rgdOffsetSectors + dirSectors]);
  }

  /**
   * Writes a new, empty monolithicSparse image at `file` (which must not
   * exist) in the layout VMware and qemu use: header, descriptor (20
   * sectors), RGD and its GTs, GD and its GTs, grains from overHead on.
   */
  static async createImage(file: string, sizeBytes: number, diskUuid: string): Promise<void> {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SECTOR_BYTES !== 0 || sizeBytes / SECTOR_BYTES > MAX_CAPACITY_SECTORS) {
      throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `a sparse VMDK must be a positive multiple of 512 bytes below 2 TiB, not ${sizeBytes}`, { details: { file, sizeBytes } });
    }
    const capacitySectors = sizeBytes / SECTOR_BYTES;
    const layout = planSparseLayout(capacitySectors);
    const h = layout.header;
    const text = renderDescriptor({
      version: 1,
      cid: randomCid(),
      parentCid: NO_PARENT_CID,
      createType: 'monolithicSparse',
      parentFileNameHint: undefined,
      extents: [{ access: 'RW', sectors: capacitySectors, type: 'SPARSE', fileName: path.basename(file), offsetSectors: 0 }],
      ddb: defaultDdb(capacitySectors, diskUuid),
    });
    if (descriptorSectorsNeeded(text) > h.descriptorSectors) throw new BlockrelayError('BR_INTERNAL', `descriptor for ${file} does not fit its ${h.descriptorSectors} sectors`);
    const tables = gtCount(h);
    const dir = (firstGt: number): Buffer => {
      const b = Buffer.alloc(layout.gdSectors * SECTOR_BYTES);
      for (let i = 0; i < tables; i++) b.writeUInt32LE(firstGt + i * gtSectors(h), i * GTE_BYTES);
      return b;
    };
    let handle: fsp.FileHandle;
    try {
      handle = await fsp.open(file, 'wx');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${file} already exists`, { cause: err, details: { file } });
      }
      throw wrapError(err, 'BR_IO', `cannot create ${file}`);
    }
    try {
      await handle.write(encodeSparseHeader(h), 0, HEADER_BYTES, 0);
      await handle.write(Buffer.from(text, 'utf8'), 0, Buffer.byteLength(text), h.descriptorOffsetSectors * SECTOR_BYTES);
      const rgd = dir(layout.rgdFirstGtSector);
      await handle.write(rgd, 0, rgd.length, h.rgdOffsetSectors * SECTOR_BYTES);
      const gd = dir(layout.gdFirstGtSector);
      await handle.write(gd, 0, gd.length, h.gdOffsetSectors * SECTOR_BYTES);
      // The GTs themselves are all zeroes: the truncate leaves them as holes.
      await handle.truncate(h.overheadSectors * SECTOR_BYTES);
      await handle.datasync();
    } catch (err) {
      await handle.close();
      await fsp.rm(file, { force: true });
      throw wrapError(err, 'BR_IO', `cannot write new image ${file}`);
    } finally {
      await handle.close().catch(() => undefined);
    }
  }

  /** Reads the header and embedded descriptor only, for identity checks before opening. */
  static async probe(file: string): Promise<{ header: SparseHeader; descriptor: VmdkDescriptor | undefined }> {
    const handle = await openFile(file, 'r');
    try {
      const size = (await handle.stat()).size;
      const head = Buffer.alloc(HEADER_BYTES);
      await handle.read(head, 0, HEADER_BYTES, 0);
      const header = decodeSparseHeader(head, size, file);
      return { header, descriptor: await readEmbeddedDescriptor(handle, header, file) };
    } finally {
      await handle.close();
    }
  }

  /**
   * Opens an existing sparse extent. Validates the header, descriptor, both
   * directories and every grain table before the first request, so damage is
   * found at open as a coded error and never causes a write. Opening for
   * writing sets `uncleanShutdown`.
   */
  static async open(file: string, spec: string, readOnly: boolean, claim?: DiskUuidClaim, pageCache: PageCachePolicy = 'keep'): Promise<VmdkSparseTarget> {
    // Grain tables are used as host-order Uint32Arrays over little-endian bytes.
    if (os.endianness() !== 'LE') throw new BlockrelayError('BR_TARGET_UNSUPPORTED', 'sparse VMDK access needs a little-endian host');
    const handle = await openFile(file, readOnly ? 'r' : 'r+');
    try {
      const size = (await handle.stat()).size;
      const head = Buffer.alloc(HEADER_BYTES);
      await handle.read(head, 0, HEADER_BYTES, 0);
      let header = decodeSparseHeader(head, size, file);
      if (header.gdOffsetSectors === GD_OFFSET_AT_END) header = await readFooter(handle, size, file);
      if ((header.flags & FLAG_COMPRESSED_GRAINS) !== 0 && !readOnly) {
        throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${file} is a compressed streamOptimized VMDK, which blockrelay only reads; open it read-only or convert it`, { details: { file } });
      }
      const descriptor = await readEmbeddedDescriptor(handle, header, file);
      if (descriptor !== undefined && descriptor.parentCid !== NO_PARENT_CID) {
        throw new BlockrelayError('BR_TARGET_HAS_PARENT', `${file} is a snapshot child (parentCID ${descriptor.parentCid.toString(16)}); refusing it`, { details: { file } });
      }
      const tables = gtCount(header);
      const gd = await readDirectory(handle, header.gdOffsetSectors, tables);
      const rgd = (header.flags & FLAG_REDUNDANT_GRAIN_TABLE) !== 0 ? await readDirectory(handle, header.rgdOffsetSectors, tables) : undefined;
      const target = new VmdkSparseTarget(spec, file, handle, header, descriptor, gd, rgd, size, readOnly, claim, pageCache);
      await target.validateTables(header.uncleanShutdown);
      if (!readOnly) await target.writeHeader(true);
      return target;
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'read', offset, length);
    return this.exclusive(async () => {
      // Not zero-filled up front: on a written disk every byte is read
      // over anyway; unallocated grains are zeroed where they are.
      const out = Buffer.allocUnsafe(length);
      const pieces: Array<{ position: number; buffer: Buffer }> = [];
      for (const g of this.grainsOf(offset, length)) {
        const gte = await this.gte(g.index);
        if (!this.allocated(gte)) {
          out.fill(0, g.at - offset, g.at - offset + g.length);
          continue;
        }
        if (this.compressed) {
          const grain = await this.readCompressedGrain(g.index, gte);
          grain.copy(out, g.at - offset, g.inGrain, g.inGrain + g.length);
          continue;
        }
        pieces.push({ position: gte * SECTOR_BYTES + g.inGrain, buffer: out.subarray(g.at - offset, g.at - offset + g.length) });
      }
      for (const run of coalesce(pieces)) await this.readRun(run);
      return out;
    });
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'write', offset, data.length);
    return this.exclusive(async () => {
      const pieces: PositionedPiece[] = [];
      const updates = new Map<number, number>();
      await this.mapWrite(offset, data, pieces, updates);
      if (pieces.length > 0) await this.bumpCid();
      for (const run of coalesce(pieces)) await this.writeRun(run);
      await this.afterWrites(pieces, updates);
    });
  }

  /**
   * Writes every request, in order (a later one over an earlier one's bytes
   * wins), as `write` would one by one, but with all grain data written from
   * one thread-pool job (positioned-writes.ts): a span of a log's 64 KiB
   * writes cost one pool round trip each. GT entries change only after all
   * the batch's grain data is written, as for one write.
   */
  async writeMany(requests: ReadonlyArray<{ readonly offset: number; readonly data: Buffer }>): Promise<void> {
    checkOpen(this.closed, this.spec);
    for (const r of requests) checkRequest(this, 'write', r.offset, r.data.length);
    if (requests.length === 0) return;
    return this.exclusive(async () => {
      const pieces: PositionedPiece[] = [];
      const updates = new Map<number, number>();
      for (const r of requests) await this.mapWrite(r.offset, r.data, pieces, updates);
      if (pieces.length > 0) await this.bumpCid();
      let bytes = 0;
      for (const p of pieces) bytes += p.buffer.length;
      await this.io(() => writeAt(this.handle.fd, pieces), 'write');
      this.kickWriteback(bytes);
      await this.afterWrites(pieces, updates);
    });
  }

  /**
   * The file pieces that write `data` at `offset`, appended to `pieces`;
   * grains it allocates go to `updates` (grain index to sector), whose GT
   * entries the caller sets after writing. A grain an earlier request of
   * the same batch allocated is found there, not allocated twice.
   */
  private async mapWrite(offset: number, data: Buffer, pieces: PositionedPiece[], updates: Map<number, number>): Promise<void> {
    // The grains walked inline (no generator, no object per grain) and GT
    // entries looked up without an await when their table is in memory:
    // this runs for every grain of every log the master target applies.
    const grainBytes = this.grainBytes;
    const end = offset + data.length;
    for (let at = offset; at < end; ) {
      const index = Math.floor(at / grainBytes);
      const inGrain = at - index * grainBytes;
      const n = Math.min(grainBytes - inGrain, end - at);
      const piece = data.subarray(at - offset, at - offset + n);
      at += n;
      const gte = updates.get(index) ?? this.gteNow(index) ?? (await this.gte(index));
      if (this.allocated(gte)) {
        pieces.push({ position: gte * SECTOR_BYTES + inGrain, buffer: piece });
        continue;
      }
      // Zeroes into an unallocated or zeroed grain change nothing a
      // reader sees; keeping the grain unallocated keeps the disk sparse.
      if (isAllZero(piece)) continue;
      let grain = piece;
      if (piece.length !== grainBytes) {
        grain = Buffer.alloc(grainBytes);
        piece.copy(grain, inGrain);
      }
      const sector = this.nextGrainSector;
      this.nextGrainSector += this.header.grainSectors;
      pieces.push({ position: sector * SECTOR_BYTES, buffer: grain });
      updates.set(index, sector);
    }
  }

  /** After a write's grain data is written: its GT entries (see class doc), counters, and a flush when enough grains wait for one. */
  private async afterWrites(pieces: readonly PositionedPiece[], updates: ReadonlyMap<number, number>): Promise<void> {
    for (const [index, sector] of updates) if (!this.setGteNow(index, sector)) await this.setGte(index, sector);
    this.dataEndSector = Math.max(this.dataEndSector, this.nextGrainSector);
    this.unflushedGrains += updates.size;
    this.wroteData ||= pieces.length > 0;
    if (this.unflushedGrains >= MAX_UNFLUSHED_GRAINS) await this.flushLocked();
  }

  /**
   * Reads every request into its own buffer: unallocated grains are zero
   * filled, the rest read sorted by file position, in BATCH_IO_CONCURRENCY
   * thread-pool jobs at once (`readAt`: adjacent ones in one preadv).
   * Resolves, per
   * request, whether no grain of it holds data.
   */
  async readMany(requests: readonly DiskReadRequest[]): Promise<boolean[]> {
    checkOpen(this.closed, this.spec);
    for (const r of requests) checkRequest(this, 'read', r.offset, r.buffer.length);
    return this.exclusive(async () => {
      const zero: boolean[] = [];
      const pieces: Array<{ position: number; buffer: Buffer }> = [];
      const grainBytes = this.grainBytes;
      for (const { offset, buffer } of requests) {
        let none = true;
        // Grains walked inline, GT entries without an await when in memory (as mapWrite).
        const end = offset + buffer.length;
        for (let at = offset; at < end; ) {
          const index = Math.floor(at / grainBytes);
          const inGrain = at - index * grainBytes;
          const n = Math.min(grainBytes - inGrain, end - at);
          const into = buffer.subarray(at - offset, at - offset + n);
          at += n;
          const gte = this.gteNow(index) ?? (await this.gte(index));
          if (!this.allocated(gte)) {
            into.fill(0);
            continue;
          }
          none = false;
          if (this.compressed) {
            const grain = await this.readCompressedGrain(index, gte);
            grain.copy(into, 0, inGrain, inGrain + n);
            continue;
          }
          pieces.push({ position: gte * SECTOR_BYTES + inGrain, buffer: into });
        }
        zero.push(none);
      }
      pieces.sort(byPosition);
      // One thread-pool job per share of the pieces (readAt), not one per
      // run: a log's pre-images are thousands of scattered 64 KiB grains.
      // BATCH_IO_CONCURRENCY shares keep that many reads before the device.
      const share = Math.ceil(pieces.length / BATCH_IO_CONCURRENCY);
      const shares: Array<typeof pieces> = [];
      for (let i = 0; i < pieces.length; i += share) shares.push(pieces.slice(i, i + share));
      await inParallel(shares, BATCH_IO_CONCURRENCY, (part) => this.readPieces(part));
      return zero;
    });
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'writeZeroes', offset, length);
    return this.exclusive(() => this.zeroLocked(offset, length));
  }

  /** Frees nothing (VMDK has no way to return a grain), but the range reads as zeroes afterwards. */
  async discard(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'discard', offset, length);
    return this.exclusive(() => this.zeroLocked(offset, length));
  }

  async flush(): Promise<void> {
    checkOpen(this.closed, this.spec);
    return this.exclusive(() => this.flushLocked());
  }

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'extents', offset, length);
    // Walked one grain table at a time, so a mostly empty 2 TiB disk takes
    // one await per 32 MiB instead of one per grain.
    let pending: { offset: number; length: number; zero: boolean } | undefined;
    const end = offset + length;
    const tableBytes = this.grainBytes * this.header.gtesPerGt;
    for (let at = offset; at < end; ) {
      const gtIndex = Math.floor(at / tableBytes);
      const tableEnd = Math.min(end, (gtIndex + 1) * tableBytes);
      const table = await this.table(gtIndex);
      const runs: Array<{ offset: number; length: number; zero: boolean }> = [];
      if (table === undefined) {
        runs.push({ offset: at, length: tableEnd - at, zero: true });
      } else {
        const gtes = this.header.gtesPerGt;
        const firstGrain = Math.floor(at / this.grainBytes);
        const lastGrain = Math.floor((tableEnd - 1) / this.grainBytes);
        let runStart = at;
        let runZero = !this.allocated(table[firstGrain % gtes]!);
        for (let gi = firstGrain + 1; gi <= lastGrain; gi++) {
          const zero = !this.allocated(table[gi % gtes]!);
          if (zero === runZero) continue;
          runs.push({ offset: runStart, length: gi * this.grainBytes - runStart, zero: runZero });
          runStart = gi * this.grainBytes;
          runZero = zero;
        }
        runs.push({ offset: runStart, length: tableEnd - runStart, zero: runZero });
      }
      for (const run of runs) {
        if (pending !== undefined && pending.zero === run.zero) {
          pending.length += run.length;
          continue;
        }
        if (pending !== undefined) yield pending;
        pending = run;
      }
      at = tableEnd;
    }
    if (pending !== undefined) yield pending;
  }

  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    return this.exclusive(async () => {
      try {
        if (!this.capabilities.readOnly) {
          await this.flushLocked();
          await this.writeHeader(false);
          await this.io(() => this.handle.datasync(), 'sync');
        }
      } finally {
        this.claim?.release();
        await this.writeback.idle();
        // After the background sync (whose end may start a drop): the drop's descriptor must stay open under it.
        await this.dropper?.close();
        await this.handle.close();
      }
    });
  }

  // --- internals ---

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(fn, fn);
    this.tail = run.catch(() => undefined);
    return run;
  }

  private *grainsOf(offset: number, length: number): Generator<{ index: number; at: number; inGrain: number; length: number }> {
    const end = offset + length;
    for (let at = offset; at < end; ) {
      const index = Math.floor(at / this.grainBytes);
      const inGrain = at - index * this.grainBytes;
      const n = Math.min(this.grainBytes - inGrain, end - at);
      yield { index, at, inGrain, length: n };
      at += n;
    }
  }

  private allocated(gte: number): boolean {
    return gte !== GTE_UNALLOCATED && !(gte === GTE_ZEROED && this.zeroedGrainGte);
  }

  private async zeroLocked(offset: number, length: number): Promise<void> {
    const pieces: Array<{ position: number; buffer: Buffer }> = [];
    for (const g of this.grainsOf(offset, length)) {
      const gte = await this.gte(g.index);
      if (!this.allocated(gte)) continue;
      if (g.length === this.grainBytes && this.zeroedGrainGte) {
        await this.setGte(g.index, GTE_ZEROED);
        continue;
      }
      pieces.push({ position: gte * SECTOR_BYTES + g.inGrain, buffer: ZEROES.subarray(0, g.length) });
    }
    if (pieces.length > 0 || this.dirty.size > 0) await this.bumpCid();
    for (const run of coalesce(pieces)) await this.writeRun(run);
    this.wroteData ||= pieces.length > 0;
  }

  /**
   * Starts a sync in the background once WRITEBACK_BYTES were written since
   * the last one. The kernel otherwise keeps a whole log's writes dirty
   * until `flush()`, whose sync then waits for the device to write all of
   * them; started early, the device writes while the apply goes on. It
   * changes no crash order: grain tables and directories are written only
   * by `flush()`, after its own sync. An error is kept for the next flush
   * (a failed sync may have dropped the dirty pages it failed to write, so
   * a later sync's success would hide it).
   *
   * None starts while a flush runs: a background sync beside the flush's
   * own could be the one the kernel reports a write error to (it reports
   * each once per file), and the flush would then answer success for
   * grain tables that never reached the disk.
   */
  private kickWriteback(bytes: number): void {
    this.writeback.wrote(bytes, !this.flushing);
  }

  private async flushLocked(): Promise<void> {
    if (this.capabilities.readOnly) return;
    this.flushing = true;
    try {
      await this.flushWithoutWriteback();
    } finally {
      this.flushing = false;
    }
  }

  private async flushWithoutWriteback(): Promise<void> {
    await this.writeback.settle().catch((err: unknown) => {
      throw wrapError(err, 'BR_IO', `sync on ${this.file} failed`);
    });
    if (this.dirty.size === 0 && !this.gdDirty) {
      if (this.wroteData) {
        await this.io(() => this.handle.datasync(), 'sync');
        this.dropper?.synced();
      }
      this.wroteData = false;
      return;
    }
    // 1. grains durable before anything points at them
    await this.io(() => this.handle.datasync(), 'sync');
    // 2. grain tables and their redundant copies. No sync orders them (the
    // next one covers all), so they go out sorted, neighbours in one
    // writev: GTs lie back to back in both copies, and a fresh disk's first
    // flush dirties hundreds.
    const gtBytes = this.gtSectors * SECTOR_BYTES;
    const tables: Array<{ position: number; buffer: Buffer }> = [];
    for (const [index, table] of this.dirty) {
      const bytes = Buffer.from(table.buffer, table.byteOffset, gtBytes);
      tables.push({ position: this.gd[index]! * SECTOR_BYTES, buffer: bytes });
      if (this.rgd !== undefined) tables.push({ position: this.rgd[index]! * SECTOR_BYTES, buffer: bytes });
    }
    tables.sort(byPosition);
    for (const run of coalesce(tables)) await this.writeRun(run);
    // 3. directories only once the GTs they point at are durable
    if (this.gdDirty) {
      await this.io(() => this.handle.datasync(), 'sync');
      const dir = (d: Uint32Array): Buffer => Buffer.from(d.buffer, d.byteOffset, d.length * GTE_BYTES);
      await this.io(() => this.handle.write(dir(this.gd), 0, this.gd.length * GTE_BYTES, this.header.gdOffsetSectors * SECTOR_BYTES), 'write grain directory');
      if (this.rgd !== undefined) await this.io(() => this.handle.write(dir(this.rgd!), 0, this.rgd!.length * GTE_BYTES, this.header.rgdOffsetSectors * SECTOR_BYTES), 'write redundant grain directory');
    }
    await this.io(() => this.handle.datasync(), 'sync');
    this.dropper?.synced();
    this.dirty.clear();
    this.gdDirty = false;
    this.unflushedGrains = 0;
    this.wroteData = false;
  }

  /**
   * Gives the embedded descriptor a new CID on the first change of content
   * in this session, as VMware does. Only the CID line changes; the text
   * keeps its reserved sectors. Images without an embedded descriptor (the
   * extents of a split disk) have their CID in the text file instead.
   */
  private async bumpCid(): Promise<void> {
    if (this.cidBumped || this.descriptor === undefined || this.header.descriptorOffsetSectors === 0) return;
    this.cidBumped = true;
    const region = Buffer.alloc(this.header.descriptorSectors * SECTOR_BYTES);
    const position = this.header.descriptorOffsetSectors * SECTOR_BYTES;
    await this.io(() => this.handle.read(region, 0, region.length, position), 'read descriptor');
    const nul = region.indexOf(0);
    const updated = replaceCid(region.subarray(0, nul < 0 ? region.length : nul).toString('latin1'), newCid(this.descriptor.cid));
    if (updated === undefined || Buffer.byteLength(updated, 'latin1') > region.length) return;
    const out = Buffer.alloc(region.length);
    out.write(updated, 0, 'latin1');
    await this.io(() => this.handle.write(out, 0, out.length, position), 'write descriptor');
  }

  private async writeHeader(unclean: boolean): Promise<void> {
    this.header = { ...this.header, uncleanShutdown: unclean };
    const byte = Buffer.from([unclean ? 1 : 0]);
    // Only the flag byte changes: the rest of a foreign header stays as its tool wrote it.
    await this.io(() => this.handle.write(byte, 0, 1, HDR.uncleanShutdown), 'write header');
    await this.io(() => this.handle.datasync(), 'sync');
  }

  /** The GT entry of grain `index` (0 when its GT is not allocated). */
  private async gte(index: number): Promise<number> {
    const table = await this.table(Math.floor(index / this.header.gtesPerGt));
    return table === undefined ? GTE_UNALLOCATED : table[index % this.header.gtesPerGt]!;
  }

  /** The GT entry of grain `index` when its table is in memory or unallocated (no await), else undefined. */
  private gteNow(index: number): number | undefined {
    const table = this.table(Math.floor(index / this.header.gtesPerGt));
    if (table instanceof Promise) return undefined;
    return table === undefined ? GTE_UNALLOCATED : table[index % this.header.gtesPerGt]!;
  }

  /** `setGte` without an await when the grain's table is in memory; false (nothing done) when it must be loaded. */
  private setGteNow(index: number, value: number): boolean {
    const gtIndex = Math.floor(index / this.header.gtesPerGt);
    const table = this.table(gtIndex);
    if (table === undefined || table instanceof Promise) return false;
    table[index % this.header.gtesPerGt] = value;
    this.dirty.set(gtIndex, table);
    return true;
  }

  private async setGte(index: number, value: number): Promise<void> {
    const gtIndex = Math.floor(index / this.header.gtesPerGt);
    let table = await this.table(gtIndex);
    if (table === undefined) table = this.allocateTable(gtIndex);
    table[index % this.header.gtesPerGt] = value;
    this.dirty.set(gtIndex, table);
  }

  /**
   * A GT the directory does not point at yet (foreign images may leave GTs
   * unallocated): room for it and its redundant copy is taken from the end
   * of the file as one grain, and the directories are written at flush.
   */
  private allocateTable(gtIndex: number): Uint32Array {
    const sector = this.nextGrainSector;
    this.nextGrainSector += this.header.grainSectors;
    this.dataEndSector = Math.max(this.dataEndSector, this.nextGrainSector);
    this.gd[gtIndex] = sector;
    if (this.rgd !== undefined) this.rgd[gtIndex] = sector + this.gtSectors;
    this.gdDirty = true;
    const table = new Uint32Array((this.gtSectors * SECTOR_BYTES) / GTE_BYTES);
    this.cache.set(gtIndex, table);
    this.dirty.set(gtIndex, table);
    return table;
  }

  private table(gtIndex: number): Promise<Uint32Array | undefined> | Uint32Array | undefined {
    const dirty = this.dirty.get(gtIndex);
    if (dirty !== undefined) return dirty;
    const cached = this.cache.get(gtIndex);
    if (cached !== undefined) return cached;
    if (this.gd[gtIndex] === 0) return undefined;
    let load = this.loading.get(gtIndex);
    if (load === undefined) {
      load = this.loadTable(this.gd[gtIndex]!).then((t) => {
        this.loading.delete(gtIndex);
        this.remember(gtIndex, t);
        return t;
      }, (err) => {
        this.loading.delete(gtIndex);
        throw err;
      });
      this.loading.set(gtIndex, load);
    }
    return load;
  }

  private remember(gtIndex: number, table: Uint32Array): void {
    this.cache.set(gtIndex, table);
    if (this.cache.size <= MAX_CACHED_GTS) return;
    for (const key of this.cache.keys()) {
      if (!this.dirty.has(key)) {
        this.cache.delete(key);
        break;
      }
    }
  }

  private async loadTable(sector: number): Promise<Uint32Array> {
    const bytes = Buffer.alloc(this.gtSectors * SECTOR_BYTES);
    const { bytesRead } = await this.io(() => this.handle.read(bytes, 0, bytes.length, sector * SECTOR_BYTES), 'read grain table');
    if (bytesRead !== bytes.length) throw corrupt(this.file, sector * SECTOR_BYTES, 'grain table is cut off by the end of the file');
    const table = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length / GTE_BYTES).slice();
    this.checkTable(table, sector * SECTOR_BYTES);
    return table;
  }

  /**
   * A compressed grain: a marker (uint64 lba, uint32 size) then a zlib
   * stream that inflates to at most one grain. The marker's lba must be the
   * grain's own, and the stream must end inside the file.
   */
  private async readCompressedGrain(index: number, sector: number): Promise<Buffer> {
    const position = sector * SECTOR_BYTES;
    const marker = Buffer.alloc(GRAIN_MARKER_BYTES);
    const { bytesRead } = await this.io(() => this.handle.read(marker, 0, GRAIN_MARKER_BYTES, position), 'read grain marker');
    if (bytesRead !== GRAIN_MARKER_BYTES) throw corrupt(this.file, position, 'grain marker is cut off by the end of the file');
    const lba = marker.readBigUInt64LE(0);
    const size = marker.readUInt32LE(8);
    if (lba !== BigInt(index * this.header.grainSectors)) throw corrupt(this.file, position, `grain marker names sector ${lba}, expected ${index * this.header.grainSectors}`);
    // Deflate can grow incompressible data only slightly; anything larger is damage.
    if (size === 0 || size > this.grainBytes + 4096) throw corrupt(this.file, position + 8, `compressed grain size ${size} is out of range`);
    const data = Buffer.alloc(size);
    const got = await this.io(() => this.handle.read(data, 0, size, position + GRAIN_MARKER_BYTES), 'read compressed grain');
    if (got.bytesRead !== size) throw corrupt(this.file, position, 'compressed grain is cut off by the end of the file');
    let grain: Buffer;
    try {
      grain = zlib.inflateSync(data, { maxOutputLength: this.grainBytes });
    } catch (err) {
      throw new BlockrelayError('BR_TARGET_CORRUPT', `${this.file}: compressed grain does not inflate (byte offset ${position + GRAIN_MARKER_BYTES})`, { cause: err, details: { file: this.file, byteOffset: position + GRAIN_MARKER_BYTES } });
    }
    if (grain.length === this.grainBytes) return grain;
    // The last grain of a disk whose size is not a whole number of grains may be short.
    const full = Buffer.alloc(this.grainBytes);
    grain.copy(full);
    return full;
  }

  /** Every entry is unallocated, zeroed (when the flag allows), or a whole grain (compressed: a grain marker) between overHead and the end of the file. */
  /** True when the grain at sector `v` overlaps a reserved metadata run (a loop, not a closure per GT entry). */
  private overlapsReserved(v: number): boolean {
    const end = v + this.header.grainSectors;
    for (const run of this.reserved) if (v < run[1] && end > run[0]) return true;
    return false;
  }

  private checkTable(table: Uint32Array, byteOffset: number): void {
    const limit = this.dataEndSector - (this.compressed ? 1 : this.header.grainSectors);
    for (let i = 0; i < this.header.gtesPerGt; i++) {
      const v = table[i]!;
      if (v === GTE_UNALLOCATED || (v === GTE_ZEROED && this.zeroedGrainGte)) continue;
      if (v < this.header.overheadSectors || v > limit || this.overlapsReserved(v)) {
        throw corrupt(this.file, byteOffset + i * GTE_BYTES, `grain table entry ${v} points ${v > limit ? 'past the end of the file' : 'into the metadata'}`);
      }
    }
  }

  /**
   * Reads every GT of the directory (in runs of up to 1 MiB) and validates
   * it; for an image found unclean also reads the redundant copies and
   * compares. A differing redundant GT is rewritten from the primary when
   * the image is open for writing.
   */
  private async validateTables(unclean: boolean): Promise<void> {
    const fileSectors = this.dataEndSector;
    const gtBytes = this.gtSectors * SECTOR_BYTES;
    // A GT may not overlap the header, the descriptor or either directory:
    // flush writes GTs where the directories say, and must never land there.
    const h = this.header;
    const reserved = this.reserved;
    const checkDir = (dir: Uint32Array, at: number): void => {
      for (let i = 0; i < dir.length; i++) {
        const v = dir[i]!;
        if (v === 0) continue;
        const where = at * SECTOR_BYTES + i * GTE_BYTES;
        if (v + this.gtSectors > fileSectors) throw corrupt(this.file, where, `grain directory entry ${v} points past the end of the file`);
        if (reserved.some(([from, to]) => v < to && v + this.gtSectors > from)) throw corrupt(this.file, where, `grain directory entry ${v} points into the header, descriptor or a directory`);
      }
    };
    checkDir(this.gd, h.gdOffsetSectors);
    if (this.rgd !== undefined) {
      checkDir(this.rgd, h.rgdOffsetSectors);
      for (let i = 0; i < this.gd.length; i++) {
        if ((this.gd[i] === 0) !== (this.rgd[i] === 0)) throw corrupt(this.file, h.rgdOffsetSectors * SECTOR_BYTES + i * GTE_BYTES, 'grain directory and redundant grain directory disagree about an allocated table');
      }
    }
    const scan = async (dir: Uint32Array, visit: (index: number, table: Uint32Array) => void): Promise<void> => {
      for (let i = 0; i < dir.length; ) {
        if (dir[i] === 0) {
          i++;
          continue;
        }
        let n = 1;
        while (i + n < dir.length && dir[i + n] === dir[i]! + n * this.gtSectors && (n + 1) * gtBytes <= TABLE_SCAN_BYTES) n++;
        const bytes = Buffer.alloc(n * gtBytes);
        await this.io(() => this.handle.read(bytes, 0, bytes.length, dir[i]! * SECTOR_BYTES), 'read grain tables');
        for (let k = 0; k < n; k++) {
          const table = new Uint32Array(bytes.buffer, bytes.byteOffset + k * gtBytes, gtBytes / GTE_BYTES).slice();
          this.checkTable(table, dir[i + k]! * SECTOR_BYTES);
          visit(i + k, table);
        }
        i += n;
      }
    };
    const primary = new Map<number, Uint32Array>();
    await scan(this.gd, (index, table) => {
      if (unclean) primary.set(index, table);
      else if (this.cache.size < MAX_CACHED_GTS) this.cache.set(index, table);
    });
    if (!unclean || this.rgd === undefined) return;
    await scan(this.rgd, (index, table) => {
      const main = primary.get(index)!;
      const same = table.every((v, k) => v === main[k]);
      if (!same && !this.capabilities.readOnly) this.dirty.set(index, main);
    });
    for (const [index, table] of primary) if (this.cache.size < MAX_CACHED_GTS || this.dirty.has(index)) this.cache.set(index, table);
    if (this.dirty.size > 0) await this.flushLocked();
  }

  private async readRun(run: FileRun): Promise<void> {
    let position = run.position;
    let buffers = run.buffers;
    while (buffers.length > 0) {
      const { bytesRead } = await this.io(() => this.handle.readv(buffers, position), 'read');
      if (bytesRead === 0) throw corrupt(this.file, position, 'grain data is cut off by the end of the file');
      position += bytesRead;
      buffers = buffersAfter(buffers, bytesRead);
    }
  }

  /** Reads every piece whole from one pool job; the end of the file before a piece's end is damage. */
  private async readPieces(pieces: readonly PositionedPiece[]): Promise<void> {
    try {
      await readAt(this.handle.fd, pieces);
    } catch (err) {
      const e = err as Partial<PositionedIoError>;
      if (e.code === 'EOF') throw corrupt(this.file, e.position ?? 0, 'grain data is cut off by the end of the file');
      throw wrapError(err, 'BR_IO', `read on ${this.file} failed`);
    }
  }

  private async writeRun(run: FileRun): Promise<void> {
    await this.io(() => writevAll(this.handle, run.buffers, run.position), 'write');
    this.kickWriteback(run.bytes);
  }

  private async io<T>(op: () => Promise<T>, what: string): Promise<T> {
    try {
      return await op();
    } catch (err) {
      throw wrapError(err, 'BR_IO', `${what} on ${this.file} failed`);
    }
  }
}

/**
 * File order of pieces: -1/0/1, not a difference (positions past 2 GiB
 * subtract to a heap number, an allocation per comparison).
 */
function byPosition(a: { readonly position: number }, b: { readonly position: number }): number {
  return a.position < b.position ? -1 : a.position > b.position ? 1 : 0;
}

async function openFile(file: string, flags: string): Promise<fsp.FileHandle> {
  try {
    return await fsp.open(file, flags);
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot open ${file}`);
  }
}

/**
 * The footer of a streamOptimized image written with the GD at the end: a
 * footer marker sector, then a header copy holding the real gdOffset, then
 * the end-of-stream marker.
 */
async function readFooter(handle: fsp.FileHandle, size: number, file: string): Promise<SparseHeader> {
  if (size < FOOTER_MARKER_FROM_END + HEADER_BYTES) throw corrupt(file, 0, 'stream image is too short to hold its footer');
  const tail = Buffer.alloc(FOOTER_MARKER_FROM_END);
  await handle.read(tail, 0, tail.length, size - FOOTER_MARKER_FROM_END);
  const markerAt = size - FOOTER_MARKER_FROM_END;
  if (tail.readUInt32LE(8) !== 0 || tail.readUInt32LE(12) !== MARKER_FOOTER) throw corrupt(file, markerAt, 'footer marker is missing');
  const footer = tail.subarray(FOOTER_MARKER_FROM_END - FOOTER_FROM_END, FOOTER_MARKER_FROM_END - FOOTER_FROM_END + HEADER_BYTES);
  if (footer.readUInt32LE(0) !== SPARSE_MAGIC) throw corrupt(file, size - FOOTER_FROM_END, 'footer has a bad magic');
  try {
    return decodeSparseHeader(footer, size, file, { allowGdAtEnd: false });
  } catch (err) {
    const e = err as BlockrelayError;
    if (e.code !== 'BR_TARGET_CORRUPT' || typeof e.details.byteOffset !== 'number') throw err;
    // Re-anchor the offset from the footer copy to the file.
    throw corrupt(file, size - FOOTER_FROM_END + e.details.byteOffset, e.message.replace(/ \(byte offset \d+\)$/, '').replace(`${file}: `, 'footer: '));
  }
}

async function readDirectory(handle: fsp.FileHandle, sector: number, entries: number): Promise<Uint32Array> {
  const bytes = Buffer.alloc(entries * GTE_BYTES);
  await handle.read(bytes, 0, bytes.length, sector * SECTOR_BYTES);
  return new Uint32Array(bytes.buffer, bytes.byteOffset, entries).slice();
}

async function readEmbeddedDescriptor(handle: fsp.FileHandle, header: SparseHeader, file: string): Promise<VmdkDescriptor | undefined> {
  if (header.descriptorOffsetSectors === 0) return undefined;
  const bytes = Buffer.alloc(header.descriptorSectors * SECTOR_BYTES);
  await handle.read(bytes, 0, bytes.length, header.descriptorOffsetSectors * SECTOR_BYTES);
  // The extents of a split disk reserve descriptor space but leave it empty:
  // their descriptor is the separate text file.
  if (bytes[0] === 0) return undefined;
  return parseDescriptor(bytes, file, header.descriptorOffsetSectors * SECTOR_BYTES);
}
