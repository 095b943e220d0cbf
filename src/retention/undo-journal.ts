import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import type { DiskTarget, Extent } from '../targets/disk-target';
import { HRL_DEFAULT_METADATA_SIZE, HRL_HEADER_SIZE, HRL_METADATA_ENTRY_SIZE, HRL_METADATA_HEADER_SIZE, hrlEntriesPerBlock } from '../tracking/hrl-format';
import { HrlLogFile, verifyHrlLog, type HrlVerifiedLog } from '../tracking/hrl-reader';
import { HrlWriter, HRL_WRITER_DEFAULTS, type HrlWriterFile } from '../tracking/hrl-writer';
import { syncDirectory } from '../platform/durable-file';
import { RETENTION_LAYOUT, seqOfUndoFile, undoFileName } from './retention-format';
import { writevAll } from '../platform/io-vectors';
import { BackgroundSync } from '../platform/background-sync';
import { dropFileCache } from '../platform/page-cache';

/** Pre-images are read from the target in pieces of at most this many bytes (bounds memory). */
export const UNDO_READ_CHUNK_BYTES = 1024 * 1024;

let zeroChunk: Buffer | undefined;

/**
 * The bytes a file occupies on its volume: its allocated blocks (st_blocks,
 * counted in 512-byte units whatever the file system's block size), not its
 * length. A segment whose zero pre-images are holes (see
 * `SparseSegmentFile`) is much longer than what it takes; the retention
 * bound and the usage report count what it takes, so the history a volume
 * holds is not cut short by bytes that are not there.
 */
export function allocatedBytesOf(stat: { blocks: number }): number {
  return stat.blocks * 512;
}

/**
 * The target's content of `[offset, offset + length)` (at most
 * UNDO_READ_CHUNK_BYTES) before a log overwrites it. A range the target
 * reports as reading zero without data stored (a grain never written, a
 * hole) is not read: a shared zero buffer stands for it. On a fresh target
 * that is most of every pre-image, and each read would have filled a new
 * buffer with zeroes.
 */
async function readPreImage(target: DiskTarget, offset: number, length: number): Promise<Buffer> {
  let zero = true;
  for await (const extent of target.extents(offset, length)) {
    if (!extent.zero) {
      zero = false;
      break;
    }
  }
  if (!zero) return target.read(offset, length);
  zeroChunk ??= Buffer.alloc(UNDO_READ_CHUNK_BYTES);
  return zeroChunk.subarray(0, length);
}

/** Bytes written to a segment after which a sync starts in the background (see `SparseSegmentFile`). */
const SEGMENT_WRITEBACK_BYTES = 32 * 1024 * 1024;
/** Granularity of the holes a segment's zero payloads become. */
const HOLE_PAGE_BYTES = 4096;
const ZERO_PAGE = Buffer.alloc(HOLE_PAGE_BYTES);

/**
 * The file HrlWriter writes a segment through: a new file in which bytes
 * that would be written as zeroes where nothing was written before are not
 * written at all, so they stay holes (reading as zeroes, taking no space).
 * Pre-images of never-written grains are all zeroes: on a fresh target
 * that is most of every segment, and writing it cost the volume as many
 * bytes as the log itself. Skipping is decided per 4 KiB page of the file
 * (a piece of one at the ends of a write), and only over bytes no earlier
 * write touched, so what the file reads is exactly what was written. The
 * file is extended to the end of the furthest write before each sync.
 *
 * Every write goes on until all its bytes are written or the system call
 * fails (a short write is retried, ENOSPC comes back as an error), so the
 * payloads need no read-back (see `checkWritten`).
 *
 * Every SEGMENT_WRITEBACK_BYTES a sync starts in the background, so the
 * device writes the segment while the pre-images are still being read and
 * the seal's sync finds little left to do; its error, if any, is thrown by
 * the next `datasync()` (a later sync's success would hide it).
 *
 * After every sync (background or `datasync()`) the file's pages are
 * dropped from the page cache (`dropFileCache`): a segment is written once
 * and read only at failover, export, rollback or a resync slot's end, so
 * keeping it cached only grew the cache by the log's size per log, each new
 * page a host fault on this VM (free page reporting), and pushed out the
 * target's pages that the next pre-image reads want. Synced pages are
 * clean and freed at once; pages written after the sync began are dirty
 * and stay until the next one. Readers are unaffected (they read the
 * device). The drop never comes before the sync that makes the bytes
 * durable, so crash safety is as before.
 */
export class SparseSegmentFile implements HrlWriterFile {
  /** Byte ranges written so far: sorted, disjoint, touching ones merged. */
  private readonly written: Array<[number, number]> = [];
  private endBytes = 0;
  private fileBytes = 0;
  /** Bytes left as holes so far. */
  holeBytes = 0;
  private readonly writeback = new BackgroundSync(() => this.syncAndDropCache(), () => SEGMENT_WRITEBACK_BYTES);

  private constructor(private readonly fh: fsp.FileHandle) {}

  static async create(file: string): Promise<SparseSegmentFile> {
    return new SparseSegmentFile(await fsp.open(file, 'wx+'));
  }

  write(buffer: Buffer, offset: number, length: number, position: number): Promise<void> {
    return this.writev([buffer.subarray(offset, offset + length)], position);
  }

  async writev(buffers: Buffer[], position: number): Promise<void> {
    const runs: Array<{ position: number; buffers: Buffer[]; bytes: number }> = [];
    let at = position;
    /** Appends `buffer[from, to)`, to be written at file offset `where`, to the runs. */
    const keep = (buffer: Buffer, from: number, to: number, where: number): void => {
      if (to <= from) return;
      const last = runs[runs.length - 1];
      if (last !== undefined && last.position + last.bytes === where && last.buffers.length < 512) {
        last.buffers.push(buffer.subarray(from, to));
        last.bytes += to - from;
      } else {
        runs.push({ position: where, buffers: [buffer.subarray(from, to)], bytes: to - from });
      }
    };
    for (const buffer of buffers) {
      // Pages kept in a row stay one piece of the buffer: [keptFrom, i).
      let keptFrom = 0;
      const bufferAt = at;
      for (let i = 0; i < buffer.length; ) {
        const pageEnd = (Math.floor(at / HOLE_PAGE_BYTES) + 1) * HOLE_PAGE_BYTES;
        const n = Math.min(buffer.length - i, pageEnd - at);
        // Data pages differ from zeroes within their first bytes, so the compare is short for them.
        if (buffer.compare(ZERO_PAGE, 0, n, i, i + n) === 0 && !this.touches(at, at + n)) {
          keep(buffer, keptFrom, i, bufferAt + keptFrom);
          keptFrom = i + n;
          this.holeBytes += n;
        }
        at += n;
        i += n;
      }
      keep(buffer, keptFrom, buffer.length, bufferAt + keptFrom);
    }
    let writtenBytes = 0;
    for (const run of runs) {
      const where = await writevAll(this.fh, run.buffers, run.position);
      this.record(run.position, where);
      this.fileBytes = Math.max(this.fileBytes, where);
      writtenBytes += run.bytes;
    }
    this.endBytes = Math.max(this.endBytes, at);
    this.writeback.wrote(writtenBytes);
  }

  async datasync(): Promise<void> {
    await this.writeback.settle();
    if (this.fileBytes < this.endBytes) {
      await this.fh.truncate(this.endBytes);
      this.fileBytes = this.endBytes;
    }
    await this.syncAndDropCache();
  }

  /** fdatasync, then drop what it made durable from the page cache (the class comment). */
  private async syncAndDropCache(): Promise<void> {
    const synced = this.endBytes;
    await this.fh.datasync();
    this.dropCache(synced);
  }

  /**
   * Drops the file's clean pages from the page cache (see the class
   * comment). Advisory: a refusal leaves them cached, costing memory, not
   * data, so it is not an error.
   */
  private dropCache(syncedBytes: number): void {
    // Only what the sync just made durable: pages written since are dirty,
    // and advising them away would start their writeback early. A throw
    // here (a closed handle) must not turn the sync that succeeded into a
    // failure: the drop is advice.
    if (syncedBytes <= 0) return;
    try {
      dropFileCache(this.fh.fd, 0, syncedBytes);
    } catch {
      // Kept cached: costs memory, not data.
    }
  }

  async close(): Promise<void> {
    await this.writeback.idle();
    await this.fh.close();
  }

  /** Whether `[from, to)` overlaps a written range (binary search: ranges are sorted). */
  private touches(from: number, to: number): boolean {
    let lo = 0;
    let hi = this.written.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.written[mid]![1] <= from) lo = mid + 1;
      else hi = mid;
    }
    const r = this.written[lo];
    return r !== undefined && r[0] < to;
  }

  private record(from: number, to: number): void {
    let i = 0;
    while (i < this.written.length && this.written[i]![1] < from) i++;
    let start = from;
    let end = to;
    let j = i;
    while (j < this.written.length && this.written[j]![0] <= end) {
      start = Math.min(start, this.written[j]![0]);
      end = Math.max(end, this.written[j]![1]);
      j++;
    }
    this.written.splice(i, j - i, [start, end]);
  }
}

/** The pre-images of `extents`, one target read per piece of at most UNDO_READ_CHUNK_BYTES. */
async function appendPreImages(writer: HrlWriter, extents: readonly Extent[], target: DiskTarget): Promise<void> {
  for (const e of extents) {
    for (let done = 0; done < e.length; ) {
      const n = Math.min(UNDO_READ_CHUNK_BYTES, e.length - done);
      const old = await readPreImage(target, e.offset + done, n);
      if (old.length !== n) throw new BlockrelayError('BR_INTERNAL', `target ${target.spec} returned ${old.length} bytes for a ${n}-byte read`);
      await writer.append(e.offset + done, old);
      done += n;
    }
  }
}

/**
 * The pre-images of `extents` through `readMany`: pieces gathered up to
 * UNDO_READ_CHUNK_BYTES are read in one call into one reused buffer (a log
 * of random 64 KiB writes has thousands of small, scattered ranges; one
 * request each cost a fresh zeroed buffer, an allocation-map walk and a
 * thread-pool round trip). Pieces the target reports as never written are
 * appended from the shared zero buffer. The writer is done with each
 * payload when `append` resolves, so the buffer is reused after that.
 */
async function appendPreImagesBatched(writer: HrlWriter, extents: readonly Extent[], target: DiskTarget): Promise<void> {
  const buffer = Buffer.allocUnsafe(UNDO_READ_CHUNK_BYTES);
  let batch: Array<{ offset: number; buffer: Buffer }> = [];
  let used = 0;
  const drain = async (): Promise<void> => {
    if (batch.length === 0) return;
    const zero = await target.readMany!(batch);
    for (let i = 0; i < batch.length; i++) {
      const r = batch[i]!;
      if (zero[i] === true) {
        zeroChunk ??= Buffer.alloc(UNDO_READ_CHUNK_BYTES);
        await writer.append(r.offset, zeroChunk.subarray(0, r.buffer.length));
      } else {
        await writer.append(r.offset, r.buffer);
      }
    }
    batch = [];
    used = 0;
  };
  for (const e of extents) {
    for (let done = 0; done < e.length; ) {
      const n = Math.min(UNDO_READ_CHUNK_BYTES, e.length - done);
      if (used + n > buffer.length) await drain();
      batch.push({ offset: e.offset + done, buffer: buffer.subarray(used, used + n) });
      used += n;
      done += n;
    }
  }
  await drain();
}

/**
 * Appends the target's current content of `extents` to `writer`: through
 * `readMany` where the target has it, else one read per piece of at most
 * UNDO_READ_CHUNK_BYTES; ranges the target reports as never written are
 * appended as zeroes without reading them (holes in a `SparseSegmentFile`).
 */
export async function appendTargetContent(writer: HrlWriter, extents: readonly Extent[], target: DiskTarget): Promise<void> {
  if (target.readMany !== undefined) await appendPreImagesBatched(writer, extents, target);
  else await appendPreImages(writer, extents, target);
}

/**
 * A writer for a new journal file (`file` must not exist) that leaves zero
 * payloads as holes (`SparseSegmentFile`): undo segments, resync slots and
 * resync session files. `scratchUntilSealed`: the caller renames the file
 * into place after the seal and discards it after a crash before that
 * (see `HrlWriterOptions.scratchUntilSealed`), so only the seal syncs it.
 */
export function createSegmentWriter(file: string, options: { scratchUntilSealed?: boolean } = {}): Promise<HrlWriter> {
  // Their ranges are disjoint by construction: nothing to coalesce, so no map to keep.
  return HrlWriter.create(file, { openFile: (f) => SparseSegmentFile.create(f), coalesceOverwrites: false, scratchUntilSealed: options.scratchUntilSealed ?? false });
}

/**
 * Sorts ranges and merges overlapping or touching ones. A log may write the
 * same range several times; its pre-image needs each byte once, and every
 * pre-image byte is read before the log changes anything, so the merged
 * ranges hold exactly the content the log is about to overwrite.
 */
export function coalesceExtents(ranges: readonly Extent[]): Extent[] {
  // Ranges already sorted (coalesced ones, passed again) skip the sort. The
  // comparator answers -1/0/1: a difference of offsets past 2^31 is a heap
  // number, an allocation per comparison of a log's thousands of ranges.
  let ordered = true;
  for (let i = 1; i < ranges.length && ordered; i++) ordered = ranges[i - 1]!.offset <= ranges[i]!.offset;
  const nonEmpty = ranges.filter((r) => r.length > 0);
  const sorted = ordered ? nonEmpty : nonEmpty.sort((a, b) => (a.offset < b.offset ? -1 : a.offset > b.offset ? 1 : 0));
  const out: { offset: number; length: number }[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset);
    } else {
      out.push({ offset: r.offset, length: r.length });
    }
  }
  return out;
}

/** Bytes a pre-image log of these (coalesced) ranges takes: header, anchor block, payloads, metadata blocks. */
export function undoLogSizeBytes(extents: readonly Extent[]): number {
  let payload = 0;
  let entries = 0;
  for (const e of extents) {
    payload += e.length;
    entries += Math.ceil(e.length / HRL_WRITER_DEFAULTS.maxEntryBytes);
  }
  const perBlock = hrlEntriesPerBlock(HRL_DEFAULT_METADATA_SIZE);
  return HRL_HEADER_SIZE + HRL_DEFAULT_METADATA_SIZE * (1 + Math.ceil(entries / perBlock)) + payload;
}

/**
 * At most the bytes a segment of these (coalesced) ranges will occupy on
 * the volume, from the target's allocation map: its structures (header,
 * metadata blocks) and, of the payloads, only runs the target holds data
 * for, each rounded up to whole pages plus one (a run need not start on a
 * page of the segment). Never more than `undoLogSizeBytes`. Walking the
 * map costs a call per range (a seek pair on a raw file), so callers ask
 * only when the full length does not fit. Exact on file systems with
 * blocks of at most a page; larger blocks can make it short, which the
 * caller's check after writing covers.
 */
export async function undoLogOccupiedBoundBytes(extents: readonly Extent[], target: DiskTarget): Promise<number> {
  const lengthBytes = undoLogSizeBytes(extents);
  let bound = lengthBytes - extents.reduce((n, e) => n + e.length, 0);
  for (const e of extents) {
    const end = e.offset + e.length;
    /** The data run being gathered, [runFrom, runTo): neighbouring data extents are one run. */
    let runFrom = -1;
    let runTo = -1;
    const closeRun = (): void => {
      if (runTo > runFrom) bound += Math.ceil((runTo - runFrom) / HOLE_PAGE_BYTES) * HOLE_PAGE_BYTES + HOLE_PAGE_BYTES;
      runFrom = runTo = -1;
    };
    for await (const a of target.extents(e.offset, e.length)) {
      const from = Math.max(a.offset, e.offset);
      const to = Math.min(a.offset + a.length, end);
      if (a.zero || to <= from) continue;
      if (from !== runTo) closeRun();
      if (runFrom < 0) runFrom = from;
      runTo = to;
    }
    closeRun();
    if (bound >= lengthBytes) return lengthBytes;
  }
  return Math.min(bound, lengthBytes);
}

// The arithmetic above relies on the writer's default block layout.
if (HRL_METADATA_HEADER_SIZE + hrlEntriesPerBlock(HRL_DEFAULT_METADATA_SIZE) * HRL_METADATA_ENTRY_SIZE > HRL_DEFAULT_METADATA_SIZE) {
  throw new Error('hrl block layout changed: undoLogSizeBytes must follow');
}

/**
 * One disk's undo journal: for each applied log `seq`, an [MS-HRL] log
 * `<seq>.undo.hrl` holding the old content of every range the log
 * overwrote. Rolling the target back past `seq` is applying that log, so
 * rolling back to a point is applying pre-image logs newest first.
 *
 * Crash safety: a pre-image is written to `<seq>.undo.hrl.tmp`, sealed
 * (whose one fdatasync makes payloads and header durable), renamed into place and the directory fsynced, and only
 * then does the master target start applying the log. So after a crash:
 * - a `.tmp` file means apply had not started: the target still holds the
 *   old data; the file is discarded and the pre-image written again;
 * - a complete `<seq>.undo.hrl` may be followed by a half-applied log: it is
 *   kept and never rewritten, because the target may now hold new data.
 */
export class UndoJournal {
  constructor(readonly dir: string) {}

  /** Creates the directory and discards pre-images a crash left half-written. */
  async open(): Promise<void> {
    try {
      await fsp.mkdir(this.dir, { recursive: true });
      for (const name of await fsp.readdir(this.dir)) {
        if (name.endsWith(RETENTION_LAYOUT.tmpSuffix)) await fsp.rm(path.join(this.dir, name), { force: true });
      }
    } catch (err) {
      throw wrapError(err, 'BR_IO', `opening undo journal ${this.dir}`);
    }
  }

  file(seq: number): string {
    return path.join(this.dir, undoFileName(seq));
  }

  /** Whether the complete pre-image of `seq` exists. */
  has(seq: number): boolean {
    return fs.existsSync(this.file(seq));
  }

  /** Sequence numbers with a complete pre-image, ascending. */
  async list(): Promise<number[]> {
    let names: string[];
    try {
      names = await fsp.readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw wrapError(err, 'BR_IO', `listing undo journal ${this.dir}`);
    }
    const seqs: number[] = [];
    for (const name of names) {
      const seq = seqOfUndoFile(name);
      if (seq !== undefined) seqs.push(seq);
    }
    return seqs.sort((a, b) => a - b);
  }

  /**
   * Bytes the complete pre-images occupy on the volume (allocated blocks,
   * see `allocatedBytesOf`), and their apparent length for comparison.
   */
  async usage(): Promise<{ allocatedBytes: number; apparentBytes: number }> {
    let allocatedBytes = 0;
    let apparentBytes = 0;
    for (const seq of await this.list()) {
      try {
        const st = await fsp.stat(this.file(seq));
        allocatedBytes += allocatedBytesOf(st);
        apparentBytes += st.size;
      } catch {
        // Pruned meanwhile.
      }
    }
    return { allocatedBytes, apparentBytes };
  }

  /** Bytes the complete pre-images occupy on the volume. */
  async allocatedBytes(): Promise<number> {
    return (await this.usage()).allocatedBytes;
  }

  /** Bytes the pre-image of `seq` occupies on the volume; 0 if it is gone. */
  async segmentAllocatedBytes(seq: number): Promise<number> {
    try {
      return allocatedBytesOf(await fsp.stat(this.file(seq)));
    } catch {
      return 0;
    }
  }

  /**
   * Makes the pre-image of `ranges` (read from `target` now) durable as the
   * undo log of `seq`. Does nothing if a complete one exists (see the class
   * comment). Returns whether it wrote, the file's length and the bytes it
   * occupies on the volume (less than its length where zero pre-images are
   * holes).
   */
  async write(seq: number, ranges: readonly Extent[], target: DiskTarget): Promise<{ written: boolean; sizeBytes: number; allocatedBytes: number }> {
    const final = this.file(seq);
    if (fs.existsSync(final)) {
      const st = fs.statSync(final);
      return { written: false, sizeBytes: st.size, allocatedBytes: allocatedBytesOf(st) };
    }
    const tmp = `${final}${RETENTION_LAYOUT.tmpSuffix}`;
    await fsp.rm(tmp, { force: true });
    const extents = coalesceExtents(ranges);
    for (const e of extents) {
      if (e.offset < 0 || e.offset + e.length > target.sizeBytes) {
        throw new BlockrelayError('BR_INTERNAL', `log ${seq} writes [${e.offset}, ${e.offset + e.length}) outside the ${target.sizeBytes}-byte target`);
      }
    }
    let writer: HrlWriter | undefined;
    try {
      // A `.tmp` segment is discarded by `open()` after a crash and gets its
      // name only by the rename below, after the seal's fdatasync: only that
      // one sync is needed (the create's anchor and directory syncs and the
      // seal's sync before its header protected nothing a crash could see).
      writer = await createSegmentWriter(tmp, { scratchUntilSealed: true });
      await appendTargetContent(writer, extents, target);
      // SparseSegmentFile writes until every byte is written or the call
      // fails, so no write can come out short without an error: structures
      // and size are checked, payloads are not read back.
      const sealed = await writer.seal();
      await this.checkWritten(tmp, sealed.sizeBytes, target.sizeBytes);
      // Counted after the seal's fdatasync: every block the file will hold is allocated by then.
      const allocatedBytes = allocatedBytesOf(await fsp.stat(tmp));
      await fsp.rename(tmp, final);
      await syncDirectory(this.dir);
      return { written: true, sizeBytes: sealed.sizeBytes, allocatedBytes };
    } catch (err) {
      await writer?.close();
      await fsp.rm(tmp, { force: true });
      throw wrapError(err, 'BR_IO', `writing pre-image of log ${seq} to ${tmp}`);
    }
  }

  /**
   * Reads a sealed pre-image back and verifies it before it may be renamed
   * into place: a file system that runs out of space can accept a write
   * short without an error, and a torn pre-image must never become
   * "complete". Size and every structure; not the payloads, which
   * SparseSegmentFile wrote in full or failed on. A short file on a volume
   * without room is BR_DISK_FULL.
   */
  private async checkWritten(tmp: string, expectedBytes: number, diskSizeBytes: number): Promise<void> {
    try {
      if ((await fsp.stat(tmp)).size !== expectedBytes) throw new BlockrelayError('BR_IO', `pre-image ${tmp} holds ${(await fsp.stat(tmp)).size} bytes, ${expectedBytes} were written`);
      await verifyHrlLog(tmp, { diskSizeBytes, checkPayloads: false });
    } catch (err) {
      let full = false;
      try {
        const st = await fsp.statfs(this.dir);
        full = st.bavail * st.bsize < expectedBytes;
      } catch {
        // Cannot tell: report the damage as it is.
      }
      if (full) throw new BlockrelayError('BR_DISK_FULL', `pre-image ${tmp} came out short on a full volume: ${(err as Error).message}`, { cause: err });
      // Recoverable: the apply is retried and the pre-image written again.
      throw new BlockrelayError('BR_IO', `pre-image ${tmp} failed verification after writing: ${(err as Error).message}`, { cause: err });
    }
  }

  /** Deletes the pre-image of `seq` (pruning or commit). */
  async remove(seq: number): Promise<void> {
    await fsp.rm(this.file(seq), { force: true });
  }

  /**
   * Opens and fully verifies the pre-image of `seq` against the disk size.
   * Damage becomes BR_RETENTION_JOURNAL_CORRUPT naming the file and the
   * byte offset; a missing file BR_RETENTION_JOURNAL_MISSING.
   */
  async openVerified(seq: number, diskSizeBytes: number, options: { checkPayloads?: boolean } = {}): Promise<{ log: HrlLogFile; verified: HrlVerifiedLog }> {
    const file = this.file(seq);
    if (!fs.existsSync(file)) {
      throw new BlockrelayError('BR_RETENTION_JOURNAL_MISSING', `undo journal segment ${file} (log ${seq}) is missing`, { details: { file, seq } });
    }
    const log = await HrlLogFile.open(file);
    try {
      const verified = await log.verify({ diskSizeBytes, checkPayloads: options.checkPayloads ?? true });
      return { log, verified };
    } catch (err) {
      await log.close();
      throw journalDamage(file, seq, err);
    }
  }
}

/** BR_RETENTION_JOURNAL_CORRUPT for damage `err` (a BR_HRL_* error naming the offset) found in a segment. */
export function journalDamage(file: string, seq: number, err: unknown): BlockrelayError {
  const offset = (err as BlockrelayError).details?.offset;
  return new BlockrelayError('BR_RETENTION_JOURNAL_CORRUPT', `undo journal segment ${file} (log ${seq}) is damaged${offset === undefined ? '' : ` at byte ${offset}`}: ${(err as Error).message}`, {
    cause: err,
    details: { file, seq, offset: typeof offset === 'number' ? offset : null, cause: (err as BlockrelayError).code ?? null },
  });
}
