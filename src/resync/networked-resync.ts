import * as crypto from 'node:crypto';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { systemClock, type Clock } from '../platform/clock';
import { syncDirectory, writeFileDurably } from '../platform/durable-file';
import { BlockrelayError, isBlockrelayError, wrapError } from '../retry/blockrelay-error';
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
  /**
   * The log the source's disk is known to include, given by the caller
   * instead of a cut (the command's `--after-seq S`). Only the first
   * session opened anchors there: once a session has ended, its held logs
   * after S are applied, so later sessions (and a re-anchor after
   * BR_RESYNC_ANCHOR_PASSED) anchor at what the hop received. No log
   * sequence is known when the reads end, so the completion is one
   * without a cut (the hop taints every log it received, and those cut
   * before the last read ended). Ignored when `cut` is given.
   */
  readonly firstAnchor?: number;
  readonly retryPolicy?: RetryPolicy;
  readonly clock?: Clock;
  /** Told of each failed attempt (and when the next starts). */
  readonly onRetry?: (event: RetryEvent) => void;
  /** How long to wait for the hop to receive log S before opening the session. */
  readonly anchorWaitMs?: number;
  /**
   * Without a cut: how far this host's clock may run behind the source's.
   * The completion taints the logs cut up to the end of the last read plus
   * this (default READ_END_SKEW_ALLOWANCE_MS), so a log the source sealed
   * just before that end is tainted although the clocks differ by up to it.
   */
  readonly clockSkewAllowanceMs?: number;
}

export interface NetworkedResyncResult extends ResyncResult {
  readonly diskId: string;
  readonly sessionId: string;
  /** Attempts made, 1 when no failure happened. */
  readonly attempts: number;
  /** The anchor of the attempt that finished (null: the hop's received logs). */
  readonly afterSeq: number | null;
  /**
   * The hop recorded the completion. Always true: a run returns only after
   * that; a lost or failed end is retried under the retry policy (kept
   * durably in `STATE.end` meanwhile, so even a restarted run only confirms
   * it), and a completion the hop can no longer record runs the resync again.
   */
  readonly endConfirmed: boolean;
}

const ANCHOR_POLL_MS = 100;
const DEFAULT_ANCHOR_WAIT_MS = 60_000;
/**
 * Each request that ends a session is bounded in time; the hop answers
 * `ending` within half of it while its end work goes on, and the end is
 * asked again (endSession), so a master target's long end (flush, journal
 * copy of every pre-image) does not fail it. A failed end is retried under
 * the retry policy.
 */
const END_TIMEOUT_MS = 5_000;
/** Opening at an anchor the hop has passed (a log raced in): cut again at once this many times before the retry policy. */
const QUICK_REANCHOR_TRIES = 3;
/**
 * Default clockSkewAllowanceMs: the skew between the resync's host and the
 * source that a completion without a cut tolerates. Hosts kept by NTP are
 * within milliseconds; the cost of the allowance is only that logs cut in
 * the seconds after the last read end no recovery point either.
 */
export const READ_END_SKEW_ALLOWANCE_MS = 5_000;

/** The session id of the resync saved at `statePath`: a restarted resync takes over its own session. */
export function sessionIdFor(statePath: string, diskId: string): string {
  return crypto.createHash('sha256').update(`${path.resolve(statePath)}\n${diskId}`).digest('hex').slice(0, 32);
}

/**
 * A finished resync whose completion the hop has not confirmed yet, kept
 * durably beside the state file (`STATE.end`): every block is compared and
 * flushed and the engine's progress file is gone, so until the hop records
 * the completion only this file says the work was done. The next attempt
 * (or the next run after a crash) sends the completion again rather than
 * comparing the whole disk again.
 */
interface PendingEnd {
  readonly version: 1;
  readonly diskId: string;
  readonly sessionId: string;
  readonly attempt: number;
  readonly afterSeq: number | null;
  readonly taintedThrough: number | null;
  /** Without a cut: when the last read ended (this host's clock) plus the skew allowance, so the hop taints the logs cut before it. */
  readonly readEndMs: number | null;
  readonly result: ResyncResult;
}

export function pendingEndPath(statePath: string): string {
  return `${statePath}.end`;
}

/**
 * The last attempt number used by the resync saved at `statePath`
 * (`STATE.attempt`), saved before each session opens. Attempts must grow
 * across restarts (a newer attempt supersedes the resync's own stale
 * session, and a hop refuses an attempt it saw end), and must not depend
 * on the wall clock, which can step back.
 */
export function attemptPath(statePath: string): string {
  return `${statePath}.attempt`;
}

interface SavedAttempt {
  readonly version: 1;
  readonly diskId: string;
  readonly sessionId: string;
  readonly attempt: number;
}

async function readSavedAttempt(file: string, diskId: string, sessionId: string): Promise<number> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    throw wrapError(err, 'BR_IO', `cannot read ${file}`);
  }
  let parsed: SavedAttempt;
  try {
    parsed = JSON.parse(text) as SavedAttempt;
  } catch (err) {
    throw new BlockrelayError('BR_RESYNC_STATE_CORRUPT', `${file} is not JSON; remove it (the hop tells the next run which attempt to pass)`, { cause: err, details: { path: file } });
  }
  if (parsed.version !== 1 || !Number.isSafeInteger(parsed.attempt) || parsed.attempt < 1) {
    throw new BlockrelayError('BR_RESYNC_STATE_CORRUPT', `${file} has an unknown layout; remove it (the hop tells the next run which attempt to pass)`, { details: { path: file } });
  }
  if (parsed.diskId !== diskId || parsed.sessionId !== sessionId) {
    throw new BlockrelayError('BR_RESYNC_STATE_MISMATCH', `${file} belongs to disk ${parsed.diskId} session ${parsed.sessionId}, not disk ${diskId} session ${sessionId}`, { details: { path: file } });
  }
  return parsed.attempt;
}

async function saveAttempt(file: string, saved: SavedAttempt): Promise<void> {
  try {
    await writeFileDurably(file, JSON.stringify(saved));
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot save ${file}`);
  }
}

async function readPendingEnd(file: string, diskId: string, sessionId: string): Promise<PendingEnd | undefined> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw wrapError(err, 'BR_IO', `cannot read ${file}`);
  }
  let parsed: PendingEnd;
  try {
    parsed = JSON.parse(text) as PendingEnd;
  } catch (err) {
    throw new BlockrelayError('BR_RESYNC_STATE_CORRUPT', `${file} is not JSON; remove it to resync the disk again`, { cause: err, details: { path: file } });
  }
  if (parsed.version !== 1 || !Number.isSafeInteger(parsed.attempt) || (parsed.readEndMs !== null && !Number.isSafeInteger(parsed.readEndMs)) || typeof parsed.result !== 'object' || parsed.result === null || (parsed.taintedThrough !== null && !Number.isSafeInteger(parsed.taintedThrough))) {
    throw new BlockrelayError('BR_RESYNC_STATE_CORRUPT', `${file} has an unknown layout; remove it to resync the disk again`, { details: { path: file } });
  }
  if (parsed.diskId !== diskId || parsed.sessionId !== sessionId) {
    throw new BlockrelayError('BR_RESYNC_STATE_MISMATCH', `${file} belongs to disk ${parsed.diskId} session ${parsed.sessionId}, not disk ${diskId} session ${sessionId}`, { details: { path: file } });
  }
  return parsed;
}

async function writePendingEnd(file: string, pending: PendingEnd): Promise<void> {
  try {
    await writeFileDurably(file, JSON.stringify(pending));
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot save ${file}`);
  }
}

async function removePendingEnd(file: string): Promise<void> {
  try {
    await fsp.rm(file, { force: true });
    await syncDirectory(path.dirname(file));
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot remove ${file}`);
  }
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
  const endFile = pendingEndPath(options.statePath);
  const attemptFile = attemptPath(options.statePath);
  const source = await openDisk(sourceSpec, { readOnly: true });
  const diskSizeBytes = source.sizeBytes;
  await source.close();
  let lastAttempt = 0;
  let attempts = 0;
  let afterSeq: number | undefined;
  const { peer, diskId, cut, firstAnchor, retryPolicy, onRetry, anchorWaitMs, signal, clockSkewAllowanceMs, ...engine } = options;
  lastAttempt = await readSavedAttempt(attemptFile, diskId, sessionId);
  /** `firstAnchor` until a session has been tried with it. */
  let givenAnchor = cut === undefined ? firstAnchor : undefined;
  const endPeer: PeerOptions = { ...peer, timeoutMs: Math.min(peer.timeoutMs ?? END_TIMEOUT_MS, END_TIMEOUT_MS) };
  const channelFor = (attempt: number, anchor: number | undefined, p: PeerOptions = peer): HttpResyncChannel => new HttpResyncChannel({ peer: p, diskId, sessionId, attempt, afterSeq: anchor, diskSizeBytes, clock });

  /** Tells the hop the resync finished; resolves true once it is recorded, false if it can no longer be (the resync must run again). */
  const confirmEnd = async (pending: PendingEnd): Promise<boolean> => {
    try {
      await channelFor(pending.attempt, pending.afterSeq ?? undefined, endPeer).end({ taintedThrough: pending.taintedThrough ?? undefined, readEndMs: pending.readEndMs ?? undefined });
    } catch (err) {
      // Another session wrote to the disk since: this completion is stale and the disk must be compared again.
      if (isBlockrelayError(err) && err.code === 'BR_RESYNC_SESSION_EXPIRED') {
        await removePendingEnd(endFile);
        return false;
      }
      throw err;
    }
    await removePendingEnd(endFile);
    return true;
  };

  /** Opens the session before the source reads anything, so every log after the anchor is held back while it reads. */
  const openSession = async (): Promise<HttpResyncChannel> => {
    let jumped = false;
    for (let tries = 1; ; tries++) {
      if (cut !== undefined) {
        afterSeq = await cut();
      } else {
        afterSeq = givenAnchor;
        givenAnchor = undefined;
      }
      if (afterSeq !== undefined) await waitForAnchor(peer, diskId, afterSeq, clock, anchorWaitMs ?? DEFAULT_ANCHOR_WAIT_MS);
      // Attempts increase across restarts too (saved before use), so a restarted resync supersedes its own stale session.
      lastAttempt++;
      await saveAttempt(attemptFile, { version: 1, diskId, sessionId, attempt: lastAttempt });
      const channel = channelFor(lastAttempt, afterSeq);
      try {
        await channel.open();
        return channel;
      } catch (err) {
        channel.close();
        // The hop knows a newer attempt of this resync (the saved count was lost): go past it at once, once.
        const newest = isBlockrelayError(err) && err.code === 'BR_RESYNC_SESSION_EXPIRED' ? err.details.newestAttempt : undefined;
        if (!jumped && typeof newest === 'number' && Number.isSafeInteger(newest) && newest >= lastAttempt) {
          jumped = true;
          lastAttempt = newest;
          continue;
        }
        // A log after the anchor was applied before the session held the disk (it was being applied as the
        // session opened): cut again (or, without a cut, let the hop anchor at what it holds now) at once.
        if (!(isBlockrelayError(err) && err.code === 'BR_RESYNC_ANCHOR_PASSED' && tries < QUICK_REANCHOR_TRIES)) throw err;
      }
    }
  };

  const loop = new RetryLoop<ResyncResult>(
    async () => {
      attempts++;
      if (signal?.aborted) throw new BlockrelayError('BR_RETRY_CANCELLED', 'resync stopped on request; progress is saved and the next run resumes');
      // A finished resync whose end the hop never confirmed (lost answer, outage, crash): confirm it first.
      const pending = await readPendingEnd(endFile, diskId, sessionId);
      if (pending !== undefined) {
        lastAttempt = Math.max(lastAttempt, pending.attempt);
        afterSeq = pending.afterSeq ?? undefined;
        if (await confirmEnd(pending)) return pending.result;
      }
      const channel = await openSession();
      let finished: PendingEnd | undefined;
      try {
        const result = await resyncDisks(sourceSpec, `${peer.url}${peer.url.endsWith('/') ? '' : '/'}v1/disks/${diskId}`, { ...engine, ...(signal ? { signal } : {}), clock, statePath: options.statePath, channel });
        // Every block is read: the log sealed now ends the first consistent point; the ones before it do not.
        // Without a cut the log sequence is unknown here (an anchor given by the caller says nothing of the logs
        // sealed while the resync read): the hop taints every log it received and those cut before the last read ended.
        const sealedAfter = cut === undefined ? undefined : await cut();
        const taintedThrough = sealedAfter === undefined ? null : sealedAfter - 1;
        // The hop compares it with the source's cut times: allow for this host's clock running behind the source's.
        const readEndMs = sealedAfter === undefined ? Math.ceil(clock.now()) + (clockSkewAllowanceMs ?? READ_END_SKEW_ALLOWANCE_MS) : null;
        finished = { version: 1, diskId, sessionId, attempt: lastAttempt, afterSeq: afterSeq ?? null, taintedThrough, readEndMs, result };
        // Durable before the end is sent: the engine's progress file is gone, so this is all that says the work is done.
        await writePendingEnd(endFile, finished);
      } catch (err) {
        await channelFor(lastAttempt, afterSeq, endPeer).end().catch(() => undefined);
        throw err;
      } finally {
        channel.close();
      }
      // A failed end fails the attempt: the retry policy runs the next one, which only confirms the end.
      if (await confirmEnd(finished)) return finished.result;
      throw new BlockrelayError('BR_RESYNC_SESSION_EXPIRED', `disk ${diskId}: the hop could not record the completion of resync session ${sessionId} (another session wrote since); it runs again`, { details: { sessionId, attempt: finished.attempt } });
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
    return { ...result, diskId, sessionId, attempts, afterSeq: afterSeq ?? null, endConfirmed: true };
  } finally {
    signal?.removeEventListener('abort', stop);
  }
}
