import type { DiskTarget, Extent } from '../targets/disk-target';
import { applyHrlLogs } from '../tracking/hrl-apply';
import { HrlLogFile } from '../tracking/hrl-reader';
import { heldLogBytes } from './held-log';
import type { LogOps } from './log-ops';

/** Opens a log by name: from memory when it is held there (held-log.ts), else the file. */
async function openLog(file: string): Promise<HrlLogFile> {
  const bytes = heldLogBytes(file);
  return bytes === undefined ? HrlLogFile.open(file) : HrlLogFile.fromBytes(file, bytes);
}

/**
 * The transport's LogOps over [MS-HRL] logs (src/tracking). `verify` checks
 * everything, payloads included, and runs on every log before it becomes
 * durable in a spool; `ranges` and `apply` then work on that same immutable
 * file, so they re-check structures and bounds but not every payload again
 * (a second and third full read of each log on the master target's path).
 * A log the master target holds in memory (held-log.ts) is named like a
 * file and read from its buffer.
 */
export const hrlLogOps: LogOps = {
  async verify(file: string, diskSizeBytes: number | undefined): Promise<void> {
    const log = await openLog(file);
    try {
      await log.verify(diskSizeBytes === undefined ? {} : { diskSizeBytes });
    } finally {
      await log.close();
    }
  },

  async ranges(file: string): Promise<Extent[]> {
    const log = await openLog(file);
    try {
      const verified = await log.verify({ checkPayloads: false });
      const out: Extent[] = [];
      for await (const entry of log.entries(verified)) out.push({ offset: entry.byteOffset, length: entry.dataLength });
      return out;
    } finally {
      await log.close();
    }
  },

  async apply(file: string, target: DiskTarget): Promise<{ entries: number; bytes: number }> {
    const bytes = heldLogBytes(file);
    const result = await applyHrlLogs(target, [bytes === undefined ? file : { path: file, bytes }], { checkChain: false, checkPayloads: false });
    return { entries: result.entriesApplied, bytes: result.bytesApplied };
  },
};
