import { BlockrelayError } from '../retry/blockrelay-error';
import type { DiskTarget } from '../targets/disk-target';
import { HRL_PREVIOUS_UNIQUE_ID_OFFSET } from './hrl-format';
import { HRL_READ_CHUNK_BYTES, HrlLogFile, hrlDamage, type HrlEntryTable, type HrlVerifiedLog } from './hrl-reader';

let sharedChunk: Buffer | undefined;
let sharedChunkBusy = false;

export interface HrlApplyOptions {
  /** Require each log's PreviousUniqueId to equal the UniqueId of the log before it (default true). */
  readonly checkChain?: boolean;
  /**
   * Check every payload against its DataChecksum before applying (default
   * true). Structures, bounds and entry checksums are always checked; a
   * caller that verified the payloads of this very file already (the
   * transport does, before a log becomes durable in its spool) may skip the
   * second full read.
   */
  readonly checkPayloads?: boolean;
  /** Called after each log is applied (used by callers that record progress). */
  readonly onLogApplied?: (log: HrlVerifiedLog) => void;
}


/**
 * A log to apply: a file, or a log held in memory (`bytes` is its whole
 * content, `path` names it in errors). `verified` is a full verification of
 * those very bytes made with `collectEntries` (the transport's, on
 * receipt): it is used instead of verifying again, with only the target's
 * own bounds (size, alignment) checked against its entry table.
 */
export type HrlApplyInput = string | { readonly path: string; readonly bytes: Buffer; readonly verified?: HrlVerifiedLog };

export interface HrlApplyResult {
  readonly logs: readonly HrlVerifiedLog[];
  readonly entriesApplied: number;
  readonly bytesApplied: number;
}

/**
 * Applies logs to a disk, all or nothing with respect to validation: every
 * log is verified completely (structure, checksums, payloads, disk bounds,
 * target alignment, chain order) before the first byte is written. Entries
 * are written in apply order, payloads in chunks of at most
 * HRL_READ_CHUNK_BYTES, and the target is flushed at the end.
 *
 * The log files stay open from verification to apply; a file replaced or
 * rewritten in between by another process is outside this guarantee. A log
 * held in memory is written to the target from views of its buffer, which
 * must not change until this resolves.
 */
export async function applyHrlLogs(target: DiskTarget, files: readonly HrlApplyInput[], options: HrlApplyOptions = {}): Promise<HrlApplyResult> {
  if (target.capabilities.readOnly) {
    throw new BlockrelayError('BR_TARGET_READ_ONLY', `${target.spec} is read-only; cannot apply logs`, { details: { spec: target.spec } });
  }
  const opened: HrlLogFile[] = [];
  try {
    const verified: HrlVerifiedLog[] = [];
    for (const file of files) {
      const log = typeof file === 'string' ? await HrlLogFile.open(file) : HrlLogFile.fromBytes(file.path, file.bytes);
      opened.push(log);
      const kept = typeof file === 'string' ? undefined : file.verified;
      if (kept?.entryTable !== undefined) {
        checkTargetBounds(log.path, kept.entryTable, target);
        verified.push(kept);
      } else {
        // No entry table kept here: every log is verified before the first
        // write, and tables for a long list of logs would all be alive at
        // once. Each log's table is built when its turn to apply comes.
        verified.push(await log.verify({ diskSizeBytes: target.sizeBytes, alignmentBytes: target.capabilities.alignmentBytes, checkPayloads: options.checkPayloads ?? true }));
      }
    }
    if (options.checkChain ?? true) {
      for (let i = 1; i < verified.length; i++) {
        const prev = verified[i - 1]!.header;
        const cur = verified[i]!.header;
        if (cur.previousUniqueId !== prev.uniqueId) {
          throw hrlDamage('BR_HRL_CHAIN_BROKEN', opened[i]!.path, HRL_PREVIOUS_UNIQUE_ID_OFFSET, `PreviousUniqueId ${cur.previousUniqueId} is not the UniqueId ${prev.uniqueId} of ${opened[i - 1]!.path}`, { expected: prev.uniqueId });
        }
      }
    }
    let entries = 0;
    let bytes = 0;
    // One chunk kept across applies (a fresh one per log is 4 MiB of garbage); an apply running meanwhile takes its own.
    const shared = !sharedChunkBusy;
    const chunk = shared ? (sharedChunk ??= Buffer.allocUnsafeSlow(HRL_READ_CHUNK_BYTES)) : Buffer.allocUnsafe(HRL_READ_CHUNK_BYTES);
    if (shared) sharedChunkBusy = true;
    try {
      for (let i = 0; i < opened.length; i++) {
        const log = opened[i]!;
        // Payloads lie back to back in the file: entries whose payloads
        // follow one another are read together, up to a chunk, then
        // written one by one in apply order (one read instead of one per
        // entry: a log of 64 KiB writes has thousands).
        const table = await log.entryTable(verified[i]!);
        const { byteOffsets, dataLengths, payloadFileOffsets } = table;
        // Entries [spanFrom, spanTo) of the table, payloads back to back.
        let spanFrom = 0;
        let spanTo = 0;
        let spanStart = 0;
        let spanBytes = 0;
        const applySpan = async (): Promise<void> => {
          if (spanTo === spanFrom) return;
          // A log in memory is written from views of its own buffer, no copy.
          const data = await log.view(spanStart, spanBytes, 'payload', chunk);
          let at = 0;
          // DiskTarget.writeMany where the target has it (the sparse VMDK: one thread-pool job).
          if (target.writeMany !== undefined) {
            // One call (one thread-pool job on a VMDK) for the whole span.
            const requests: Array<{ offset: number; data: Buffer }> = [];
            for (let e = spanFrom; e < spanTo; e++) {
              const n = dataLengths[e]!;
              if (n > 0) requests.push({ offset: byteOffsets[e]!, data: data.subarray(at, at + n) });
              at += n;
              entries++;
              bytes += n;
            }
            await target.writeMany(requests);
          } else {
            for (let e = spanFrom; e < spanTo; e++) {
              // The target may keep the buffer until the write completes; the
              // next read waits for that, so one chunk buffer is enough.
              const n = dataLengths[e]!;
              if (n > 0) await target.write(byteOffsets[e]!, data.subarray(at, at + n));
              at += n;
              entries++;
              bytes += n;
            }
          }
          spanFrom = spanTo;
          spanBytes = 0;
        };
        for (let e = 0; e < table.count; e++) {
          const payloadAt = payloadFileOffsets[e]!;
          const n = dataLengths[e]!;
          if (spanTo > spanFrom && (payloadAt !== spanStart + spanBytes || spanBytes + n > chunk.length)) await applySpan();
          if (n > chunk.length) {
            for (let done = 0; done < n; ) {
              const len = Math.min(chunk.length, n - done);
              const data = await log.view(payloadAt + done, len, 'payload', chunk);
              await target.write(byteOffsets[e]! + done, data.subarray(0, len));
              done += len;
            }
            entries++;
            bytes += n;
            spanFrom = spanTo = e + 1;
            continue;
          }
          if (spanTo === spanFrom) spanStart = payloadAt;
          spanTo = e + 1;
          spanBytes += n;
        }
        await applySpan();
        options.onLogApplied?.(verified[i]!);
      }
    } finally {
      if (shared) sharedChunkBusy = false;
    }
    await target.flush();
    return { logs: verified, entriesApplied: entries, bytesApplied: bytes };
  } finally {
    for (const log of opened) await log.close();
  }
}

/**
 * The target's own bounds over a log verified without them (its size and
 * alignment): the same coded errors `verify` raises, naming the entry.
 */
function checkTargetBounds(file: string, table: HrlEntryTable, target: DiskTarget): void {
  const align = target.capabilities.alignmentBytes;
  for (let i = 0; i < table.count; i++) {
    const byteOffset = table.byteOffsets[i]!;
    const dataLength = table.dataLengths[i]!;
    const entryOffset = table.entryFileOffsets[i]!;
    if (byteOffset + dataLength > target.sizeBytes) {
      throw hrlDamage('BR_HRL_PAST_DISK_END', file, entryOffset, `entry writes [${byteOffset}, ${byteOffset + dataLength}) past the disk end ${target.sizeBytes}`, { entryOffset, byteOffset, dataLength, diskSizeBytes: target.sizeBytes });
    }
    if (byteOffset % align !== 0 || dataLength % align !== 0) {
      throw hrlDamage('BR_HRL_MISALIGNED', file, entryOffset, `entry [${byteOffset}, +${dataLength}) is not aligned to ${align} bytes`, { entryOffset, alignmentBytes: align });
    }
  }
}
