import { systemClock, type Clock } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import type { DiskTarget, Extent } from '../targets/disk-target';
import { AllocatedReader, readPieces, slicePieces, type ReadRange } from './allocated-reader';
import { HASH_BYTES, type BlockHasher } from './block-hasher';
import { collectWorkExtents, mergeExtents, type ExtentSource } from './extent-list';
import { ResyncJob } from './resync-job';
import type { ResyncPeer } from './resync-peer';
import type { ResyncTotals } from './resync-state-format';
import { MAX_BLOCK_BYTES, MIN_BLOCK_BYTES, type WriteRun } from './resync-wire';

/**
 * Defaults, chosen from measurements (bench/resync.bench.ts):
 * - 4 KiB fine blocks: the unit guest file systems write, so a scattered
 *   4 KiB change costs 4 KiB of data, not a larger block around it.
 * - coarse passes at 1 MiB and 64 KiB: with 8-byte hashes, comparing a
 *   512 MiB disk at 4 KiB alone costs 1 MiB of hashes; the coarse passes
 *   cut that to about 220 KiB at 1% scattered changes and to a few KiB when
 *   little changed. Coarse hashes are hashes of the fine ones, so they cost
 *   no extra read.
 * - 2 MiB windows, 4 in flight, read in 512 KiB pieces hashed as they
 *   arrive (READ_PIECE_BYTES): measured by CPU time on 512 MiB, 4 MiB windows
 *   read whole cost up to twice as much, the buffers falling out of the CPU
 *   cache before they were hashed; memory stays about concurrency × window
 *   on each side.
 */
export const RESYNC_DEFAULTS = {
  blockSizeBytes: 4096,
  coarseBlockBytes: [1024 * 1024, 64 * 1024] as readonly number[],
  windowBytes: 2 * 1024 * 1024,
  concurrency: 4,
  checkpointIntervalMs: 1000,
  /** Progress is also saved after this much disk, so a fast resync loses little when interrupted. */
  checkpointIntervalBytes: 256 * 1024 * 1024,
  progressIntervalMs: 1000,
  settleRounds: 0,
} as const;

/** Most ranges one window (and so one hash request) names. */
const MAX_RANGES_PER_WINDOW = 4096;
/** How far completed windows may run ahead of the oldest unfinished one, in windows. */
const MAX_LEAD_WINDOWS_PER_WORKER = 4;
const MAX_CONCURRENCY = 64;
const MAX_WINDOW_BYTES = 256 * 1024 * 1024;

export interface ResyncProgress {
  readonly phase: 'compare' | 'settle';
  /** Work bytes compared, including those an earlier attempt finished. */
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly bytesSent: number;
  readonly blocksSent: number;
  readonly elapsedMs: number;
}

export interface ResyncOptions {
  readonly source: DiskTarget;
  /** The target side, across the seam. */
  readonly peer: ResyncPeer;
  readonly hasher: BlockHasher;
  /** Persisted progress and writes noted during the resync; in memory when omitted. */
  readonly job?: ResyncJob;
  /** Fine block size: the unit of comparison and of sending. */
  readonly blockSizeBytes?: number;
  /** Coarser passes before the fine one; sizes that are not whole multiples of the block size are dropped. */
  readonly coarseBlockBytes?: readonly number[];
  /** Compare only these extents (a dirty map); everything when omitted. */
  readonly extents?: ExtentSource;
  /** The target is known to read as zeroes (a new disk): send every non-zero block without comparing. */
  readonly fullCopy?: boolean;
  readonly clock?: Clock;
  readonly windowBytes?: number;
  readonly concurrency?: number;
  /** Progress is saved when this much time or `checkpointIntervalBytes` of disk passed since the last save. */
  readonly checkpointIntervalMs?: number;
  readonly checkpointIntervalBytes?: number;
  /** Limits source reads, to spare a production disk. */
  readonly readRateBytesPerSec?: number;
  /** Passes over writes noted during the resync, for callers without delta logs behind it. */
  readonly settleRounds?: number;
  readonly onProgress?: (progress: ResyncProgress) => void;
  readonly progressIntervalMs?: number;
  /** Stops the resync at the next window; progress is saved and it fails with BR_RESYNC_ABORTED. */
  readonly signal?: AbortSignal;
}

export interface ResyncResult {
  /** Source → target bytes across the seam: requests, headers and block data. */
  readonly bytesSent: number;
  /** Target → source bytes across the seam: replies, mostly hashes. */
  readonly bytesReceived: number;
  /** Hash bytes among bytesReceived. */
  readonly hashBytes: number;
  /** Data of the blocks found different (or, in a full copy, not zero): what had to travel. */
  readonly bytesDiffering: number;
  /** Fine blocks compared in this attempt. */
  readonly blocksCompared: number;
  /** Fine blocks sent in this attempt. */
  readonly blocksSent: number;
  readonly durationMs: number;
  /** Of durationMs, the time spent waiting for the target to make writes durable (flush before each saved cursor and at the end). */
  readonly flushMs: number;
  readonly blockSizeBytes: number;
  /** Block sizes of the passes, coarse to fine. */
  readonly passBlockBytes: readonly number[];
  readonly sizeBytes: number;
  /** Work bytes (whole disk or the extents given). */
  readonly workBytes: number;
  /** Disk offset this attempt started from: above 0 when an earlier attempt's progress was used. */
  readonly resumedFromBytes: number;
  readonly restartReason?: string;
  /** Totals over every attempt of this resync. */
  readonly totals: ResyncTotals;
  /** Writes noted during the resync and not settled here: the delta logs carry them. */
  readonly writesDuringResync: readonly Extent[];
  readonly settleRoundsRun: number;
}

interface Window {
  readonly seq: number;
  readonly ranges: readonly Extent[];
  readonly bytes: number;
  /** Disk offset just past the window's last range: the cursor once it is done. */
  readonly end: number;
}

/** A candidate region at one pass: fine blocks [startBlock, startBlock + blocks) of range `range`. */
interface Candidate {
  readonly range: number;
  readonly startBlock: number;
  readonly blocks: number;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function checkOptions(o: ResyncOptions, blockSizeBytes: number, windowBytes: number, concurrency: number): void {
  if (!isPowerOfTwo(blockSizeBytes) || blockSizeBytes < MIN_BLOCK_BYTES || blockSizeBytes > MAX_BLOCK_BYTES) {
    throw new BlockrelayError('BR_USAGE', `block size must be a power of two from ${MIN_BLOCK_BYTES} to ${MAX_BLOCK_BYTES} bytes, got ${blockSizeBytes}`);
  }
  if (!Number.isSafeInteger(windowBytes) || windowBytes < blockSizeBytes || windowBytes % blockSizeBytes !== 0 || windowBytes > MAX_WINDOW_BYTES) {
    throw new BlockrelayError('BR_USAGE', `window must be a multiple of the block size ${blockSizeBytes} up to ${MAX_WINDOW_BYTES} bytes, got ${windowBytes}`);
  }
  if (!Number.isSafeInteger(concurrency) || concurrency < 1 || concurrency > MAX_CONCURRENCY) {
    throw new BlockrelayError('BR_USAGE', `concurrency must be 1 to ${MAX_CONCURRENCY}, got ${concurrency}`);
  }
  if (o.readRateBytesPerSec !== undefined && !(o.readRateBytesPerSec > 0)) {
    throw new BlockrelayError('BR_USAGE', `read rate must be positive, got ${o.readRateBytesPerSec}`);
  }
}

/** Group sizes (in fine blocks) of each pass, coarse to fine, ending with 1. */
export function passGroups(blockSizeBytes: number, coarseBlockBytes: readonly number[], windowBytes: number): number[] {
  const groups = [...new Set(coarseBlockBytes)]
    .filter((c) => c > blockSizeBytes && c % blockSizeBytes === 0 && c <= windowBytes)
    .sort((a, b) => b - a)
    .map((c) => c / blockSizeBytes);
  return [...groups.filter((g, i) => i === 0 || groups[i - 1] % g === 0), 1];
}

/** Cuts the work list, from `cursor` on, into windows of at most `windowBytes`. */
function* windowsOf(work: readonly Extent[], cursor: number, windowBytes: number): Generator<Window> {
  let seq = 0;
  let ranges: Extent[] = [];
  let bytes = 0;
  for (const e of work) {
    let start = Math.max(e.offset, cursor);
    const end = e.offset + e.length;
    while (start < end) {
      const piece = Math.min(end - start, windowBytes - bytes);
      ranges.push({ offset: start, length: piece });
      bytes += piece;
      start += piece;
      if (bytes === windowBytes || ranges.length === MAX_RANGES_PER_WINDOW) {
        yield { seq: seq++, ranges, bytes, end: start };
        ranges = [];
        bytes = 0;
      }
    }
  }
  if (ranges.length > 0) {
    const last = ranges[ranges.length - 1];
    yield { seq: seq++, ranges, bytes, end: last.offset + last.length };
  }
}

function sumLengths(extents: readonly Extent[], below = Number.MAX_SAFE_INTEGER): number {
  let total = 0;
  for (const e of extents) total += Math.max(0, Math.min(e.offset + e.length, below) - e.offset);
  return total;
}

function fingerprintExtents(hasher: BlockHasher, extents: readonly Extent[]): bigint {
  const buf = Buffer.alloc(extents.length * 16);
  extents.forEach((e, i) => {
    buf.writeBigUInt64LE(BigInt(e.offset), i * 16);
    buf.writeBigUInt64LE(BigInt(e.length), i * 16 + 8);
  });
  return hasher.hash(buf);
}

/**
 * Brings the target side in step with the source: compares fixed blocks by
 * xxh64, hashed on each side, and sends only the blocks that differ.
 *
 * Each window is read from the source once and hashed at the fine block
 * size; the target side does the same for the same ranges. The first pass
 * compares the coarsest hashes; each finer pass asks the target only for the
 * regions whose coarser hash differed; the last pass names the fine blocks to
 * send, merged into runs. Several windows are in flight at once, and progress
 * (the lowest disk offset below which every window is done and flushed) is
 * saved by the job every `checkpointIntervalMs` or `checkpointIntervalBytes`.
 */
export async function runResync(options: ResyncOptions): Promise<ResyncResult> {
  const clock = options.clock ?? systemClock;
  const startMs = clock.now();
  const blockSizeBytes = options.blockSizeBytes ?? RESYNC_DEFAULTS.blockSizeBytes;
  const windowBytes = options.windowBytes ?? Math.max(RESYNC_DEFAULTS.windowBytes, blockSizeBytes);
  const concurrency = options.concurrency ?? RESYNC_DEFAULTS.concurrency;
  checkOptions(options, blockSizeBytes, windowBytes, concurrency);
  const { source, peer, hasher } = options;
  const groups = passGroups(blockSizeBytes, options.coarseBlockBytes ?? RESYNC_DEFAULTS.coarseBlockBytes, windowBytes);

  const info = await peer.info();
  if (info.sizeBytes !== source.sizeBytes) {
    throw new BlockrelayError('BR_RESYNC_SIZE_MISMATCH', `source ${source.spec} holds ${source.sizeBytes} bytes but target ${info.spec} holds ${info.sizeBytes}`, { details: { sourceBytes: source.sizeBytes, targetBytes: info.sizeBytes } });
  }
  for (const [side, align] of [['source', source.capabilities.alignmentBytes], ['target', info.alignmentBytes]] as const) {
    if (blockSizeBytes % align !== 0) throw new BlockrelayError('BR_USAGE', `block size ${blockSizeBytes} is not a multiple of the ${side}'s ${align}-byte alignment`);
  }
  const sizeBytes = source.sizeBytes;
  const guided = options.extents !== undefined;
  const work = guided ? await collectWorkExtents(options.extents!, blockSizeBytes, sizeBytes) : sizeBytes > 0 ? [{ offset: 0, length: sizeBytes }] : [];
  const workBytes = sumLengths(work);

  const job = options.job ?? (await ResyncJob.open(undefined, hasher));
  const enc = new TextEncoder();
  const start = job.begin(
    {
      pairFingerprint: hasher.hash(enc.encode(`${source.spec}\n${info.spec}`)),
      sizeBytes,
      blockSizeBytes,
      guided,
      workFingerprint: guided ? fingerprintExtents(hasher, work) : 0n,
    },
    startMs,
  );

  const seamAtStart = { ...peer.counters };
  let flushMs = 0;
  const flush = async (): Promise<void> => {
    const t = clock.now();
    await peer.flush();
    flushMs += clock.now() - t;
  };
  const run = { blocksCompared: 0, blocksSent: 0, bytesDiffering: 0 };
  const totals = (): ResyncTotals => ({
    blocksCompared: start.previous.blocksCompared + run.blocksCompared,
    blocksSent: start.previous.blocksSent + run.blocksSent,
    bytesSent: start.previous.bytesSent + peer.counters.bytesSent - seamAtStart.bytesSent,
    bytesReceived: start.previous.bytesReceived + peer.counters.bytesReceived - seamAtStart.bytesReceived,
    hashBytes: start.previous.hashBytes + peer.counters.hashBytes - seamAtStart.hashBytes,
  });

  const progress = new ProgressReporter(options, clock, startMs, workBytes, () => ({
    bytesSent: peer.counters.bytesSent - seamAtStart.bytesSent,
    blocksSent: run.blocksSent,
  }));
  progress.setResumed(sumLengths(work, start.cursorBytes));
  const limiter = new ReadLimiter(clock, options.readRateBytesPerSec);
  const zeroBlock = Buffer.alloc(blockSizeBytes);
  // Holes in the source (unallocated grains, empty blob pages) are not read.
  const reader = new AllocatedReader(source);

  const fullCopy = options.fullCopy === true;
  // Where the source reads and hashes natively, each worker reads its
  // windows into one buffer of its own, reused: nothing of a window's data
  // outlives processWindow (write requests copy what they send).
  const reusesWindowBuffers = !fullCopy && reader.hashesNatively(hasher);

  /** Compares one window and sends its differing blocks; resolves once the target acknowledged them. */
  const processWindow = async (w: Window, buffer: Buffer | undefined): Promise<void> => {
    await limiter.take(w.bytes);
    let at = 0;
    const reads = Promise.all(
      w.ranges.map((r) => {
        const into = buffer?.subarray(at, at + r.length);
        at += r.length;
        return readPieces(reader, hasher, r, blockSizeBytes, !fullCopy, true, into);
      }),
    );
    let runs: WriteRun[];
    if (fullCopy) {
      const pieces = await reads;
      runs = w.ranges.flatMap((r, i) =>
        nonZeroRuns(pieces[i].pieces.map((p, j) => ({ offset: r.offset + j * pieces[i].pieceBytes, length: p.length })), pieces[i].pieces, blockSizeBytes, zeroBlock),
      );
    } else {
      runs = await diffWindow(peer, hasher, w.ranges, reads, groups, blockSizeBytes);
    }
    if (runs.length > 0) await peer.writeRuns(runs);
    run.blocksCompared += Math.ceil(w.bytes / blockSizeBytes);
    for (const r of runs) {
      run.blocksSent += Math.ceil(r.data.length / blockSizeBytes);
      run.bytesDiffering += r.data.length;
    }
    progress.add(w.bytes);
  };

  const pass = async (passWork: readonly Extent[], cursor: number, persist: boolean): Promise<void> => {
    const windows = windowsOf(passWork, cursor, windowBytes);
    const frontier = new Frontier(cursor, concurrency * MAX_LEAD_WINDOWS_PER_WORKER);
    let failure: unknown;
    let checkpointing = false;
    let lastCheckpointMs = clock.now();
    let savedCursor = cursor;
    const checkpoint = async (force: boolean): Promise<void> => {
      if (!persist || job.statePath === undefined || checkpointing) return;
      const at = frontier.cursor;
      if (!force) {
        if (at === savedCursor) return;
        const timeDue = clock.now() - lastCheckpointMs >= (options.checkpointIntervalMs ?? RESYNC_DEFAULTS.checkpointIntervalMs);
        const bytesDue = at - savedCursor >= (options.checkpointIntervalBytes ?? RESYNC_DEFAULTS.checkpointIntervalBytes);
        if (!timeDue && !bytesDue) return;
      }
      checkpointing = true;
      try {
        // Durable fixes first, then the claim that they are done.
        await flush();
        await job.checkpoint(at, totals(), clock.now());
        savedCursor = at;
        lastCheckpointMs = clock.now();
      } finally {
        checkpointing = false;
      }
    };
    const worker = async (): Promise<void> => {
      const buffer = reusesWindowBuffers ? Buffer.allocUnsafe(windowBytes) : undefined;
      while (failure === undefined) {
        if (options.signal?.aborted) {
          failure ??= new BlockrelayError('BR_RESYNC_ABORTED', 'resync stopped on request; progress is saved and the next run resumes');
          return;
        }
        const next = windows.next();
        if (next.done === true) return;
        await frontier.waitForRoom(next.value.seq);
        if (failure !== undefined) return;
        try {
          await processWindow(next.value, buffer);
          frontier.complete(next.value);
          await checkpoint(false);
        } catch (err) {
          failure ??= err;
          frontier.stop();
        }
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    if (failure !== undefined) {
      // Keep what was finished, so an outage resumes near where it stopped.
      await checkpoint(true).catch(() => undefined);
      throw failure;
    }
    await checkpoint(true);
  };

  await pass(work, start.cursorBytes, true);
  let settleRoundsRun = 0;
  const settleRounds = options.settleRounds ?? RESYNC_DEFAULTS.settleRounds;
  for (; settleRoundsRun < settleRounds; settleRoundsRun++) {
    const noted = job.takeNotedWrites();
    if (noted.length === 0) break;
    progress.phase = 'settle';
    await pass(mergeExtents(noted, blockSizeBytes, sizeBytes), 0, false);
  }
  await flush();
  const writesDuringResync = job.notedWrites();
  const finalTotals = totals();
  await job.complete();
  progress.finish();
  return {
    bytesSent: peer.counters.bytesSent - seamAtStart.bytesSent,
    bytesReceived: peer.counters.bytesReceived - seamAtStart.bytesReceived,
    hashBytes: peer.counters.hashBytes - seamAtStart.hashBytes,
    bytesDiffering: run.bytesDiffering,
    blocksCompared: run.blocksCompared,
    blocksSent: run.blocksSent,
    durationMs: clock.now() - startMs,
    flushMs,
    blockSizeBytes,
    passBlockBytes: options.fullCopy === true ? [] : groups.map((g) => g * blockSizeBytes),
    sizeBytes,
    workBytes,
    resumedFromBytes: start.cursorBytes,
    ...(start.restartReason === undefined ? {} : { restartReason: start.restartReason }),
    totals: finalTotals,
    writesDuringResync,
    settleRoundsRun,
  };

}

/**
 * Finds the blocks of one window that differ on the target: the coarsest
 * useful pass over every range, then each finer pass over the groups whose
 * hash differed, and returns the differing fine blocks as runs of source data.
 */
async function diffWindow(peer: ResyncPeer, hasher: BlockHasher, ranges: readonly Extent[], reads: Promise<ReadRange[]>, groups: readonly number[], blockSizeBytes: number): Promise<WriteRun[]> {
  let candidates: Candidate[] = ranges.map((r, i) => ({ range: i, startBlock: 0, blocks: Math.ceil(r.length / blockSizeBytes) }));
  // A pass whose groups are no smaller than every range tells nothing the
  // next one would not (one hash per range either way): small extents of a
  // dirty map go straight to the finer passes.
  const longest = Math.max(...candidates.map((c) => c.blocks));
  let first = 0;
  while (first < groups.length - 1 && groups[first + 1] >= longest) first++;
  const [data, targetHashes] = await Promise.all([reads, peer.hashRanges({ fineBlockBytes: blockSizeBytes, groupBlocks: groups[first], ranges })]);
  const fine = data.map((d) => d.fine);
  let theirs = targetHashes;
  for (let level = first; ; level++) {
    candidates = compareLevel(hasher, candidates, fine, theirs, groups[level]);
    if (level === groups.length - 1 || candidates.length === 0) break;
    theirs = await peer.hashRanges({ fineBlockBytes: blockSizeBytes, groupBlocks: groups[level + 1], ranges: candidates.map((c) => byteRange(ranges[c.range], c, blockSizeBytes)) });
  }
  return candidates.map((c) => {
    const r = byteRange(ranges[c.range], c, blockSizeBytes);
    const start = r.offset - ranges[c.range].offset;
    return { offset: r.offset, data: slicePieces(data[c.range], start, start + r.length) };
  });
}

/** The byte range of a candidate inside its window range. */
function byteRange(range: Extent, c: Candidate, blockSizeBytes: number): Extent {
  const offset = range.offset + c.startBlock * blockSizeBytes;
  return { offset, length: Math.min(c.blocks * blockSizeBytes, range.offset + range.length - offset) };
}

/**
 * Compares our group hashes of each candidate with the target's (in the same
 * order) and returns the differing groups as the next pass's candidates,
 * adjacent ones merged.
 */
function compareLevel(hasher: BlockHasher, candidates: readonly Candidate[], fine: readonly Buffer[], theirs: Buffer, groupBlocks: number): Candidate[] {
  const out: Candidate[] = [];
  let pos = 0;
  for (const c of candidates) {
    const ours = hasher.groupHashes(fine[c.range].subarray(c.startBlock * HASH_BYTES, (c.startBlock + c.blocks) * HASH_BYTES), groupBlocks);
    const count = ours.length / HASH_BYTES;
    for (let g = 0; g < count; g++, pos += HASH_BYTES) {
      // Two 32-bit reads: far cheaper than Buffer.compare per 8-byte hash.
      if (ours.readUInt32LE(g * HASH_BYTES) === theirs.readUInt32LE(pos) && ours.readUInt32LE(g * HASH_BYTES + 4) === theirs.readUInt32LE(pos + 4)) continue;
      const startBlock = c.startBlock + g * groupBlocks;
      const blocks = Math.min(groupBlocks, c.startBlock + c.blocks - startBlock);
      const last = out[out.length - 1];
      if (last !== undefined && last.range === c.range && last.startBlock + last.blocks === startBlock) out[out.length - 1] = { ...last, blocks: last.blocks + blocks };
      else out.push({ range: c.range, startBlock, blocks });
    }
  }
  if (pos !== theirs.length) throw new Error(`compareLevel: used ${pos} of ${theirs.length} hash bytes`);
  return out;
}

/** Runs of blocks that are not all zero, for a copy onto a disk that reads as zeroes. */
function nonZeroRuns(ranges: readonly Extent[], data: readonly Buffer[], blockSizeBytes: number, zeroBlock: Buffer): WriteRun[] {
  const runs: WriteRun[] = [];
  ranges.forEach((r, i) => {
    const d = data[i];
    let runStart = -1;
    for (let pos = 0; pos <= d.length; pos += blockSizeBytes) {
      const end = Math.min(pos + blockSizeBytes, d.length);
      const zero = pos === d.length || d.subarray(pos, end).equals(zeroBlock.subarray(0, end - pos));
      if (!zero && runStart < 0) runStart = pos;
      if (zero && runStart >= 0) {
        runs.push({ offset: r.offset + runStart, data: d.subarray(runStart, pos) });
        runStart = -1;
      }
    }
  });
  return runs;
}

/**
 * The lowest disk offset below which every window is done, and a bound on
 * how far finished windows may run ahead of an unfinished one.
 */
class Frontier {
  private readonly done = new Map<number, number>();
  private nextSeq = 0;
  private waiters: Array<() => void> = [];
  private stopped = false;

  constructor(
    public cursor: number,
    private readonly maxLead: number,
  ) {}

  async waitForRoom(seq: number): Promise<void> {
    while (!this.stopped && seq - this.nextSeq >= this.maxLead) await new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  complete(w: Window): void {
    this.done.set(w.seq, w.end);
    let end = this.done.get(this.nextSeq);
    while (end !== undefined) {
      this.done.delete(this.nextSeq);
      this.cursor = end;
      this.nextSeq++;
      end = this.done.get(this.nextSeq);
    }
    this.release();
  }

  /** A window failed: waiters stop waiting, so their workers see the failure and end. */
  stop(): void {
    this.stopped = true;
    this.release();
  }

  private release(): void {
    for (const wake of this.waiters.splice(0)) wake();
  }
}

/** Spaces source reads so they average at most `rateBytesPerSec`. */
class ReadLimiter {
  private nextMs = 0;

  constructor(
    private readonly clock: Clock,
    private readonly rateBytesPerSec: number | undefined,
  ) {}

  async take(bytes: number): Promise<void> {
    if (this.rateBytesPerSec === undefined) return;
    const now = this.clock.now();
    const at = Math.max(now, this.nextMs);
    this.nextMs = at + (bytes / this.rateBytesPerSec) * 1000;
    if (at > now) await new Promise<void>((resolve) => this.clock.setTimer(resolve, at - now));
  }
}

/** Calls onProgress at most every progressIntervalMs, and once at the end. */
class ProgressReporter {
  phase: ResyncProgress['phase'] = 'compare';
  private doneBytes = 0;
  private lastMs: number;

  constructor(
    private readonly options: ResyncOptions,
    private readonly clock: Clock,
    private readonly startMs: number,
    private readonly totalBytes: number,
    private readonly sent: () => { bytesSent: number; blocksSent: number },
  ) {
    this.lastMs = startMs;
  }

  setResumed(bytes: number): void {
    this.doneBytes = bytes;
  }

  add(bytes: number): void {
    this.doneBytes += bytes;
    const now = this.clock.now();
    if (now - this.lastMs >= (this.options.progressIntervalMs ?? RESYNC_DEFAULTS.progressIntervalMs)) {
      this.lastMs = now;
      this.emit();
    }
  }

  finish(): void {
    this.emit();
  }

  private emit(): void {
    if (this.options.onProgress === undefined) return;
    const now = this.clock.now();
    this.options.onProgress({
      phase: this.phase,
      bytesDone: Math.min(this.doneBytes, this.totalBytes),
      bytesTotal: this.totalBytes,
      ...this.sent(),
      elapsedMs: now - this.startMs,
    });
  }
}
