import { BlockrelayError } from '../retry/blockrelay-error';

/** Bounds on records an export lets run ahead of its replies. */
export interface RecordQueueLimits {
  /** Records in flight before a reply waits for its own record. */
  readonly maxRecords: number;
  /** Payload bytes of records in flight before a reply waits for its own record. */
  readonly maxBytes: number;
}

export const DEFAULT_RECORD_QUEUE_LIMITS: RecordQueueLimits = {
  maxRecords: 1024,
  maxBytes: 64 * 1024 * 1024,
};

/**
 * The records an export has handed to its recorder and that have not
 * finished yet.
 *
 * The tap answers a write once the disk has it and its record call has been
 * made (the call order fixes the log order), without waiting for the record
 * to reach the log file: an NBD write is only durable after FLUSH or FUA
 * anyway, and those wait for every earlier record. This keeps the log's file
 * I/O off the reply path. The queue bounds how far records may run ahead
 * (beyond the bounds a reply waits for its record, which pushes back on the
 * client), and remembers a failed record so the next FLUSH fails instead of
 * reporting a lost log entry as durable. A failure is sticky: once a record
 * is lost, the log no longer describes the disk.
 */
export class RecordQueue {
  private readonly pending = new Set<Promise<void>>();
  private pendingBytes = 0;
  private failure: unknown;

  constructor(
    private readonly exportName: string,
    private readonly limits: RecordQueueLimits,
    private readonly warn: (message: string, details?: Record<string, unknown>) => void,
  ) {}

  /** Records in flight. */
  get size(): number {
    return this.pending.size;
  }

  /**
   * Tracks what a record call returned. Returns a promise the caller must
   * await before replying when the queue is over its bounds, else undefined.
   * `onSettled` runs once the record no longer needs its data (at once for a
   * synchronous recorder).
   */
  track(recorded: void | Promise<void>, bytes: number, onSettled?: () => void): Promise<void> | undefined {
    if (recorded === undefined || typeof (recorded as Promise<void>).then !== 'function') {
      onSettled?.();
      return undefined;
    }
    this.pendingBytes += bytes;
    const settled: Promise<void> = (recorded as Promise<void>).then(
      () => {
        this.pending.delete(settled);
        this.pendingBytes -= bytes;
        onSettled?.();
      },
      (err: unknown) => {
        this.pending.delete(settled);
        this.pendingBytes -= bytes;
        onSettled?.();
        if (this.failure === undefined) {
          this.failure = err;
          this.warn('recording a write failed; FLUSH will fail from now on', {
            export: this.exportName,
            code: (err as { code?: string } | undefined)?.code ?? null,
            message: err instanceof Error ? err.message : String(err),
          });
        }
      },
    );
    this.pending.add(settled);
    return this.pending.size > this.limits.maxRecords || this.pendingBytes > this.limits.maxBytes ? settled : undefined;
  }

  /**
   * Marks the log as no longer describing the disk for a reason outside the
   * recorder: a disk write that failed after its record was made. FLUSH fails
   * from now on, as after a failed record.
   */
  fail(err: unknown, message: string, details: Record<string, unknown>): void {
    if (this.failure !== undefined) return;
    this.failure = err;
    this.warn(message, { export: this.exportName, ...details, message: err instanceof Error ? err.message : String(err) });
  }

  /** Resolves once every record tracked so far has finished (failed ones included). */
  settled(): Promise<void> {
    if (this.pending.size === 0) return Promise.resolve();
    return Promise.all([...this.pending]).then(() => undefined);
  }

  /** Throws the first record failure, if any. */
  throwIfFailed(): void {
    if (this.failure === undefined) return;
    const cause = this.failure;
    throw new BlockrelayError('BR_IO', `a write to export '${this.exportName}' was not recorded in its change log: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
  }
}
