import { systemClock, type Clock } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import type { DiskTarget } from './disk-target';

/** Bytes read from the source at once; two chunks are in memory at most (one read ahead while one is written). */
export const COPY_CHUNK_BYTES = 4 * 1024 * 1024;
/** Granularity at which all-zero data is recognised and skipped (a VMDK grain). */
export const ZERO_SCAN_BYTES = 64 * 1024;
const ZERO_BLOCK = Buffer.alloc(ZERO_SCAN_BYTES);

export interface CopyProgress {
  readonly doneBytes: number;
  readonly totalBytes: number;
  /** Bytes actually written to the target so far. */
  readonly writtenBytes: number;
  readonly elapsedMs: number;
}

export interface CopyOptions {
  /**
   * The target already reads as zeroes everywhere (a freshly created sparse
   * disk), so zero ranges need no write at all and holes stay holes.
   * Otherwise zero ranges become writeZeroes calls.
   */
  readonly targetIsZero: boolean;
  readonly onProgress?: (p: CopyProgress) => void;
  readonly progressIntervalMs?: number;
  readonly clock?: Clock;
}

export interface CopyResult {
  readonly sizeBytes: number;
  /** Bytes read from the source's data extents. */
  readonly dataBytes: number;
  /** Bytes written as data to the target. */
  readonly writtenBytes: number;
  /** Bytes left as holes (or written as zero ranges): zero extents plus all-zero blocks. */
  readonly zeroBytes: number;
  readonly durationMs: number;
}

function isZero(buf: Buffer): boolean {
  return buf.equals(buf.length === ZERO_SCAN_BYTES ? ZERO_BLOCK : ZERO_BLOCK.subarray(0, buf.length));
}

/**
 * Copies every byte of `from` to `to` (same size). Zero extents of the
 * source are never read; data extents are read in 4 MiB chunks, and 64 KiB
 * blocks that are all zeroes are not written, so holes stay holes where the
 * target can express them. The next chunk is read while the previous one
 * is written; memory stays at two chunks. Ends with a flush of `to`.
 */
export async function copyDisk(from: DiskTarget, to: DiskTarget, options: CopyOptions): Promise<CopyResult> {
  if (from.sizeBytes !== to.sizeBytes) {
    throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `cannot copy ${from.spec} (${from.sizeBytes} bytes) to ${to.spec} (${to.sizeBytes} bytes)`, { details: { from: from.spec, to: to.spec } });
  }
  const clock = options.clock ?? systemClock;
  const started = clock.now();
  const intervalMs = options.progressIntervalMs ?? 1000;
  let lastReportMs = started;
  let doneBytes = 0;
  let dataBytes = 0;
  let writtenBytes = 0;
  let zeroBytes = 0;
  const report = (force: boolean): void => {
    const now = clock.now();
    if (options.onProgress === undefined || (!force && now - lastReportMs < intervalMs)) return;
    lastReportMs = now;
    options.onProgress({ doneBytes, totalBytes: from.sizeBytes, writtenBytes, elapsedMs: now - started });
  };

  const zeroRange = async (offset: number, length: number): Promise<void> => {
    zeroBytes += length;
    if (!options.targetIsZero) await to.writeZeroes(offset, length);
  };

  const writeChunk = async (offset: number, data: Buffer): Promise<void> => {
    let runStart = -1;
    let zeroStart = -1;
    const end = data.length;
    // Steps are clamped to `end` so the last pass always lands on it exactly
    // and flushes the final run, whatever the chunk's length.
    for (let at = 0; ; at = Math.min(at + ZERO_SCAN_BYTES, end)) {
      const zero = at < end ? isZero(data.subarray(at, Math.min(at + ZERO_SCAN_BYTES, end))) : undefined;
      if (zero !== false && runStart >= 0) {
        await to.write(offset + runStart, data.subarray(runStart, at < end ? at : end));
        writtenBytes += (at < end ? at : end) - runStart;
        runStart = -1;
      }
      if (zero !== true && zeroStart >= 0) {
        await zeroRange(offset + zeroStart, (at < end ? at : end) - zeroStart);
        zeroStart = -1;
      }
      if (zero === false && runStart < 0) runStart = at;
      if (zero === true && zeroStart < 0) zeroStart = at;
      if (at >= end) break;
    }
    doneBytes += data.length;
    report(false);
  };

  let pending: Promise<void> = Promise.resolve();
  for await (const extent of from.extents(0, from.sizeBytes)) {
    if (extent.zero) {
      await pending;
      await zeroRange(extent.offset, extent.length);
      doneBytes += extent.length;
      report(false);
      continue;
    }
    for (let at = extent.offset; at < extent.offset + extent.length; at += COPY_CHUNK_BYTES) {
      const n = Math.min(COPY_CHUNK_BYTES, extent.offset + extent.length - at);
      const data = await from.read(at, n);
      dataBytes += n;
      await pending;
      pending = writeChunk(at, data);
      // Marked handled here; the next `await pending` still throws.
      pending.catch(() => undefined);
    }
  }
  await pending;
  await to.flush();
  report(true);
  return { sizeBytes: from.sizeBytes, dataBytes, writtenBytes, zeroBytes, durationMs: clock.now() - started };
}
