import type { Logger } from '../daemon/logger';
import type { Metrics } from '../daemon/metrics';
import type { Clock } from '../platform/clock';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import type { DiskHealth } from '../retry/health';
import type { RetryPolicy } from '../retry/retry-policy';
import * as fsp from 'node:fs/promises';
import { DiskDrain } from './disk-drain';
import { holdLog, releaseHeldLog, type LogMemory } from './held-log';
import { sendLog, type PeerOptions } from './log-client';
import { hashFile, hashHex, newXxhash64 } from './log-spool';
import type { LogStageSink } from './log-stage-events';
import { UploadPipeline } from './upload-pipeline';

/** A sealed log waiting at the source, with what travels beside it. */
export interface ShippableLog {
  readonly seq: number;
  readonly file: string;
  readonly cutTimeMs: number;
  readonly cutId: string;
  readonly group?: string | undefined;
  readonly appTag?: string | undefined;
  /** The log carries resync data (its end is not a recovery point). */
  readonly resync?: boolean | undefined;
  /** Resync logs: the sequence the log follows (transport-protocol.ts LogEnvelope.follows). */
  readonly follows?: number | undefined;
  /** Sealed while a resync was still owed: no selectable point ends with it (LogEnvelope.tainted). */
  readonly tainted?: boolean | undefined;
}

/** The source's side of shipping: its sealed logs in order, and deleting one once acknowledged. */
export interface ShippingSource {
  readonly diskId: string;
  readonly diskSizeBytes: number;
  sealedLogs(): Promise<ShippableLog[]>;
  /** The process server holds `seq` durably: the source may delete it. */
  acknowledge(seq: number): Promise<void>;
}

export interface LogShipperOptions {
  readonly peer: PeerOptions;
  readonly clock: Clock;
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly health: DiskHealth;
  readonly retryPolicy?: RetryPolicy;
  /** Told when each log's shipping starts and ends (the e2e bench's timeline). */
  readonly onStage?: LogStageSink;
  /**
   * Sealed logs are read once into a buffer from this budget when they fit,
   * hashed there and sent from there (held-log.ts, log-client.ts), instead
   * of one read to hash and another to send. Without it, or past its bound,
   * a log is read twice as before.
   */
  readonly memory?: LogMemory;
}

/** Bytes one read of a sealed log into its held buffer takes at a time. */
const HOLD_READ_CHUNK_BYTES = 4 * 1024 * 1024;

/**
 * Ships one disk's sealed logs to its process server, oldest first, and
 * deletes each only after the process server's durable answer (201, or 200
 * for a log it already held). Failures go through the retry policy; a
 * non-recoverable one (wrong secret, a sequence gap the process server
 * cannot fill) stops this disk in Critical.
 */
/**
 * Sealed logs hashed as soon as they are sealed, oldest first: the one
 * being sent and the next. The next one's hash is then ready when its
 * upload starts (behind the body before it), instead of a full read of the
 * log on the way.
 */
const HASH_AHEAD_LOGS = 2;

type LogHash = { xxhash64: string; sizeBytes: number };

export class LogShipper {
  readonly drain: DiskDrain<ShippableLog>;
  shippedBytesTotal = 0;
  /** xxhash64 of sealed logs by file, computed once (a sealed log never changes); dropped once acknowledged. */
  private readonly hashes = new Map<string, Promise<LogHash>>();
  /** The next sealed log goes out while the one before it waits for its answer. */
  private readonly pipeline: UploadPipeline<ShippableLog>;
  /** Sealed logs held in memory (options.memory), by file. */
  private readonly held = new Map<string, Buffer>();
  /** Logs whose upload is under way: their held buffer is given back only once it ended. */
  private readonly sending = new Set<string>();

  constructor(private readonly source: ShippingSource, private readonly options: LogShipperOptions) {
    this.pipeline = new UploadPipeline<ShippableLog>({
      key: (log) => log.seq,
      send: (log, onBodySent) => this.upload(log, onBodySent),
      next: async (log) => (await source.sealedLogs()).find((l) => l.seq > log.seq),
      goesAlone: (log) => log.resync === true,
    });
    this.drain = new DiskDrain<ShippableLog>({
      diskId: source.diskId,
      queue: {
        next: async () => (await source.sealedLogs())[0],
        complete: async (log) => {
          await source.acknowledge(log.seq);
          this.forget(log.file);
        },
        describe: (log) => `log ${log.seq}`,
      },
      stage: 'ship',
      handle: (log) => this.pipeline.send(log),
      clock: options.clock,
      logger: options.logger,
      metrics: options.metrics,
      health: options.health,
      ...(options.retryPolicy ? { retryPolicy: options.retryPolicy } : {}),
    });
  }

  start(): void {
    this.drain.start();
  }

  /** A log was sealed: ship it now if the shipper is waiting, or start it behind the log whose answer it awaits. */
  wake(): void {
    this.drain.wake();
    this.pipeline.kick();
    void this.hashAhead();
  }

  whenIdle(): Promise<void> {
    return this.drain.whenIdle();
  }

  async stop(): Promise<void> {
    await this.drain.stop();
    await this.pipeline.stop();
    // Nothing sends any more: held logs' memory goes back (a hash still being computed gives its own back as it ends).
    this.hashes.clear();
    for (const file of [...this.held.keys()]) this.release(file);
  }

  /** Logs held in memory and their bytes (tests). */
  heldLogs(): { logs: number; bytes: number } {
    let bytes = 0;
    for (const b of this.held.values()) bytes += b.length;
    return { logs: this.held.size, bytes };
  }

  /** Forgets a log's hash and gives back its held buffer (once no upload sends from it). */
  private forget(file: string): void {
    this.hashes.delete(file);
    this.release(file);
  }

  private release(file: string): void {
    if (this.sending.has(file)) return;
    const buffer = this.held.get(file);
    if (buffer === undefined) return;
    this.held.delete(file);
    releaseHeldLog(file);
    this.options.memory!.give(buffer);
  }

  /** The log's hash: computed once, shared by its uploads (a failed computation is forgotten). */
  private hashOf(file: string): Promise<LogHash> {
    let hashed = this.hashes.get(file);
    if (hashed === undefined) {
      const computing = this.options.memory === undefined ? hashFile(file) : this.readAndHash(file);
      hashed = computing;
      this.hashes.set(file, computing);
      computing.then(
        () => {
          // Forgotten while it was read (acknowledged, folded, stopped): nothing keeps it.
          if (this.hashes.get(file) !== computing) this.release(file);
        },
        () => {
          if (this.hashes.get(file) === computing) this.hashes.delete(file);
        },
      );
    }
    return hashed;
  }

  /**
   * Reads a sealed log into a buffer from the memory budget, hashing it as
   * it is read, and holds it under its file name so its upload sends from
   * memory (one read of the log where hashing and sending took two). A log
   * that does not fit is hashed from its file as without a budget.
   */
  private async readAndHash(file: string): Promise<LogHash> {
    const fh = await fsp.open(file, 'r');
    let buffer: Buffer | undefined;
    try {
      const { size } = await fh.stat();
      buffer = this.options.memory!.take(size);
      if (buffer === undefined) return await hashFile(file);
      const hasher = await newXxhash64();
      for (let at = 0; at < size; ) {
        const { bytesRead } = await fh.read(buffer, at, Math.min(HOLD_READ_CHUNK_BYTES, size - at), at);
        if (bytesRead === 0) throw new BlockrelayError('BR_IO', `sealed log ${file} ended at byte ${at} of ${size} while it was read`, { details: { offset: at } });
        hasher.update(buffer.subarray(at, at + bytesRead));
        at += bytesRead;
      }
      holdLog(file, buffer);
      this.held.set(file, buffer);
      buffer = undefined;
      return { xxhash64: hashHex(hasher), sizeBytes: size };
    } finally {
      if (buffer !== undefined) this.options.memory!.give(buffer);
      await fh.close();
    }
  }

  /** Starts hashing the oldest sealed logs, and forgets the hashes of logs no longer sealed (acknowledged, folded). */
  private async hashAhead(): Promise<void> {
    let logs: ShippableLog[];
    try {
      logs = await this.source.sealedLogs();
    } catch {
      return;
    }
    const sealed = new Set(logs.map((l) => l.file));
    for (const file of [...this.hashes.keys()]) if (!sealed.has(file)) this.forget(file);
    for (const log of logs.slice(0, HASH_AHEAD_LOGS)) this.hashOf(log.file).catch(() => undefined);
  }

  private async upload(log: ShippableLog, onBodySent: () => void): Promise<void> {
    const report = (phase: 'start' | 'done', sizeBytes: number): void => this.options.onStage?.({ diskId: this.source.diskId, seq: log.seq, stage: 'ship', phase, atMs: this.options.clock.now(), cutTimeMs: log.cutTimeMs, sizeBytes });
    report('start', 0);
    let hashed: { xxhash64: string; sizeBytes: number };
    try {
      hashed = await this.hashOf(log.file);
    } catch (err) {
      // An overflow folded the log into the dirty map while it waited: it is
      // no longer listed and a resync log will carry its extents.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !(await this.source.sealedLogs()).some((l) => l.seq === log.seq)) return;
      throw err;
    }
    const { xxhash64, sizeBytes } = hashed;
    const envelope = {
      diskId: this.source.diskId,
      seq: log.seq,
      xxhash64,
      logLength: sizeBytes,
      cutTimeMs: log.cutTimeMs,
      cutId: log.cutId,
      group: log.group,
      appTag: log.appTag,
      diskSizeBytes: this.source.diskSizeBytes,
      ...(log.resync === true ? { resync: true } : {}),
      ...(log.resync === true && log.follows !== undefined ? { follows: log.follows } : {}),
      ...(log.tainted === true && log.resync !== true ? { tainted: true } : {}),
    };
    this.sending.add(log.file);
    try {
      await sendLog(this.options.peer, envelope, log.file, { onBodySent });
    } catch (err) {
      // A retry hashes the file afresh: nothing cached outlives a failed upload.
      this.sending.delete(log.file);
      this.forget(log.file);
      // An overflow may fold the log away while it is being sent (the upload
      // then breaks off): it needs no retry, a resync log carries its extents.
      if (!(await this.source.sealedLogs()).some((l) => l.seq === log.seq)) return;
      // A resync log that names the log it follows is refused as a gap only
      // until that log is in: waiting is the answer, not a resync.
      if (isBlockrelayError(err) && err.code === 'BR_SEQ_GAP' && !(log.resync === true && log.follows !== undefined)) {
        throw new BlockrelayError('BR_DISK_CRITICAL', `process server expects log ${String(err.details.expectedSeq)} of disk ${this.source.diskId} but the oldest log here is ${log.seq}; the disk needs a resync`, { cause: err });
      }
      throw err;
    } finally {
      this.sending.delete(log.file);
      // Forgotten while it was sent: its memory goes back now.
      if (!this.hashes.has(log.file)) this.release(log.file);
    }
    this.shippedBytesTotal += sizeBytes;
    this.options.metrics.shippedBytesTotal.inc({ disk: this.source.diskId, hop: 'source' }, sizeBytes);
    report('done', sizeBytes);
  }
}
