import type { DiskTarget, Extent } from '../targets/disk-target';
import { applyHrlLogs } from '../tracking/hrl-apply';
import { HrlLogFile, verifyHrlLog } from '../tracking/hrl-reader';
import type { LogOps } from './log-ops';

/** The transport's LogOps over [MS-HRL] logs (src/tracking). */
export const hrlLogOps: LogOps = {
  async verify(file: string, diskSizeBytes: number | undefined): Promise<void> {
    await verifyHrlLog(file, diskSizeBytes === undefined ? {} : { diskSizeBytes });
  },

  async ranges(file: string): Promise<Extent[]> {
    const log = await HrlLogFile.open(file);
    try {
      const verified = await log.verify();
      const out: Extent[] = [];
      for await (const entry of log.entries(verified)) out.push({ offset: entry.byteOffset, length: entry.dataLength });
      return out;
    } finally {
      await log.close();
    }
  },

  async apply(file: string, target: DiskTarget): Promise<{ entries: number; bytes: number }> {
    const result = await applyHrlLogs(target, [file], { checkChain: false });
    return { entries: result.entriesApplied, bytes: result.bytesApplied };
  },
};
