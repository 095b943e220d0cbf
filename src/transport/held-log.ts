import { BlockrelayError } from '../retry/blockrelay-error';

/**
 * Received logs held in memory instead of a temp file ("apply from memory",
 * the master target's apply on receipt).
 *
 * A log applied on receipt was never durable at the master target (the
 * sender keeps it until the answer), so its staged copy needs no file: it is
 * decoded into one buffer, verified there and applied from it, and written
 * to a file only when it must be spooled after all (log-spool.ts). That
 * saves writing the log to the page cache and reading it back twice (verify,
 * apply), three passes of every byte through the kernel.
 *
 * The rest of the chain names a log by its file (`SpoolEntry.file`, the
 * LogOps seam that the retention hooks also call), so a held log is named
 * by the temp path it would have been staged at, which no file takes while
 * it is held: `heldLogBytes(name)` is how LogOps implementations find it.
 */
const held = new Map<string, { readonly bytes: Buffer; verified: unknown }>();

/** Makes `bytes` the content of the log named `name` until `releaseHeldLog(name)`. */
export function holdLog(name: string, bytes: Buffer): void {
  if (held.has(name)) throw new BlockrelayError('BR_INTERNAL', `a log named ${name} is already held in memory`);
  held.set(name, { bytes, verified: undefined });
}

/** The bytes of a log held in memory under `name`, or undefined when it is a file. */
export function heldLogBytes(name: string): Buffer | undefined {
  return held.get(name)?.bytes;
}

/**
 * Keeps what a full verification of the held log `name` found (its decoded
 * entries), so the walks after it (ranges, apply) need not decode the
 * metadata again. Kept only while `bytes` is still what `name` holds, and
 * dropped with the log: a held buffer never changes while held, and a name
 * held again later starts without one.
 */
export function rememberHeldLogVerification(name: string, bytes: Buffer, verified: unknown): void {
  const h = held.get(name);
  if (h !== undefined && h.bytes === bytes) h.verified = verified;
}

/** What `rememberHeldLogVerification` kept for the held log `name`, if anything. */
export function heldLogVerification(name: string): unknown {
  return held.get(name)?.verified;
}

export function releaseHeldLog(name: string): void {
  held.delete(name);
}

/**
 * Bytes of received logs one hop may hold in memory at once. Two logs of
 * the e2e bench's size (about 212 MB at 200 MB/s with 1 s cuts) fit: one
 * being applied while the next streams in behind it. A log that does not
 * fit is staged to a temp file as before.
 */
export const HELD_LOG_MEMORY_MAX_BYTES = 512 * 1024 * 1024;

/**
 * Buffers are allocated in multiples of this, so logs of similar sizes
 * reuse one another's buffers: cut every second, logs vary by tens of MB,
 * and a spare a little too small for the next log costs a fresh buffer,
 * whose first touch faults in every page (about 1 ms of system time per
 * MB, more than the temp file it replaces).
 */
export const HELD_LOG_ALLOCATION_STEP_BYTES = 64 * 1024 * 1024;

/**
 * The memory budget for held logs, with its buffers kept for reuse: a fresh
 * buffer of hundreds of MB is mapped and zero-filled by the kernel page by
 * page on first touch, which costs about as much system time as the temp
 * file it replaces. Spare buffers count against the bound too, and are
 * dropped (largest first) when a log needs room they hold.
 */
export class LogMemory {
  private inUseBytes = 0;
  private readonly spares: Buffer[] = [];
  /** Buffers allocated so far (not reused): how often a log paid for fresh pages. */
  allocations = 0;

  constructor(readonly maxBytes: number = HELD_LOG_MEMORY_MAX_BYTES) {
    if (!Number.isSafeInteger(maxBytes) || maxBytes < 0) throw new BlockrelayError('BR_CONFIG_INVALID', `held log memory bound ${maxBytes} is not a byte count`);
  }

  /** Bytes taken by buffers in use plus spares. */
  get heldBytes(): number {
    return this.inUseBytes + this.spares.reduce((n, b) => n + b.length, 0);
  }

  /**
   * A buffer of exactly `sizeBytes` (a view of one that may be larger), or
   * undefined when the bound leaves no room: the caller stages to a file.
   */
  take(sizeBytes: number): Buffer | undefined {
    if (sizeBytes <= 0 || sizeBytes > this.maxBytes) return undefined;
    // The smallest spare that is large enough.
    let best = -1;
    for (let i = 0; i < this.spares.length; i++) {
      const b = this.spares[i]!;
      if (b.length >= sizeBytes && (best < 0 || b.length < this.spares[best]!.length)) best = i;
    }
    if (best >= 0) {
      const [buffer] = this.spares.splice(best, 1);
      this.inUseBytes += buffer!.length;
      return buffer!.subarray(0, sizeBytes);
    }
    const allocBytes = Math.min(this.maxBytes, Math.ceil(sizeBytes / HELD_LOG_ALLOCATION_STEP_BYTES) * HELD_LOG_ALLOCATION_STEP_BYTES);
    this.spares.sort((a, b) => a.length - b.length);
    while (this.heldBytes + allocBytes > this.maxBytes && this.spares.length > 0) this.spares.pop();
    if (this.heldBytes + allocBytes > this.maxBytes) return undefined;
    const buffer = Buffer.allocUnsafeSlow(allocBytes);
    this.allocations++;
    this.inUseBytes += buffer.length;
    return buffer.subarray(0, sizeBytes);
  }

  /** Returns a buffer from `take()` (once; nothing may use it after). */
  give(view: Buffer): void {
    // The view starts its ArrayBuffer, which is the whole allocation (allocUnsafeSlow: not pooled).
    const whole = Buffer.from(view.buffer);
    this.inUseBytes -= whole.length;
    this.spares.push(whole);
  }
}
