import type { DiskTarget, Extent } from '../targets/disk-target';
import { applyHrlLogs } from '../tracking/hrl-apply';
import { HrlLogFile, verifyHrlLog } from '../tracking/hrl-reader';
import type { LogOps } from './log-ops';

/**
 * The transport's LogOps over [MS-HRL] logs (src/tracking). `verify` checks
 * everything, payloads included, and runs on every log before it becomes
 * durable in a spool; `ranges` and `apply` then work on that same immutable
 * file, so they re-check structures and bounds but not every payload again
 * (a second and third full read of each log on the master target's path).
 */
export const hrlLogOps: LogOps = {
  async verify(file: string, diskSizeBytes: number | undefined): Promise<void> {
    await verifyHrlLog(file, diskSizeBytes === undefined ? {} : { diskSizeBytes });
  },

  async ranges(file: string): Promise<Extent[]> {
    const log = await HrlLogFile.open(file);
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
    const result = await applyHrlLogs(target, [file], { checkChain: false, checkPayloads: false });
    return { entries: result.entriesApplied, bytes: result.bytesApplied };
  },
};
