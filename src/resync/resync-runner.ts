import type { Extent } from '../targets/disk-target';
import type { ResyncProgress, ResyncResult } from './resync-engine';
import { resyncDisks, type ResyncDisksOptions } from './resync-disks';
import type { ResyncJob } from './resync-job';
import type { ResyncRequest, ResyncRunner } from './resync-schedule';

/** How one disk is resynced: its two specs and where its progress is kept. */
export interface DiskResyncPlan {
  readonly sourceSpec: string;
  readonly targetSpec: string;
  /** The disk's state file: a stopped resync (office hours, outage) resumes from it. */
  readonly statePath: string;
  readonly options?: Pick<ResyncDisksOptions, 'blockSizeBytes' | 'readRateBytesPerSec' | 'channel' | 'concurrency' | 'settleRounds'>;
}

/** What the daemon hears about while a disk resyncs. */
export interface DiskResyncHooks {
  /**
   * The job of a starting resync: the tap reports writes made during it
   * with `job.noteWrite(offset, length)` until the resync ends.
   */
  readonly onStart?: (diskId: string, job: ResyncJob) => void;
  readonly onProgress?: (diskId: string, progress: ResyncProgress) => void;
  /** The resync finished: the disk may leave its resync state and apply the delta logs written since it started. */
  readonly onDone?: (diskId: string, result: ResyncResult) => void;
}

/**
 * The glue between ResyncScheduler and the engine: a runner that resyncs a
 * disk per its plan, compares only the request's extents when it carries a
 * dirty map, keeps progress in the disk's state file (so a resync stopped
 * when office hours begin continues in the evening), and tells the daemon.
 */
export function diskResyncRunner(plan: (diskId: string) => DiskResyncPlan, hooks: DiskResyncHooks = {}): ResyncRunner {
  return async (request: ResyncRequest, signal: AbortSignal): Promise<void> => {
    const p = plan(request.diskId);
    const extents: readonly Extent[] | undefined = request.extents;
    const result = await resyncDisks(p.sourceSpec, p.targetSpec, {
      ...p.options,
      statePath: p.statePath,
      ...(extents === undefined ? {} : { extents }),
      signal,
      onJob: (job) => hooks.onStart?.(request.diskId, job),
      onProgress: (progress) => hooks.onProgress?.(request.diskId, progress),
    });
    hooks.onDone?.(request.diskId, result);
  };
}
