import * as crypto from 'node:crypto';
import * as path from 'node:path';
import { systemClock, type Clock } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import { RetryLoop, type RetryEvent, type RetryPolicy } from '../retry/retry-policy';
import { getDiskState, type PeerOptions } from '../transport/log-client';
import { validateDiskId } from '../transport/transport-protocol';
import { HttpResyncChannel } from './http-resync-channel';
import type { ResyncResult } from './resync-engine';
import { resyncDisks, type ResyncDisksOptions } from './resync-disks';
import { openDisk } from '../targets/disk-spec';

/** How a networked resync reaches the receiving hop and anchors itself. */
export interface NetworkedResyncOptions extends Omit<ResyncDisksOptions, 'channel' | 'create' | 'statePath' | 'clock'> {
  /** The process server (or master target) serving `POST /v1/disks/{disk}/resync`. */
  readonly peer: PeerOptions;
  readonly diskId: string;
  /**
   * Where progress is saved. Required: an outage fails the attempt, and the
   * next attempt resumes from here rather than starting over.
   */
  readonly statePath: string;
  /**
   * Seals the source's active log and returns its sequence number S (the
   * resync follows S; writes from now on are logged and applied after it).
   * Undefined, or resolving undefined: the hop anchors at what it received.
   */
  readonly cut?: () => Promise<number | undefined>;
  readonly retryPolicy?: RetryPolicy;
  readonly clock?: Clock;
  /** Told of each failed attempt (and when the next starts). */
  readonly onRetry?: (event: RetryEvent) => void;
  /** How long to wait for the hop to receive log S before opening the session. */
  readonly anchorWaitMs?: number;
}

export interface NetworkedResyncResult extends ResyncResult {
  readonly diskId: string;
  readonly sessionId: string;
  /** Attempts made, 1 when no failure happened. */
  readonly attempts: number;
  /** The anchor of the attempt that finished (null: the hop's received logs). */
  readonly afterSeq: number | null;
  /**
   * The hop confirmed the finished session. When false (it could not be
   * reached at the very end) the blocks are all there, but the hop treats
   * the disk as mid-resync and offers no new recovery point until a
   * resync completes: run it again (it compares, finds nothing, confirms).
   */
  readonly endConfirmed: boolean;
}

const ANCHOR_POLL_MS = 100;
const DEFAULT_ANCHOR_WAIT_MS = 60_000;
/** Ending a session is best effort; a hop out of reach ends it on its own when idle. */
const END_TIMEOUT_MS = 5_000;

/** The session id of the resync saved at `statePath`: a restarted resync takes over its own session. */
export function sessionIdFor(statePath: string, diskId: string): string {
  return crypto.createHash('sha256').update(`${path.resolve(statePath)}\n${diskId}`).digest('hex').slice(0, 32);
}

const COMPLETE_TRIES = 5;
const COMPLETE_RETRY_MS = 1_000;

/** Tells the hop the resync finished, a few times over a short outage; a finished resync is never redone for it. */
async function completeSession(end: () => Promise<void>, clock: Clock): Promise<boolean> {
  for (let i = 0; i < COMPLETE_TRIES; i++) {
    try {
      await end();
      return true;
    } catch {
      if (i < COMPLETE_TRIES - 1) await new Promise<void>((resolve) => clock.setTimer(resolve, COMPLETE_RETRY_MS));
    }
  }
  return false;
}

/** Waits until the hop holds log `seq` (its next expected sequence is past it). */
async function waitForAnchor(peer: PeerOptions, diskId: string, seq: number, clock: Clock, waitMs: number): Promise<void> {
  const deadline = clock.now() + waitMs;
  for (;;) {
    const state = await getDiskState(peer, diskId);
    if (state.nextSeq !== null && state.nextSeq > seq) return;
    if (clock.now() >= deadline) {
      throw new BlockrelayError('BR_RESYNC_NOT_READY', `the hop has not received log ${seq} of disk ${diskId} within ${waitMs} ms (next expected: ${state.nextSeq ?? 'none'})`, { details: { afterSeq: seq } });
    }
    await new Promise<void>((resolve) => clock.setTimer(resolve, ANCHOR_POLL_MS));
  }
}

/**
 * Resyncs a replicated disk across the network: SOURCE (a disk spec, read
 * only) against the disk's target behind a process server or master
 * target, through `POST /v1/disks/{disk}/resync`. Each attempt cuts the
 * source (S), opens a session anchored at S, and runs the engine from the
 * saved progress. A failed attempt (network outage, hop restart, expired
 * session) is retried under the retry policy; the next attempt opens a new
 * session and resumes at the saved cursor, so only the unfinished windows
 * are compared again. Non-recoverable failures (wrong secret, another
 * session on the disk, size mismatch) end it at once.
 */
export async function networkedResync(sourceSpec: string, options: NetworkedResyncOptions): Promise<NetworkedResyncResult> {
  validateDiskId(options.diskId);
  const clock = options.clock ?? systemClock;
  const sessionId = sessionIdFor(options.statePath, options.diskId);
  const source = await openDisk(sourceSpec, { readOnly: true });
  const diskSizeBytes = source.sizeBytes;
  await source.close();
  let lastAttempt = 0;
  let attempts = 0;
  let afterSeq: number | undefined;
  let endConfirmed = false;
  const { peer, diskId, cut, retryPolicy, onRetry, anchorWaitMs, signal, ...engine } = options;
  const loop = new RetryLoop<ResyncResult>(
    async () => {
      attempts++;
      if (signal?.aborted) throw new BlockrelayError('BR_RETRY_CANCELLED', 'resync stopped on request; progress is saved and the next run resumes');
      afterSeq = cut === undefined ? undefined : await cut();
      if (afterSeq !== undefined) await waitForAnchor(peer, diskId, afterSeq, clock, anchorWaitMs ?? DEFAULT_ANCHOR_WAIT_MS);
      // Attempts increase across restarts too, so a restarted resync supersedes its own stale session.
      lastAttempt = Math.max(lastAttempt + 1, clock.now());
      const channel = new HttpResyncChannel({ peer, diskId, sessionId, attempt: lastAttempt, afterSeq, diskSizeBytes });
      const endSession = (completion?: { taintedThrough: number | undefined }): Promise<void> => new HttpResyncChannel({ peer: { ...peer, timeoutMs: Math.min(peer.timeoutMs ?? END_TIMEOUT_MS, END_TIMEOUT_MS) }, diskId, sessionId, attempt: lastAttempt, afterSeq, diskSizeBytes }).end(completion);
      try {
        const result = await resyncDisks(sourceSpec, `${peer.url}${peer.url.endsWith('/') ? '' : '/'}v1/disks/${diskId}`, { ...engine, ...(signal ? { signal } : {}), clock, statePath: options.statePath, channel });
        // Every block is read: the log sealed now ends the first consistent point; the ones before it do not.
        const sealedAfter = cut === undefined ? undefined : await cut();
        endConfirmed = await completeSession(() => endSession({ taintedThrough: sealedAfter === undefined ? afterSeq : sealedAfter - 1 }), clock);
        return result;
      } catch (err) {
        await endSession().catch(() => undefined);
        throw err;
      } finally {
        channel.close();
      }
    },
    {
      clock,
      ...(retryPolicy ? { policy: retryPolicy } : {}),
      ...(onRetry ? { onFailure: onRetry } : {}),
    },
  );
  const stop = (): void => loop.cancel();
  signal?.addEventListener('abort', stop, { once: true });
  try {
    const result = await loop.run();
    return { ...result, diskId, sessionId, attempts, afterSeq: afterSeq ?? null, endConfirmed };
  } finally {
    signal?.removeEventListener('abort', stop);
  }
}
