import type { Logger } from '../daemon/logger';
import type { Metrics } from '../daemon/metrics';
import type { Clock } from '../platform/clock';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import type { DiskHealth } from '../retry/health';
import type { RetryPolicy } from '../retry/retry-policy';
import { DiskDrain } from './disk-drain';
import { sendLog, type PeerOptions } from './log-client';
import { hashFile } from './log-spool';
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
}

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
          this.hashes.delete(log.file);
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
  }

  /** The log's hash: computed once, shared by its uploads (a failed computation is forgotten). */
  private hashOf(file: string): Promise<LogHash> {
    let hashed = this.hashes.get(file);
    if (hashed === undefined) {
      const computing = hashFile(file);
      hashed = computing;
      this.hashes.set(file, computing);
      computing.catch(() => {
        if (this.hashes.get(file) === computing) this.hashes.delete(file);
      });
    }
    return hashed;
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
    for (const file of [...this.hashes.keys()]) if (!sealed.has(file)) this.hashes.delete(file);
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
    try {
      await sendLog(this.options.peer, envelope, log.file, { onBodySent });
    } catch (err) {
      // A retry hashes the file afresh: nothing cached outlives a failed upload.
      this.hashes.delete(log.file);
      // An overflow may fold the log away while it is being sent (the upload
      // then breaks off): it needs no retry, a resync log carries its extents.
      if (!(await this.source.sealedLogs()).some((l) => l.seq === log.seq)) return;
      // A resync log that names the log it follows is refused as a gap only
      // until that log is in: waiting is the answer, not a resync.
      if (isBlockrelayError(err) && err.code === 'BR_SEQ_GAP' && !(log.resync === true && log.follows !== undefined)) {
        throw new BlockrelayError('BR_DISK_CRITICAL', `process server expects log ${String(err.details.expectedSeq)} of disk ${this.source.diskId} but the oldest log here is ${log.seq}; the disk needs a resync`, { cause: err });
      }
      throw err;
    }
    this.shippedBytesTotal += sizeBytes;
    this.options.metrics.shippedBytesTotal.inc({ disk: this.source.diskId, hop: 'source' }, sizeBytes);
    report('done', sizeBytes);
  }
}
