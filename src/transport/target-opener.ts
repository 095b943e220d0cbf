import * as fs from 'node:fs';
import { BlockrelayError } from '../retry/blockrelay-error';
import { openDisk, parseDiskSpec } from '../targets/disk-spec';
import type { DiskTarget } from '../targets/disk-target';

/**
 * Opens a replication target for writing, creating it at the protected
 * disk's size on the first log. A target that exists must have that size:
 * applying a disk's logs to a smaller or larger disk is an invalid target
 * state, not something to paper over.
 */
export async function openOrCreateTarget(spec: string, sizeBytes: number): Promise<DiskTarget> {
  const parsed = parseDiskSpec(spec);
  // Written at the churn's rate and read back only for pre-images and
  // resync: its pages leave the cache once durable (OpenOptions.pageCache).
  const pageCache = 'drop-durable';
  let exists = true;
  if (parsed.kind !== 'blob' && parsed.kind !== 'nbd') exists = fs.existsSync(parsed.path);
  let target: DiskTarget;
  if (exists) {
    try {
      target = await openDisk(spec, { pageCache });
    } catch (err) {
      if (parsed.kind !== 'blob' || (err as { code?: string }).code !== 'BR_FILE_NOT_FOUND' && !/not ?found|does not exist/i.test((err as Error).message)) throw err;
      target = await openDisk(spec, { create: { sizeBytes }, pageCache });
    }
  } else {
    target = await openDisk(spec, { create: { sizeBytes }, pageCache });
  }
  if (target.sizeBytes !== sizeBytes) {
    await target.close();
    throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `target ${spec} holds ${target.sizeBytes} bytes but the protected disk has ${sizeBytes}`, { details: { spec } });
  }
  return target;
}
