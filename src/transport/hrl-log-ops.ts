import type { DiskTarget, Extent } from '../targets/disk-target';
import { applyHrlLogs } from '../tracking/hrl-apply';
import { HrlLogFile, type HrlVerifiedLog } from '../tracking/hrl-reader';
import { heldLogBytes, heldLogVerification, rememberHeldLogVerification } from './held-log';
import type { LogOps } from './log-ops';

/** Opens a log by name: from memory when it is held there (held-log.ts), else the file. */
async function openLog(file: string): Promise<HrlLogFile> {
  const bytes = heldLogBytes(file);
  return bytes === undefined ? HrlLogFile.open(file) : HrlLogFile.fromBytes(file, bytes);
}

/** The full verification kept for a log held in memory, with its entry table (see `verify`). */
function keptVerification(file: string): HrlVerifiedLog | undefined {
  const v = heldLogVerification(file) as HrlVerifiedLog | undefined;
  return v?.entryTable === undefined ? undefined : v;
}

/**
 * The transport's LogOps over [MS-HRL] logs (src/tracking). `verify` checks
 * everything, payloads included, and runs on every log before it becomes
 * durable in a spool; `ranges` and `apply` then work on that same immutable
 * file, so they re-check structures and bounds but not every payload again
 * (a second and third full read of each log on the master target's path).
 * A log the master target holds in memory (held-log.ts) is named like a
 * file and read from its buffer; its metadata is decoded once, by `verify`,
 * into an entry table that `ranges` and `apply` walk (the buffer cannot
 * change while held), instead of three walks each making an object per
 * entry.
 */
export const hrlLogOps: LogOps = {
  async verify(file: string, diskSizeBytes: number | undefined): Promise<void> {
    const held = heldLogBytes(file);
    const log = held === undefined ? await HrlLogFile.open(file) : HrlLogFile.fromBytes(file, held);
    try {
      const verified = await log.verify({ ...(diskSizeBytes === undefined ? {} : { diskSizeBytes }), collectEntries: held !== undefined });
      if (held !== undefined) rememberHeldLogVerification(file, held, verified);
    } finally {
      await log.close();
    }
  },

  async ranges(file: string): Promise<Extent[]> {
    const log = await openLog(file);
    try {
      const table = await log.entryTable(keptVerification(file) ?? (await log.verify({ checkPayloads: false })));
      const out: Extent[] = new Array<Extent>(table.count);
      for (let i = 0; i < table.count; i++) out[i] = { offset: table.byteOffsets[i]!, length: table.dataLengths[i]! };
      return out;
    } finally {
      await log.close();
    }
  },

  async apply(file: string, target: DiskTarget): Promise<{ entries: number; bytes: number }> {
    const bytes = heldLogBytes(file);
    const verified = bytes === undefined ? undefined : keptVerification(file);
    const input = bytes === undefined ? file : { path: file, bytes, ...(verified === undefined ? {} : { verified }) };
    const result = await applyHrlLogs(target, [input], { checkChain: false, checkPayloads: false });
    return { entries: result.entriesApplied, bytes: result.bytesApplied };
  },
};
