import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import type { DiskTarget } from '../targets/disk-target';
import { AllocatedReader, readPieces } from './allocated-reader';
import { HASH_BYTES, type BlockHasher } from './block-hasher';
import {
  decodeHashReply,
  decodeInfoReply,
  decodeRequest,
  encodeErrorReply,
  encodeFlushReply,
  encodeFlushRequest,
  encodeHashReply,
  encodeHashRequest,
  encodeInfoReply,
  encodeInfoRequest,
  encodeWriteReply,
  encodeWriteRequest,
  expectReply,
  hashCountForRange,
  MAX_WRITE_DATA_BYTES,
  MSG_FLUSH,
  MSG_FLUSH_REPLY,
  MSG_HASH,
  MSG_INFO,
  MSG_WRITE,
  MSG_WRITE_REPLY,
  type HashRequest,
  type TargetInfo,
  type WriteRun,
} from './resync-wire';

/**
 * The seam between the source side of a resync and the target side. The
 * source side (the engine) sends encoded requests and gets encoded replies;
 * only hashes and the data of differing blocks cross it. In process the
 * channel calls a ResyncTargetService directly; over the network the
 * transport carries the same bytes (one HTTP request body, one response
 * body per exchange) to a ResyncTargetService on the far side.
 */
export interface ResyncChannel {
  /** Sends one encoded request and resolves with the encoded reply. */
  exchange(request: Buffer): Promise<Buffer>;
}

/** Bytes that crossed the seam, counted as encoded. */
export interface SeamCounters {
  /** Source → target: every request byte (headers, ranges, block data). */
  bytesSent: number;
  /** Target → source: every reply byte (headers and hashes). */
  bytesReceived: number;
  /** Hash bytes inside the replies. */
  hashBytes: number;
  /** Block data bytes inside the write requests. */
  dataBytes: number;
  exchanges: number;
}

/**
 * The source side's handle on the target side: typed calls over a channel,
 * counting every byte that crosses.
 */
export class ResyncPeer {
  readonly counters: SeamCounters = { bytesSent: 0, bytesReceived: 0, hashBytes: 0, dataBytes: 0, exchanges: 0 };

  constructor(private readonly channel: ResyncChannel) {}

  private async exchange(request: Buffer): Promise<Buffer> {
    this.counters.bytesSent += request.length;
    this.counters.exchanges++;
    const reply = await this.channel.exchange(request);
    this.counters.bytesReceived += reply.length;
    return reply;
  }

  async info(): Promise<TargetInfo> {
    return decodeInfoReply(await this.exchange(encodeInfoRequest()));
  }

  /**
   * Target-side hashes of `ranges`: fine blocks of `fineBlockBytes`, grouped
   * `groupBlocks` at a time (see BlockHasher.groupHashes), in range order.
   */
  async hashRanges(request: HashRequest): Promise<Buffer> {
    let expected = 0;
    for (const r of request.ranges) expected += hashCountForRange(r.length, request.fineBlockBytes, request.groupBlocks);
    const hashes = decodeHashReply(await this.exchange(encodeHashRequest(request)), expected);
    this.counters.hashBytes += hashes.length;
    return hashes;
  }

  /** Writes runs of block data on the target, split into bounded requests. */
  async writeRuns(runs: readonly WriteRun[]): Promise<void> {
    let batch: WriteRun[] = [];
    let batchBytes = 0;
    const send = async (): Promise<void> => {
      if (batch.length === 0) return;
      const count = expectReply(await this.exchange(encodeWriteRequest(batch)), MSG_WRITE_REPLY);
      if (count !== batch.length) throw new BlockrelayError('BR_RESYNC_PROTOCOL', `target side acknowledged ${count} runs of ${batch.length}`, { details: { acknowledged: count, sent: batch.length } });
      this.counters.dataBytes += batchBytes;
      batch = [];
      batchBytes = 0;
    };
    for (const run of runs) {
      if (batchBytes + run.data.length > MAX_WRITE_DATA_BYTES) await send();
      batch.push(run);
      batchBytes += run.data.length;
    }
    await send();
  }

  /** Makes every acknowledged write durable on the target. */
  async flush(): Promise<void> {
    expectReply(await this.exchange(encodeFlushRequest()), MSG_FLUSH_REPLY);
  }
}

/** Bytes written between background flushes (see ResyncTargetService.startWriteback). */
const WRITEBACK_BYTES = 4 * 1024 * 1024;
/** Ranges of one hash request the target side reads at once. */
const RANGES_IN_FLIGHT = 8;
/** Ranges whose fine hashes the target side keeps for the finer passes that follow. */
const HASH_CACHE_ENTRIES = 64;
/** Longest range the cache holds (its hashes are 1/512 of it at 4 KiB blocks). */
const HASH_CACHE_MAX_RANGE_BYTES = 64 * 1024 * 1024;

interface InFlightWrite {
  readonly offset: number;
  readonly end: number;
  done: Promise<void>;
}

interface CachedHashes {
  readonly offset: number;
  readonly end: number;
  readonly fineBlockBytes: number;
  readonly fine: Buffer;
}

/**
 * The target side of the seam: answers encoded requests against a
 * DiskTarget. Replies are never thrown; failures travel as error replies
 * carrying the BR_ code, as they would over the network.
 *
 * Coarse hashes are derived from fine ones, so the first (coarse) request
 * for a range reads and hashes it once at the fine block size; the fine
 * hashes are kept in a small cache so the finer passes over the same range
 * need no second read. The cache is only an optimization: a miss rereads,
 * and writes drop every entry they touch.
 */
export class ResyncTargetService {
  private cache: CachedHashes[] = [];
  /** A flush started early, in the background (see startWriteback). */
  private writeback: Promise<void> = Promise.resolve();
  private writebackRunning = false;
  /** The first failed background flush: every later requested flush fails with it. */
  private writebackFailure: unknown;
  /** Requested flushes running (no background flush starts meanwhile). */
  private requestedFlushes = 0;
  private bytesSinceWriteback = 0;
  /** Writes on their way to the target: a write waits only for those it overlaps, a flush for all. */
  private readonly inFlight = new Set<InFlightWrite>();
  private reader: AllocatedReader;

  constructor(
    private readonly target: DiskTarget,
    private readonly hasher: BlockHasher,
  ) {
    this.reader = new AllocatedReader(target);
  }

  /** Drops cached hashes; whoever writes the target outside this service calls it. */
  invalidate(): void {
    this.cache = [];
    this.reader = new AllocatedReader(this.target);
  }

  async handle(request: Buffer): Promise<Buffer> {
    try {
      const req = decodeRequest(request);
      switch (req.type) {
        case MSG_INFO:
          // Each resync begins with INFO: hashes cached for an earlier one
          // may predate writes made outside this service since.
          this.invalidate();
          return encodeInfoReply({ sizeBytes: this.target.sizeBytes, alignmentBytes: this.target.capabilities.alignmentBytes, spec: this.target.spec });
        case MSG_HASH:
          return encodeHashReply(await this.hash(req.request));
        case MSG_WRITE:
          await this.write(req.runs);
          this.startWriteback(req.runs);
          return encodeWriteReply(req.runs.length);
        case MSG_FLUSH:
          // No background flush starts while this one runs: beside it, that
          // one could take the kernel's only report of a failed write.
          this.requestedFlushes++;
          try {
            // Every write acknowledged before the flush has completed; waiting
            // for the ones still running as well makes the flush cover them too.
            await Promise.allSettled([...this.inFlight].map((w) => w.done));
            await this.writeback;
            // A failed background flush fails this one and every later one:
            // the kernel reports a writeback error once, so a clean sync now
            // would not mean the writes before it reached the disk.
            if (this.writebackFailure !== undefined) throw this.writebackFailure;
            await this.target.flush();
          } finally {
            this.requestedFlushes--;
          }
          return encodeFlushReply();
      }
    } catch (err) {
      const code = isBlockrelayError(err) ? err.code : 'BR_INTERNAL';
      return encodeErrorReply(code, err instanceof Error ? err.message : String(err));
    }
  }

  /**
   * Writes a request's runs, all at once: a scattered resync sends thousands
   * of small runs, and one at a time each waited a thread-pool round trip.
   * Order still holds where it matters: a run overlapping a write still in
   * flight (an earlier run of this request or of another) starts after it,
   * so overlapping writes land in the order they arrived.
   */
  private async write(runs: readonly WriteRun[]): Promise<void> {
    const writes: Array<Promise<void>> = [];
    for (const run of runs) {
      const offset = run.offset;
      const end = offset + run.data.length;
      this.cache = this.cache.filter((c) => c.end <= offset || c.offset >= end);
      const before: Array<Promise<void>> = [];
      for (const w of this.inFlight) if (w.offset < end && offset < w.end) before.push(w.done);
      const entry: InFlightWrite = { offset, end, done: Promise.resolve() };
      entry.done = (async () => {
        try {
          if (before.length > 0) await Promise.allSettled(before);
          await this.target.write(offset, run.data);
          // The allocation map it read ahead may call this range a hole.
          this.reader.forget(offset, run.data.length);
        } finally {
          this.inFlight.delete(entry);
        }
      })();
      this.inFlight.add(entry);
      writes.push(entry.done);
    }
    // Settle every run before answering, so no write of a failed request is still running.
    const results = await Promise.allSettled(writes);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
  }

  /**
   * Starts a flush in the background every WRITEBACK_BYTES of writes, so the
   * data is on its way to the disk while the resync goes on comparing, and
   * the flushes the source asks for (checkpoints, the end) find little left
   * to do. Its failure is kept: every later requested flush fails with it
   * (the source's resync then resumes from its last saved cursor).
   */
  private startWriteback(runs: readonly WriteRun[]): void {
    for (const r of runs) this.bytesSinceWriteback += r.data.length;
    if (this.writebackRunning || this.requestedFlushes > 0 || this.bytesSinceWriteback < WRITEBACK_BYTES) return;
    this.bytesSinceWriteback = 0;
    this.writebackRunning = true;
    this.writeback = this.target
      .flush()
      .catch((err: unknown) => {
        this.writebackFailure ??= err;
      })
      .finally(() => {
        this.writebackRunning = false;
      });
  }

  private async hash(req: HashRequest): Promise<Buffer> {
    const parts: Buffer[] = new Array<Buffer>(req.ranges.length);
    // The many small ranges of a dirty map are read a few at a time, not one by one.
    for (let first = 0; first < req.ranges.length; first += RANGES_IN_FLIGHT) {
      const batch = req.ranges.slice(first, first + RANGES_IN_FLIGHT).map(async (r, i) => {
        const fine = await this.fineHashes(r.offset, r.length, req.fineBlockBytes);
        parts[first + i] = this.hasher.groupHashes(fine, req.groupBlocks);
      });
      await Promise.all(batch);
    }
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
  }

  private async fineHashes(offset: number, length: number, fineBlockBytes: number): Promise<Buffer> {
    const end = offset + length;
    const hit = this.cache.find((c) => c.fineBlockBytes === fineBlockBytes && c.offset <= offset && end <= c.end && (offset - c.offset) % fineBlockBytes === 0);
    if (hit !== undefined && (end === hit.end || length % fineBlockBytes === 0)) {
      const first = (offset - hit.offset) / fineBlockBytes;
      return hit.fine.subarray(first * HASH_BYTES, (first + Math.ceil(length / fineBlockBytes)) * HASH_BYTES);
    }
    // Read in pieces, each hashed as it arrives (see READ_PIECE_BYTES).
    const { fine } = await readPieces(this.reader, this.hasher, { offset, length }, fineBlockBytes, true, false);
    if (length <= HASH_CACHE_MAX_RANGE_BYTES) {
      this.cache.push({ offset, end, fineBlockBytes, fine });
      if (this.cache.length > HASH_CACHE_ENTRIES) this.cache.shift();
    }
    return fine;
  }
}

/** A channel that hands requests to a target service in this process. */
export function inProcessChannel(service: ResyncTargetService): ResyncChannel {
  return { exchange: (request) => service.handle(request) };
}
