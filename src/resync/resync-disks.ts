import { openDisk } from '../targets/disk-spec';
import type { DiskTarget } from '../targets/disk-target';
import { BlockHasher } from './block-hasher';
import type { ExtentSource } from './extent-list';
import { runResync, type ResyncOptions, type ResyncResult } from './resync-engine';
import { ResyncJob } from './resync-job';
import { inProcessChannel, ResyncPeer, ResyncTargetService, type ResyncChannel } from './resync-peer';

/** How to resync two disk specs; everything but the specs is optional. */
export interface ResyncDisksOptions extends Pick<ResyncOptions, 'blockSizeBytes' | 'coarseBlockBytes' | 'windowBytes' | 'concurrency' | 'checkpointIntervalMs' | 'checkpointIntervalBytes' | 'readRateBytesPerSec' | 'settleRounds' | 'onProgress' | 'progressIntervalMs' | 'signal' | 'clock'> {
  /** Where progress is saved so an interrupted resync resumes; none when omitted. */
  readonly statePath?: string;
  readonly extents?: ExtentSource;
  /** Create the target with the source's size and copy every non-zero block (no comparison). */
  readonly create?: boolean;
  /**
   * The target side's channel, for a target across the network. When
   * omitted the target spec is opened here and served in process.
   */
  readonly channel?: ResyncChannel;
  /** Receives the job before the resync starts, so writes during it can be noted (job.noteWrite). */
  readonly onJob?: (job: ResyncJob) => void;
}

/**
 * Resyncs TARGET to SOURCE, both given as disk specs: opens them, runs the
 * engine over an in-process seam (or `channel`), and closes them again,
 * whatever happens.
 */
export async function resyncDisks(sourceSpec: string, targetSpec: string, options: ResyncDisksOptions = {}): Promise<ResyncResult> {
  const hasher = await BlockHasher.create();
  const job = await ResyncJob.open(options.statePath, hasher);
  options.onJob?.(job);
  const opened: DiskTarget[] = [];
  try {
    const source = await openDisk(sourceSpec, { readOnly: true });
    opened.push(source);
    let channel = options.channel;
    // A full copy sends only the source's non-zero blocks, so it is right only
    // for a target that reads as zeroes: a file or sparse image just made. A
    // block device "created" over is used as it is, old data and all (a
    // recycled LUN), and is compared like any existing target.
    let fullCopy = options.create === true;
    if (channel === undefined) {
      const target = await openDisk(targetSpec, options.create === true ? { create: { sizeBytes: source.sizeBytes } } : {});
      opened.push(target);
      fullCopy &&= target.capabilities.sparse;
      channel = inProcessChannel(new ResyncTargetService(target, hasher));
    }
    return await runResync({ ...options, source, peer: new ResyncPeer(channel), hasher, job, fullCopy });
  } finally {
    // Close the target first: its close flushes, and the source is read-only.
    try {
      for (const disk of opened.reverse()) await disk.close();
    } finally {
      await job.close();
    }
  }
}

/**
 * Original-location failback: the on-prem disk still exists, so it is
 * resynced in place from the recovered disk and only the blocks that changed
 * since failover travel.
 */
export function failbackOriginalLocation(recoveredSpec: string, originalSpec: string, options: Omit<ResyncDisksOptions, 'create'> = {}): Promise<ResyncResult> {
  return resyncDisks(recoveredSpec, originalSpec, { ...options, create: false });
}

/**
 * Alternate-location failback: a new disk (e.g. `vmdk:PATH`) is created with
 * the recovered disk's size and every non-zero block is copied into it.
 */
export function failbackAlternateLocation(recoveredSpec: string, newSpec: string, options: Omit<ResyncDisksOptions, 'create' | 'extents'> = {}): Promise<ResyncResult> {
  return resyncDisks(recoveredSpec, newSpec, { ...options, create: true });
}
