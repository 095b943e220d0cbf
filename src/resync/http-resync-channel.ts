import * as http from 'node:http';
import * as https from 'node:https';
import { systemClock, type Clock } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import { errorFromResponse, peerRequest, type PeerOptions } from '../transport/log-client';
import type { ResyncChannel } from './resync-peer';
import { HASH_REQUEST_FIXED_BYTES, MAX_HASH_SPAN_BYTES, MAX_RANGES_PER_REQUEST, MAX_WRITE_DATA_BYTES, MIN_BLOCK_BYTES, RANGE_BYTES, RUN_HEADER_BYTES, WIRE_HEADER_BYTES } from './resync-wire';
import { HASH_BYTES } from './block-hasher';

/**
 * The networked resync seam: `POST /v1/disks/{disk}/resync`, one request
 * body (an encoded resync request) and one response body (the encoded
 * reply) per exchange, authenticated with the hop's shared secret, over
 * TLS when the URL is https (trusting `ca` like `forward.caFile`). See
 * docs/transport.md ("Networked resync").
 */
export const RESYNC_HEADER = {
  /** The resync job: one id for every attempt of one resync (16 to 64 of [A-Za-z0-9_-]). */
  session: 'x-blockrelay-resync-session',
  /** The attempt within the job: a newer attempt supersedes an older one's session. */
  attempt: 'x-blockrelay-resync-attempt',
  /** The source's anchor: this resync follows log sequence S (absent: whatever the hop has received). */
  afterSeq: 'x-blockrelay-resync-after-seq',
  /** Size of the protected disk, so a hop can create a target no log has created yet. */
  diskSizeBytes: 'x-blockrelay-disk-size-bytes',
  /** On DELETE: `1` when the resync finished (every block compared); absent when an attempt gives up. */
  complete: 'x-blockrelay-resync-complete',
  /**
   * On a completing DELETE: the newest log sealed before the resync's last
   * read. Logs up to it mix blocks read at different times with the logs'
   * writes, so their ends are no crash-consistent points.
   */
  taintedThrough: 'x-blockrelay-resync-tainted-through',
  /**
   * On a completing DELETE without a cut (the source's log sequence is not
   * known to the resync): the source-side clock in ms when its last read
   * ended, plus an allowance for the resync host's clock running behind
   * the source's (networkedResync: 5 s). Logs cut at or before it end no
   * crash-consistent point; the resync must run on the source's host or a
   * host whose clock is in step within that allowance.
   */
  readEndMs: 'x-blockrelay-resync-read-end-ms',
  /**
   * On DELETE: how long the hop may take before it answers. Ending can
   * take longer (a master target flushes and copies the session's
   * pre-images into its journal): past this the hop answers `ending` and
   * the client asks again, so no request outlives its timeout.
   */
  answerWithinMs: 'x-blockrelay-resync-answer-within-ms',
} as const;

/** How long a hop waits for an end before it answers `ending`, when the DELETE does not say. */
export const DEFAULT_END_ANSWER_WITHIN_MS = 2_000;
/** The longest a DELETE may ask the hop to wait before answering. */
export const MAX_END_ANSWER_WITHIN_MS = 60_000;
/** Between two asks while the hop is still ending a session. */
const END_POLL_MS = 100;
/** How long a client keeps asking while the hop is ending; past it the end fails (recoverable) and is retried later. */
const END_WAIT_LIMIT_MS = 60 * 60 * 1000;

/**
 * Largest request body: a full write request (64 MiB of data) with a run
 * header per 512-byte block at worst, or a hash request of the most ranges.
 */
export const MAX_RESYNC_REQUEST_BYTES = WIRE_HEADER_BYTES + MAX_WRITE_DATA_BYTES + (MAX_WRITE_DATA_BYTES / MIN_BLOCK_BYTES) * RUN_HEADER_BYTES;
/** Largest reply body: the hashes of the widest hash request at the smallest block size, or an error. */
export const MAX_RESYNC_REPLY_BYTES = WIRE_HEADER_BYTES + (MAX_HASH_SPAN_BYTES / MIN_BLOCK_BYTES + MAX_RANGES_PER_REQUEST) * HASH_BYTES + 64 * 1024;

// A hash request is always far below the write bound; keep it so if the wire grows.
if (WIRE_HEADER_BYTES + HASH_REQUEST_FIXED_BYTES + MAX_RANGES_PER_REQUEST * RANGE_BYTES > MAX_RESYNC_REQUEST_BYTES) throw new Error('resync request bound too small');

/** The answer to `DELETE /v1/disks/{disk}/resync`. */
export interface EndAnswer {
  readonly diskId: string;
  /** This request ended the session (false: it had ended already, or another holds the disk). */
  readonly ended: boolean;
  /** The completion this request carried is recorded (now or by an earlier request); false without one. */
  readonly completed: boolean;
  readonly inProgress: boolean;
  readonly taintedThrough: number | null;
  /** The hop is still ending the session (flushing, journaling): ask again; `completed` is not known yet. */
  readonly ending: boolean;
}

export function parseEndAnswer(body: Buffer, diskId: string): EndAnswer {
  let parsed: Partial<EndAnswer>;
  try {
    parsed = JSON.parse(body.toString('utf8')) as Partial<EndAnswer>;
  } catch (err) {
    throw new BlockrelayError('BR_PROTOCOL', `the answer to ending the resync session of disk ${diskId} is not JSON`, { cause: err });
  }
  if (typeof parsed.completed !== 'boolean' || typeof parsed.ended !== 'boolean') throw new BlockrelayError('BR_PROTOCOL', `the answer to ending the resync session of disk ${diskId} lacks 'ended' and 'completed'`);
  return { diskId, ended: parsed.ended, completed: parsed.completed, inProgress: parsed.inProgress === true, taintedThrough: typeof parsed.taintedThrough === 'number' ? parsed.taintedThrough : null, ending: parsed.ending === true };
}

const SESSION_ID_PATTERN = /^[A-Za-z0-9_-]{16,64}$/;

/** Checks a resync job id as the receiving hop does. */
export function validateSessionId(id: string): string {
  if (!SESSION_ID_PATTERN.test(id)) throw new BlockrelayError('BR_PROTOCOL', `resync session id '${id.slice(0, 80)}' is not 16 to 64 letters, digits, "_" or "-"`);
  return id;
}

export interface HttpResyncChannelOptions {
  readonly peer: PeerOptions;
  readonly diskId: string;
  /** The resync job's id (the same for every attempt). */
  readonly sessionId: string;
  /** Increases with every attempt of the job, also across restarts (networkedResync counts them in STATE.attempt). */
  readonly attempt: number;
  /** The log sequence this resync follows; undefined: everything the hop has received. */
  readonly afterSeq?: number | undefined;
  readonly diskSizeBytes: number;
  /** Times the waits between asks while the hop is ending the session. */
  readonly clock?: Clock;
}

const DEFAULT_TIMEOUT_MS = 120_000;

/**
 * Ends a session and, with a completion, asks again while the hop answers
 * `ending`, until it answers the outcome (or END_WAIT_LIMIT_MS passed:
 * BR_NET_TIMEOUT, recoverable). Each request asks the hop to answer within
 * half its own timeout, so no request times out however long the hop's end
 * work takes (a master target with retention copies every pre-image of the
 * session into its journal). Used by the source and by a relaying hop.
 */
export async function endSession(peer: PeerOptions, diskId: string, headers: Record<string, string>, completing: boolean, clock: Clock = systemClock, agent?: http.Agent): Promise<EndAnswer> {
  const withinMs = Math.max(1, Math.min(MAX_END_ANSWER_WITHIN_MS, Math.floor((peer.timeoutMs ?? DEFAULT_TIMEOUT_MS) / 2)));
  const asked = { ...headers, [RESYNC_HEADER.answerWithinMs]: String(withinMs) };
  const deadline = clock.now() + END_WAIT_LIMIT_MS;
  for (;;) {
    const answer = parseEndAnswer(await postResync(peer, 'DELETE', diskId, asked, undefined, agent), diskId);
    if (!answer.ending || !completing) return answer;
    if (clock.now() >= deadline) throw new BlockrelayError('BR_NET_TIMEOUT', `the hop was still ending the resync session of disk ${diskId} after ${END_WAIT_LIMIT_MS} ms`);
    await new Promise<void>((resolve) => clock.setTimer(resolve, END_POLL_MS));
  }
}

export function resyncPath(diskId: string): string {
  return `/v1/disks/${encodeURIComponent(diskId)}/resync`;
}

/** Session headers of one attempt, as sent on every exchange (and relayed unchanged by a process server). */
export function sessionHeaders(o: Pick<HttpResyncChannelOptions, 'sessionId' | 'attempt' | 'afterSeq' | 'diskSizeBytes'>): Record<string, string> {
  return {
    [RESYNC_HEADER.session]: o.sessionId,
    [RESYNC_HEADER.attempt]: String(o.attempt),
    [RESYNC_HEADER.diskSizeBytes]: String(o.diskSizeBytes),
    ...(o.afterSeq === undefined ? {} : { [RESYNC_HEADER.afterSeq]: String(o.afterSeq) }),
  };
}

/**
 * One bounded request with a binary body and a binary answer. Network
 * failures become BR_NET_UNREACHABLE / BR_NET_TIMEOUT (recoverable); an
 * HTTP error answer becomes the coded error the peer sent.
 */
export async function postResync(peer: PeerOptions, method: 'POST' | 'DELETE', diskId: string, headers: Record<string, string>, body: Buffer | undefined, agent?: http.Agent): Promise<Buffer> {
  try {
    return await postOnce(peer, method, diskId, headers, body, agent);
  } catch (err) {
    // A kept-alive connection the peer closed just as we reused it: every
    // exchange is idempotent, so send it once more on a fresh connection.
    if ((err as { reusedSocket?: boolean }).reusedSocket === true) return postOnce(peer, method, diskId, headers, body, agent);
    throw err;
  }
}

async function postOnce(peer: PeerOptions, method: 'POST' | 'DELETE', diskId: string, headers: Record<string, string>, body: Buffer | undefined, agent: http.Agent | undefined): Promise<Buffer> {
  const answer = await peerRequest(peer, {
    method,
    path: resyncPath(diskId),
    headers: { ...headers, 'content-type': 'application/octet-stream', 'content-length': String(body?.length ?? 0) },
    body: body === undefined ? undefined : async (req) => {
      req.end(body);
    },
    agent: agent ?? false,
    defaultTimeoutMs: DEFAULT_TIMEOUT_MS,
    maxAnswerBytes: MAX_RESYNC_REPLY_BYTES,
    answerTooLarge: 'BR_RESYNC_PROTOCOL',
  });
  if (answer.status === 200) return answer.body;
  throw errorFromResponse(answer.status, answer.body.toString('utf8', 0, Math.min(answer.body.length, 64 * 1024)));
}

/**
 * A ResyncChannel to a process server or master target over HTTP(S). It
 * carries the encoded messages unchanged and does not retry: a failed
 * exchange fails the resync attempt, whose progress is saved; the caller's
 * retry loop (networkedResync) starts the next attempt, which resumes.
 */
export class HttpResyncChannel implements ResyncChannel {
  private readonly agent: http.Agent;

  constructor(private readonly options: HttpResyncChannelOptions) {
    validateSessionId(options.sessionId);
    if (!Number.isSafeInteger(options.attempt) || options.attempt < 1) throw new BlockrelayError('BR_USAGE', `resync attempt must be a positive whole number, got ${options.attempt}`);
    this.agent = keepAliveAgent(options.peer);
  }

  async exchange(request: Buffer): Promise<Buffer> {
    if (request.length > MAX_RESYNC_REQUEST_BYTES) throw new BlockrelayError('BR_UPLOAD_TOO_LARGE', `resync request of ${request.length} bytes exceeds ${MAX_RESYNC_REQUEST_BYTES}`);
    return postResync(this.options.peer, 'POST', this.options.diskId, sessionHeaders(this.options), request, this.agent);
  }

  /**
   * Opens the session (an exchange with an empty body): the hop anchors it,
   * holds back the logs after the anchor and waits for those before it.
   * The source does this before it reads anything, so no log sealed after
   * its first read can be applied before the session's writes.
   */
  async open(): Promise<void> {
    await postResync(this.options.peer, 'POST', this.options.diskId, sessionHeaders(this.options), Buffer.alloc(0), this.agent);
  }

  /**
   * Ends the session on the hop (its applier resumes at once rather than at
   * expiry), and closes the connections. `completion` says the resync
   * finished, and through which log the points are tainted; then the hop
   * must answer that it recorded it (BR_PROTOCOL otherwise); while the hop
   * answers that it is still ending, the end is asked again (endSession).
   * Ending is idempotent on the hop: sending the same end again is harmless.
   */
  async end(completion?: { taintedThrough: number | undefined; readEndMs?: number | undefined }): Promise<EndAnswer> {
    const headers = sessionHeaders(this.options);
    if (completion !== undefined) {
      headers[RESYNC_HEADER.complete] = '1';
      if (completion.taintedThrough !== undefined) headers[RESYNC_HEADER.taintedThrough] = String(completion.taintedThrough);
      if (completion.readEndMs !== undefined) headers[RESYNC_HEADER.readEndMs] = String(Math.ceil(completion.readEndMs));
    }
    try {
      const answer = await endSession(this.options.peer, this.options.diskId, headers, completion !== undefined, this.options.clock);
      if (completion !== undefined && !answer.completed) throw new BlockrelayError('BR_PROTOCOL', `the hop answered the completion of resync session ${this.options.sessionId} without recording it`);
      return answer;
    } finally {
      this.close();
    }
  }

  /** Closes the kept-alive connections. */
  close(): void {
    this.agent.destroy();
  }
}

/** Connections kept alive for one session's exchanges (a TLS handshake per window would dominate on a WAN). */
export function keepAliveAgent(peer: PeerOptions): http.Agent {
  const options = { keepAlive: true, maxSockets: 16 };
  return peer.url.startsWith('https:') ? new https.Agent({ ...options, ...(peer.ca ? { ca: peer.ca } : {}) }) : new http.Agent(options);
}
