import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { syncDirectory, writeFileDurably } from '../platform/durable-file';
import type { Logger } from '../daemon/logger';
import type { Clock, TimerHandle } from '../platform/clock';
import { KeyedLock } from '../platform/keyed-lock';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import { BlockHasher } from '../resync/block-hasher';
import { DEFAULT_END_ANSWER_WITHIN_MS, endSession, keepAliveAgent, MAX_END_ANSWER_WITHIN_MS, MAX_RESYNC_REQUEST_BYTES, parseEndAnswer, postResync, RESYNC_HEADER, sessionHeaders, validateSessionId, type EndAnswer } from '../resync/http-resync-channel';
import { ResyncTargetService } from '../resync/resync-peer';
import type { DiskTarget } from '../targets/disk-target';
import type { DiskDrain } from './disk-drain';
import type { PeerOptions } from './log-client';
import type { SpoolEntry } from './log-spool';
import { sendJson, type Route } from './http-api';
import { PROTOCOL_VERSION, validateDiskId } from './transport-protocol';

/**
 * `POST /v1/disks/{disk}/resync`: the target side of a networked resync on
 * a receiving hop (docs/transport.md, "Networked resync"). Each request body
 * is one encoded resync request (src/resync/resync-wire.ts), each answer
 * body the encoded reply; `DELETE` on the same path ends the session.
 *
 * The disk is live in the log pipeline, so a session is anchored in its log
 * sequence: the source says "this resync follows log S". Before the first
 * answer the hop has applied (or, forwarding, sent on) every log up to S,
 * and it holds back the logs after S until the session ends; they stay
 * spooled and are applied afterwards, so writes made during the resync
 * (which the source logs as usual) land after the resync's blocks and the
 * target converges to the source. Sessions are exclusive per disk, expire
 * when idle (the applier then resumes) and are single-use: a request of an
 * ended session is refused (BR_RESYNC_SESSION_EXPIRED) rather than served
 * after logs were applied in between, and the source resumes in a new one.
 */

/** How a session reaches a disk's target side. */
export type ResyncDiskAccess = LocalResyncDisk | RelayedResyncDisk;

/** A disk this hop applies itself (master target, or a process server's page blob). */
export interface LocalResyncDisk {
  readonly kind: 'local';
  readonly diskId: string;
  /** The applier: held back during the session. */
  readonly drain: DiskDrain<SpoolEntry>;
  /** Newest log applied to the target, null before the first. */
  appliedSeq(): number | null;
  /** Newest log received (applied or spooled), null before the first. */
  receivedSeq(): number | null;
  /** The disk's target, opened (or created at `sizeBytes`) if no log has yet. */
  openTarget(sizeBytes: number): Promise<DiskTarget>;
}

/** A disk this hop forwards to a master target: exchanges are relayed to the master target's same route. */
export interface RelayedResyncDisk {
  readonly kind: 'relay';
  readonly diskId: string;
  /** The forwarder: held back during the session. */
  readonly drain: DiskDrain<SpoolEntry>;
  receivedSeq(): number | null;
  /** Sequence of the oldest log still in this hop's spool for the disk. */
  oldestSpooledSeq(): number | undefined;
  readonly peer: PeerOptions;
}

/**
 * Keeps the pre-images of the blocks a session overwrites (retention), so
 * the points recorded before it stay rebuildable.
 */
export interface ResyncSessionJournal {
  /** Makes the old content of `[offset, offset + length)` durable before it is overwritten. */
  preserve(target: DiskTarget, offset: number, length: number): Promise<void>;
  /** The session ended with its writes flushed. */
  finish(target: DiskTarget): Promise<void>;
}

export interface ResyncJournalProvider {
  /** Starts the journal of a session on `diskId` whose writes follow applied log `appliedSeq`; undefined: nothing to keep. */
  openSession(diskId: string, target: DiskTarget, appliedSeq: number | null, sessionId: string): Promise<ResyncSessionJournal | undefined>;
  /** Called before each log is applied (and before the retention hooks see it): the first log after a session completes its journal. */
  beforeApply?(diskId: string, entry: SpoolEntry, target: DiskTarget): Promise<void>;
  /** Gives the journal the hop's logger, for the Warnings it must not keep silent (history dropped). */
  attachLogger?(logger: Logger): void;
}

export interface ResyncSessionsOptions {
  readonly clock: Clock;
  readonly logger: Logger;
  readonly access: (diskId: string) => ResyncDiskAccess | undefined;
  readonly journal?: ResyncJournalProvider | undefined;
  /** A session with no request for this long ends and the applier resumes. */
  readonly idleTimeoutMs?: number;
  /** How long opening a session waits for the logs up to the anchor to be applied or forwarded. */
  readonly readyTimeoutMs?: number;
  /** The hop's state directory: `resync/<disk>.json` says which logs end no consistent point (absent: kept in memory). */
  readonly stateDir?: string;
  /**
   * Bytes of logs one session may hold back before it is ended early
   * (BR_RESYNC_HOLD_FULL) and they go on; the default, and the ceiling, is
   * a quarter of the spool's bound (see HELD_SHARE_OF_SPOOL).
   */
  readonly maxHeldBytes?: number;
}

/**
 * What a resync means for a disk's recovery points, persisted per disk in
 * `STATE/resync/<disk>.json`: while a resync is in progress (a session
 * opened, none completed since) the target mixes blocks read at different
 * times, so no log applied then ends a crash-consistent point; once one
 * completes, logs up to `taintedThrough` (sealed before its last read)
 * end none either.
 */
export interface ResyncStatus {
  readonly session: { sessionId: string; attempt: number; afterSeq: number | null; exchanges: number } | null;
  /** No applied log ends a recovery point until a resync completes. */
  readonly inProgress: boolean;
  readonly taintedThrough: number | null;
  /** The disk's last session and whether its completion was recorded (false while in progress: the end has not arrived). */
  readonly lastSession: { readonly sessionId: string; readonly attempt: number; readonly completed: boolean } | null;
}

export interface DiskResyncState {
  readonly version: 1;
  readonly inProgress: boolean;
  readonly taintedThrough: number | null;
  /**
   * The last session opened on the disk (the one whose writes the target
   * holds last) and whether its completion was recorded. A completing
   * `DELETE` is accepted for this session only, also after it expired or
   * the hop restarted, and again if its answer was lost (idempotent).
   * Absent in files written before it existed: no late completion then.
   */
  readonly lastSession?: { readonly sessionId: string; readonly attempt: number; readonly completed: boolean };
  /**
   * A completion without a cut (the resync did not know the source's log
   * sequence) says when its last read ended: a log cut at or before this
   * time (its envelope's `cutTimeMs`) ends no point either. Absent: none.
   */
  readonly taintedUntilMs?: number;
}

export const RESYNC_SESSION_DEFAULTS = {
  idleTimeoutMs: 120_000,
  readyTimeoutMs: 30_000,
} as const;

/**
 * The share of a hop's spool bound one session's held logs may take. Past
 * it, or once held logs would leave less than SPOOL_RESERVE_SHARE of the
 * spool free, the session ends early (BR_RESYNC_HOLD_FULL): its held logs
 * are applied or forwarded at once and the source resumes the resync in a
 * new session. A resync thus never makes the hop refuse another disk's
 * logs (BR_SPOOL_FULL), and nothing is dropped.
 */
export const HELD_SHARE_OF_SPOOL = 1 / 4;
/** Free share of the spool below which no session keeps holding logs. */
export const SPOOL_RESERVE_SHARE = 1 / 8;

/** What a late request of an ended session is told. */
type EndedCode = 'BR_RESYNC_SESSION_EXPIRED' | 'BR_RESYNC_HOLD_FULL';

/** Ended sessions remembered per hop, so their late requests are refused, not served. */
const ENDED_SESSIONS_MAX = 1024;

const IDLE_STATE: DiskResyncState = { version: 1, inProgress: false, taintedThrough: null };

interface Completion {
  readonly taintedThrough: number | undefined;
  readonly readEndMs: number | undefined;
}

function completionOf(req: http.IncomingMessage): Completion | undefined {
  if (req.headers[RESYNC_HEADER.complete] !== '1') return undefined;
  return { taintedThrough: wholeHeader(req, RESYNC_HEADER.taintedThrough, false), readEndMs: wholeHeader(req, RESYNC_HEADER.readEndMs, false) };
}

function completionHeaders(completion: Completion | undefined): Record<string, string> {
  if (completion === undefined) return {};
  return {
    [RESYNC_HEADER.complete]: '1',
    ...(completion.taintedThrough === undefined ? {} : { [RESYNC_HEADER.taintedThrough]: String(completion.taintedThrough) }),
    ...(completion.readEndMs === undefined ? {} : { [RESYNC_HEADER.readEndMs]: String(completion.readEndMs) }),
  };
}

interface Session {
  readonly diskId: string;
  readonly sessionId: string;
  readonly attempt: number;
  readonly access: ResyncDiskAccess;
  readonly afterSeq: number | null;
  readonly diskSizeBytes: number;
  /** Local disks: the target side answering the exchanges. */
  service?: ResyncTargetService;
  target?: DiskTarget;
  journal?: ResyncSessionJournal | undefined;
  inFlight: number;
  idleTimer: TimerHandle | undefined;
  ended: boolean;
  drained: Array<() => void>;
  exchanges: number;
  ending?: Promise<void>;
  /** Relayed sessions: connections to the master target kept for the session. */
  agent?: http.Agent;
  /** Relayed sessions: the master target's answer to the relayed end. */
  relayedEnd?: EndAnswer;
}

interface SessionKey {
  readonly sessionId: string;
  readonly attempt: number;
  readonly afterSeq: number | undefined;
  readonly diskSizeBytes: number;
}

function wholeHeader(req: http.IncomingMessage, name: string, required: boolean): number | undefined {
  const v = req.headers[name];
  if (v === undefined) {
    if (required) throw new BlockrelayError('BR_PROTOCOL', `header ${name} is missing`);
    return undefined;
  }
  if (typeof v !== 'string' || !/^\d{1,16}$/.test(v) || !Number.isSafeInteger(Number(v))) throw new BlockrelayError('BR_PROTOCOL', `header ${name} must be a whole number, got '${String(v).slice(0, 40)}'`);
  return Number(v);
}

function sessionKey(req: http.IncomingMessage): SessionKey {
  const id = req.headers[RESYNC_HEADER.session];
  if (typeof id !== 'string') throw new BlockrelayError('BR_PROTOCOL', `header ${RESYNC_HEADER.session} is missing`);
  const attempt = wholeHeader(req, RESYNC_HEADER.attempt, true)!;
  if (attempt < 1) throw new BlockrelayError('BR_PROTOCOL', `header ${RESYNC_HEADER.attempt} must be at least 1`);
  const diskSizeBytes = wholeHeader(req, RESYNC_HEADER.diskSizeBytes, true)!;
  if (diskSizeBytes < 1) throw new BlockrelayError('BR_PROTOCOL', `header ${RESYNC_HEADER.diskSizeBytes} must be positive`);
  return { sessionId: validateSessionId(id), attempt, afterSeq: wholeHeader(req, RESYNC_HEADER.afterSeq, false), diskSizeBytes };
}

/** Request bytes one hop holds in memory for all its sessions; more requests wait their turn. */
const MAX_IN_FLIGHT_REQUEST_BYTES = 256 * 1024 * 1024;

/** The declared body length (0 when absent or malformed: readBody refuses those). */
function declaredLength(req: http.IncomingMessage): number {
  const declared = req.headers['content-length'];
  return declared !== undefined && /^\d{1,12}$/.test(declared) ? Number(declared) : 0;
}

/** A count of bytes that callers take before holding a buffer and give back after; takers wait in order. */
class ByteBudget {
  private used = 0;
  private readonly waiters: Array<{ bytes: number; wake: () => void }> = [];

  constructor(private readonly limitBytes: number) {}

  async take(bytes: number): Promise<void> {
    // One request alone may always proceed, so a large one cannot wait forever.
    if (this.waiters.length === 0 && (this.used === 0 || this.used + bytes <= this.limitBytes)) {
      this.used += bytes;
      return;
    }
    await new Promise<void>((wake) => this.waiters.push({ bytes, wake }));
  }

  give(bytes: number): void {
    this.used -= bytes;
    while (this.waiters.length > 0) {
      const next = this.waiters[0]!;
      if (this.used !== 0 && this.used + next.bytes > this.limitBytes) break;
      this.waiters.shift();
      this.used += next.bytes;
      next.wake();
    }
  }
}

/** Reads a request body whole, refusing more than `maxBytes` before reading it. */
async function readBody(req: http.IncomingMessage, maxBytes: number): Promise<Buffer> {
  const declared = req.headers['content-length'];
  if (declared === undefined || !/^\d{1,12}$/.test(declared)) throw new BlockrelayError('BR_PROTOCOL', 'a resync request needs a content-length');
  const length = Number(declared);
  if (length > maxBytes) throw new BlockrelayError('BR_UPLOAD_TOO_LARGE', `resync request of ${length} bytes exceeds ${maxBytes}`, { details: { limitBytes: maxBytes } });
  const body = Buffer.allocUnsafe(length);
  let at = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    if (at + chunk.length > length) throw new BlockrelayError('BR_PROTOCOL', `resync request body is longer than its content-length ${length}`);
    chunk.copy(body, at);
    at += chunk.length;
  }
  if (at !== length) throw new BlockrelayError('BR_UPLOAD_INCOMPLETE', `resync request ended after ${at} of ${length} bytes`);
  return body;
}

/**
 * A DiskTarget whose writes first make the overwritten content durable in
 * the session's journal: the resync target service writes through it.
 */
function journaledTarget(target: DiskTarget, journal: ResyncSessionJournal): DiskTarget {
  return {
    get spec() {
      return target.spec;
    },
    get sizeBytes() {
      return target.sizeBytes;
    },
    get capabilities() {
      return target.capabilities;
    },
    get diskUuid() {
      return target.diskUuid;
    },
    read: (offset, length) => target.read(offset, length),
    write: async (offset, data) => {
      await journal.preserve(target, offset, data.length);
      await target.write(offset, data);
    },
    writeZeroes: async (offset, length) => {
      await journal.preserve(target, offset, length);
      await target.writeZeroes(offset, length);
    },
    discard: async (offset, length) => {
      await journal.preserve(target, offset, length);
      await target.discard(offset, length);
    },
    flush: () => target.flush(),
    extents: (offset, length) => target.extents(offset, length),
    ...(target.hashBlocks === undefined ? {} : { hashBlocks: (offset: number, length: number, blockSizeBytes: number, into?: Buffer) => target.hashBlocks!(offset, length, blockSizeBytes, into) }),
    // The hop owns the target; a session never closes it.
    close: async () => undefined,
  };
}

/** The resync sessions of one receiving hop (master target or process server). */
export class ResyncSessions {
  private readonly sessions = new Map<string, Session>();
  /** `${sessionId}:${attempt}` of sessions that ended, oldest first, with their disk and the code their late requests get. */
  private readonly ended = new Map<string, { diskId: string; code: EndedCode }>();
  /** Per resync (session id), the newest attempt this hop has opened, oldest entry first (bounded like `ended`). */
  private readonly newestAttempts = new Map<string, number>();
  private readonly diskStates = new Map<string, DiskResyncState>();
  private readonly opening = new KeyedLock();
  /**
   * Serialises each disk's state read-modify-writes (updateState). Taken
   * inside `opening` (open, a late completion) and alone (a live session's
   * completion in endOnce, which `open` may be awaiting): never the other
   * way round, so the two locks cannot deadlock.
   */
  private readonly saving = new KeyedLock();
  private hasher: Promise<BlockHasher> | undefined;
  /** Request bodies all sessions of this hop hold at once. */
  private readonly budget = new ByteBudget(MAX_IN_FLIGHT_REQUEST_BYTES);
  private closed = false;

  constructor(private readonly options: ResyncSessionsOptions) {
    options.journal?.attachLogger?.(options.logger);
  }

  routes(): Route[] {
    const pattern = `/${PROTOCOL_VERSION}/disks/:disk/resync`;
    return [
      {
        method: 'POST',
        pattern,
        handler: async (ctx) => {
          const diskId = validateDiskId(ctx.params.disk!);
          const key = sessionKey(ctx.req);
          const session = await this.session(diskId, key);
          if (session.ended) throw this.endedError(session.sessionId, session.attempt);
          session.inFlight++;
          this.touch(session);
          let heldBytes = 0;
          try {
            heldBytes = Math.min(declaredLength(ctx.req), MAX_RESYNC_REQUEST_BYTES);
            await this.budget.take(heldBytes);
            const body = await readBody(ctx.req, MAX_RESYNC_REQUEST_BYTES);
            if (session.ended) throw this.endedError(session.sessionId, session.attempt);
            const reply = await this.exchange(session, body);
            session.exchanges++;
            ctx.res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': reply.length, 'cache-control': 'no-store' });
            ctx.res.end(reply);
          } finally {
            this.budget.give(heldBytes);
            session.inFlight--;
            if (session.inFlight === 0) for (const w of session.drained.splice(0)) w();
            this.touch(session);
          }
        },
      },
      {
        method: 'DELETE',
        pattern,
        handler: async (ctx) => {
          const diskId = validateDiskId(ctx.params.disk!);
          const key = sessionKey(ctx.req);
          const completion = completionOf(ctx.req);
          const withinMs = Math.min(wholeHeader(ctx.req, RESYNC_HEADER.answerWithinMs, false) ?? DEFAULT_END_ANSWER_WITHIN_MS, MAX_END_ANSWER_WITHIN_MS);
          ctx.req.resume();
          const answer = await this.endRequest(diskId, key, completion, withinMs);
          sendJson(ctx.res, 200, answer);
        },
      },
    ];
  }

  /**
   * `DELETE`: ends the session named by the headers, and with a completion
   * records that the resync finished. Idempotent and recoverable: the end
   * of a session that already ended (expired, or lost with a hop restart)
   * still records its completion when it was the disk's last session, and
   * a repeated completion is answered as recorded. A completion that can no
   * longer be recorded (another session wrote since) is refused with
   * BR_RESYNC_SESSION_EXPIRED: the resync must run again. An end that takes
   * longer than `withinMs` (flushing the target, finishing the session's
   * journal) goes on, and the request is answered `ending`: the source asks
   * again, and that request finds the end done, or still going.
   */
  private async endRequest(diskId: string, key: SessionKey, completion: Completion | undefined, withinMs: number): Promise<EndAnswer> {
    let current = this.sessions.get(diskId);
    if (current !== undefined && current.sessionId === key.sessionId && current.attempt === key.attempt) {
      // If it is already ending (expiry, role stopping, or this request repeated while the end goes on), that end
      // carries no completion, or carries it already: look again once it is over.
      const carriesCompletion = current.ending === undefined;
      const done = await this.settledWithin(this.end(current, completion === undefined ? 'ended by the source' : 'completed', completion), withinMs);
      if (!done) return { diskId, ended: carriesCompletion, completed: false, ending: true, ...this.stateFields(diskId) };
      if (carriesCompletion || completion === undefined) {
        if (current.access.kind === 'relay') return { ...(current.relayedEnd ?? { inProgress: false, taintedThrough: null, completed: false }), diskId, ended: true, ending: false };
        return { diskId, ended: true, completed: completion !== undefined, ending: false, ...this.stateFields(diskId) };
      }
      current = this.sessions.get(diskId);
    }
    if (current !== undefined && completion !== undefined) {
      // Another session (or a newer attempt of this one) holds the disk and writes to it: this completion is stale.
      if (current.sessionId !== key.sessionId) throw new BlockrelayError('BR_RESYNC_SESSION_BUSY', `disk ${diskId} is held by resync session ${current.sessionId}; the completion of ${key.sessionId} cannot be recorded`, { details: { diskId, sessionId: current.sessionId } });
      throw new BlockrelayError('BR_RESYNC_SESSION_EXPIRED', `resync session ${key.sessionId} attempt ${key.attempt} was superseded by attempt ${current.attempt}; its completion cannot be recorded`, { details: { sessionId: key.sessionId, attempt: key.attempt } });
    }
    const access = this.options.access(diskId);
    if (access?.kind === 'relay') {
      // No session here (ended, or this hop restarted): the master target may still hold one, or remember it.
      // Asked to answer within the same time: an `ending` answer goes back to the source, which asks again.
      const reply = await postResync(access.peer, 'DELETE', diskId, { ...sessionHeaders(key), ...completionHeaders(completion), [RESYNC_HEADER.answerWithinMs]: String(withinMs) }, undefined);
      return { ...parseEndAnswer(reply, diskId), diskId };
    }
    if (completion === undefined || access === undefined) return { diskId, ended: false, completed: false, ending: false, ...this.stateFields(diskId) };
    // Under the disk's opening lock: a session opening meanwhile (which makes itself the last session) is either
    // fully open before this looks, or opens after the completion is recorded, never in between.
    return this.opening.run(diskId, async () => {
      const holder = this.sessions.get(diskId);
      if (holder !== undefined) throw new BlockrelayError('BR_RESYNC_SESSION_BUSY', `disk ${diskId} is held by resync session ${holder.sessionId} attempt ${holder.attempt}; the completion of ${key.sessionId} attempt ${key.attempt} cannot be recorded`, { details: { diskId, sessionId: holder.sessionId } });
      const last = this.resyncState(diskId).lastSession;
      if (last === undefined || last.sessionId !== key.sessionId || last.attempt !== key.attempt) {
        throw new BlockrelayError('BR_RESYNC_SESSION_EXPIRED', `disk ${diskId}: the completion of resync session ${key.sessionId} attempt ${key.attempt} cannot be recorded: ${last === undefined ? 'no session is known' : `the last session on the disk was ${last.sessionId} attempt ${last.attempt}`}; run the resync again`, { details: { sessionId: key.sessionId, attempt: key.attempt } });
      }
      // The disk's last session ended without a completion (it expired after its last exchange, or the hop
      // restarted): its writes were flushed before the source finished, so the resync still completes.
      if (!last.completed) await this.complete(diskId, completion, access.receivedSeq());
      return { diskId, ended: false, completed: true, ending: false, ...this.stateFields(diskId) };
    });
  }

  /** Whether `work` settled within `withinMs` (its failure is thrown); it goes on either way. */
  private async settledWithin(work: Promise<void>, withinMs: number): Promise<boolean> {
    let timer: TimerHandle | undefined;
    const late = new Promise<false>((resolve) => {
      timer = this.options.clock.setTimer(() => resolve(false), withinMs);
    });
    // Its failure still reaches whoever asks next; not an unhandled rejection meanwhile.
    work.catch(() => undefined);
    try {
      return await Promise.race([work.then(() => true), late]);
    } finally {
      timer?.cancel();
    }
  }

  private stateFields(diskId: string): { inProgress: boolean; taintedThrough: number | null } {
    const state = this.resyncState(diskId);
    return { inProgress: state.inProgress, taintedThrough: state.taintedThrough };
  }

  /** Whether a session holds the disk now (status, tests). */
  active(diskId: string): { sessionId: string; attempt: number; afterSeq: number | null; exchanges: number } | undefined {
    const s = this.sessions.get(diskId);
    return s === undefined ? undefined : { sessionId: s.sessionId, attempt: s.attempt, afterSeq: s.afterSeq, exchanges: s.exchanges };
  }

  /** What `/v1/status` shows of the disk's resync; undefined when none ever ran. */
  status(diskId: string): ResyncStatus | undefined {
    const session = this.active(diskId);
    const state = this.stateFile(diskId) !== undefined || this.diskStates.has(diskId) ? this.resyncState(diskId) : undefined;
    if (session === undefined && (state === undefined || (!state.inProgress && state.taintedThrough === null))) return undefined;
    return { session: session ?? null, inProgress: state?.inProgress ?? false, taintedThrough: state?.taintedThrough ?? null, lastSession: state?.lastSession ?? null };
  }

  /** The disk's resync state (see DiskResyncState). */
  resyncState(diskId: string): DiskResyncState {
    let state = this.diskStates.get(diskId);
    if (state === undefined) {
      state = IDLE_STATE;
      const file = this.stateFile(diskId);
      if (file !== undefined && fs.existsSync(file)) {
        try {
          const parsed = JSON.parse(fs.readFileSync(file, 'utf8')) as DiskResyncState;
          if (parsed.version !== 1 || typeof parsed.inProgress !== 'boolean' || (parsed.taintedThrough !== null && !Number.isSafeInteger(parsed.taintedThrough))) throw new Error('unknown layout');
          if (parsed.taintedUntilMs !== undefined && !Number.isSafeInteger(parsed.taintedUntilMs)) throw new Error('unknown layout of taintedUntilMs');
          const last = parsed.lastSession;
          if (last !== undefined && (typeof last !== 'object' || last === null || typeof last.sessionId !== 'string' || !Number.isSafeInteger(last.attempt) || typeof last.completed !== 'boolean')) throw new Error('unknown layout of lastSession');
          state = parsed;
        } catch (err) {
          throw new BlockrelayError('BR_APPLY_STATE_CORRUPT', `resync state ${file} is unreadable: ${(err as Error).message}`, { cause: err });
        }
      }
      this.diskStates.set(diskId, state);
    }
    return state;
  }

  /**
   * The entry as the apply path must see it: a log that ends no
   * crash-consistent point because of a resync is presented as a resync log
   * (journaled, applied, but no point and no RPO sample).
   */
  markTainted(diskId: string, entry: SpoolEntry): SpoolEntry {
    if (entry.envelope.resync === true) return entry;
    const state = this.resyncState(diskId);
    // The source says so itself: sealed while its log-stream resync was unfinished.
    const tainted = entry.envelope.tainted === true || state.inProgress || (state.taintedThrough !== null && entry.envelope.seq <= state.taintedThrough) || (state.taintedUntilMs !== undefined && entry.envelope.cutTimeMs <= state.taintedUntilMs);
    return tainted ? { ...entry, envelope: { ...entry.envelope, resync: true } } : entry;
  }

  private stateFile(diskId: string): string | undefined {
    return this.options.stateDir === undefined ? undefined : path.join(this.options.stateDir, 'resync', `${validateDiskId(diskId)}.json`);
  }

  /**
   * Read-modify-writes the disk's state, one at a time per disk: `change`
   * sees the state as the previous update left it, and memory takes the new
   * state only once its file is durable, so memory and file never disagree
   * (two updates built from one old state would lose one of them).
   */
  private updateState(diskId: string, change: (state: DiskResyncState) => DiskResyncState): Promise<DiskResyncState> {
    return this.saving.run(diskId, async () => {
      const state = change(this.resyncState(diskId));
      const file = this.stateFile(diskId);
      if (file !== undefined) {
        const created = await fs.promises.mkdir(path.dirname(file), { recursive: true });
        // A directory just made must outlast a crash too (POSIX promises that only once its parent is fsynced):
        // a lost first `inProgress: true` would let logs applied after the crash end points.
        if (created !== undefined) {
          for (let dir = path.dirname(file); ; dir = path.dirname(dir)) {
            await syncDirectory(path.dirname(dir));
            if (dir === created || path.dirname(dir) === dir) break;
          }
        }
        await writeFileDurably(file, JSON.stringify(state));
      }
      this.diskStates.set(diskId, state);
      return state;
    });
  }

  /** A resync of the disk finished: logs up to `taintedThrough` (or everything received, when the source could not say) end no point. */
  private async complete(diskId: string, completion: Completion, receivedSeq: number | null): Promise<void> {
    const through = completion.taintedThrough ?? receivedSeq;
    await this.updateState(diskId, ({ taintedThrough: previous, lastSession, taintedUntilMs }) => {
      const until = completion.readEndMs === undefined ? taintedUntilMs : Math.max(completion.readEndMs, taintedUntilMs ?? 0);
      return {
        version: 1,
        inProgress: false,
        taintedThrough: through === null ? previous : Math.max(through, previous ?? through),
        ...(lastSession === undefined ? {} : { lastSession: { ...lastSession, completed: true } }),
        ...(until === undefined ? {} : { taintedUntilMs: until }),
      };
    });
  }

  /** Ends every session (the role is stopping); appliers are released. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.sessions.values()].map((s) => this.end(s, 'the role is stopping').catch(() => undefined)));
  }

  private endedError(sessionId: string, attempt: number): BlockrelayError {
    const code = this.ended.get(`${sessionId}:${attempt}`)?.code ?? 'BR_RESYNC_SESSION_EXPIRED';
    const why = code === 'BR_RESYNC_HOLD_FULL' ? 'ended because the logs it held reached their bound' : 'has ended';
    // The newest attempt of the resync this hop knows: a source that lost count (its counter file) opens past it at once.
    const newestAttempt = this.newestAttempts.get(sessionId);
    return new BlockrelayError(code, `resync session ${sessionId} attempt ${attempt} ${why}; resume in a new attempt`, { details: { sessionId, attempt, ...(newestAttempt === undefined ? {} : { newestAttempt }) } });
  }

  private noteAttempt(sessionId: string, attempt: number): void {
    if ((this.newestAttempts.get(sessionId) ?? 0) >= attempt) return;
    this.newestAttempts.delete(sessionId);
    this.newestAttempts.set(sessionId, attempt);
    if (this.newestAttempts.size > ENDED_SESSIONS_MAX) this.newestAttempts.delete(this.newestAttempts.keys().next().value!);
  }

  /** The session a request belongs to: the live one, or a new one opened (and anchored) for it. */
  private session(diskId: string, key: SessionKey): Promise<Session> {
    return this.opening.run(diskId, async () => {
      if (this.closed) throw new BlockrelayError('BR_PEER_BUSY', 'this hop is stopping');
      if (this.ended.has(`${key.sessionId}:${key.attempt}`)) throw this.endedError(key.sessionId, key.attempt);
      const current = this.sessions.get(diskId);
      if (current !== undefined) {
        if (current.sessionId !== key.sessionId) {
          throw new BlockrelayError('BR_RESYNC_SESSION_BUSY', `disk ${diskId} is held by resync session ${current.sessionId}; one session per disk at a time`, { details: { diskId, sessionId: current.sessionId } });
        }
        if (current.attempt === key.attempt) return current;
        if (current.attempt > key.attempt) throw this.endedError(key.sessionId, key.attempt);
        // A newer attempt of the same resync (the source lost the old one): it takes over.
        await this.end(current, `superseded by attempt ${key.attempt}`);
      }
      return this.open(diskId, key);
    });
  }

  private async open(diskId: string, key: SessionKey): Promise<Session> {
    const access = this.options.access(diskId);
    if (access === undefined) throw new BlockrelayError('BR_DISK_UNKNOWN', `disk ${diskId} is not served here`);
    if (access.drain.state === 'critical') throw new BlockrelayError('BR_DISK_CRITICAL', `disk ${diskId} is in state Critical; resume it before a resync`);
    const received = access.receivedSeq();
    const afterSeq = key.afterSeq ?? received;
    if (afterSeq !== null && (received === null || received < afterSeq)) {
      throw new BlockrelayError('BR_RESYNC_NOT_READY', `disk ${diskId}: the resync follows log ${afterSeq}, but this hop has received logs up to ${received ?? 'none'}`, { details: { afterSeq, receivedSeq: received } });
    }
    const session: Session = { diskId, sessionId: key.sessionId, attempt: key.attempt, access, afterSeq, diskSizeBytes: key.diskSizeBytes, inFlight: 0, idleTimer: undefined, ended: false, drained: [], exchanges: 0, ...(access.kind === 'relay' ? { agent: keepAliveAgent(access.peer) } : {}) };
    // Hold back every log after the anchor, then wait for the ones before it.
    access.drain.hold((entry) => afterSeq === null || entry.envelope.seq > afterSeq);
    try {
      await this.waitReady(session);
      if (access.kind === 'local') {
        // A log after the anchor was applied already (before this session's hold, or while an earlier session of
        // the same attempt was lost with a hop restart): data the source reads now could be older than it.
        const applied = access.appliedSeq();
        if (afterSeq !== null && applied !== null && applied > afterSeq) {
          throw new BlockrelayError('BR_RESYNC_ANCHOR_PASSED', `disk ${diskId}: the resync follows log ${afterSeq}, but log ${applied} is applied already; cut again and open a new attempt`, { details: { afterSeq, appliedSeq: applied } });
        }
        // Before the first write: from now until a resync completes, no applied log ends a consistent point,
        // and only this session's completion can end that (lastSession).
        await this.updateState(diskId, (state) => ({ ...state, inProgress: true, lastSession: { sessionId: key.sessionId, attempt: key.attempt, completed: false } }));
        const target = await access.openTarget(key.diskSizeBytes);
        session.journal = await this.options.journal?.openSession(diskId, target, access.appliedSeq(), key.sessionId);
        session.target = target;
        session.service = new ResyncTargetService(session.journal === undefined ? target : journaledTarget(target, session.journal), await this.blockHasher());
      }
    } catch (err) {
      session.agent?.destroy();
      access.drain.release();
      throw err;
    }
    this.sessions.set(diskId, session);
    this.noteAttempt(key.sessionId, key.attempt);
    this.touch(session);
    // Everything up to the anchor is handled: whatever the drain holds from now on is this session's.
    access.drain.limitHold(this.options.maxHeldBytes ?? Number.POSITIVE_INFINITY, HELD_SHARE_OF_SPOOL, SPOOL_RESERVE_SHARE, (heldBytes) => {
      this.options.logger.warn({ disk: diskId, session: key.sessionId, code: 'BR_RESYNC_HOLD_FULL', heldBytes }, `resync session on disk ${diskId} holds ${heldBytes} bytes of logs, its bound; it ends and they go on, the source resumes in a new session`);
      void this.end(session, 'ended: its held logs reached their bound', undefined, 'BR_RESYNC_HOLD_FULL').catch((err: unknown) => this.options.logger.error({ disk: diskId, err }, 'ending a resync session whose held logs reached their bound failed'));
    });
    this.options.logger.info({ disk: diskId, session: key.sessionId, attempt: key.attempt, afterSeq, relay: access.kind === 'relay' }, `resync session opened on disk ${diskId}, after log ${afterSeq ?? 'none'}`);
    return session;
  }

  /** Waits until the logs up to the anchor are applied (local) or sent on (relay), within readyTimeoutMs. */
  private async waitReady(session: Session): Promise<void> {
    const { access, afterSeq } = session;
    const timeoutMs = this.options.readyTimeoutMs ?? RESYNC_SESSION_DEFAULTS.readyTimeoutMs;
    let timer: TimerHandle | undefined;
    const timedOut = new Promise<'timeout'>((resolve) => {
      timer = this.options.clock.setTimer(() => resolve('timeout'), timeoutMs);
    });
    try {
      const outcome = await Promise.race([access.drain.whenIdle().then(() => 'idle' as const), timedOut]);
      if (access.drain.state === 'critical') throw new BlockrelayError('BR_DISK_CRITICAL', `disk ${session.diskId} went Critical before the resync could start: ${access.drain.lastError?.message ?? ''}`);
      const behind = afterSeq !== null && (access.kind === 'local' ? (access.appliedSeq() ?? -1) < afterSeq : (access.oldestSpooledSeq() ?? Number.POSITIVE_INFINITY) <= afterSeq);
      if (outcome === 'timeout' || behind) {
        throw new BlockrelayError('BR_RESYNC_NOT_READY', `disk ${session.diskId}: logs up to ${afterSeq} are not yet ${access.kind === 'local' ? 'applied' : 'forwarded'} (within ${timeoutMs} ms)`, { details: { afterSeq } });
      }
    } finally {
      timer?.cancel();
    }
  }

  private async exchange(session: Session, body: Buffer): Promise<Buffer> {
    // An empty body only opens the session (the source does so before its first read).
    if (body.length === 0 && session.access.kind === 'local') return body;
    if (session.access.kind === 'relay') {
      return postResync(session.access.peer, 'POST', session.diskId, sessionHeaders({ sessionId: session.sessionId, attempt: session.attempt, diskSizeBytes: session.diskSizeBytes, afterSeq: session.afterSeq ?? undefined }), body, session.agent);
    }
    return session.service!.handle(body);
  }

  private touch(session: Session): void {
    session.idleTimer?.cancel();
    if (session.ended) return;
    session.idleTimer = this.options.clock.setTimer(() => {
      if (session.inFlight > 0) return this.touch(session);
      this.options.logger.warn({ disk: session.diskId, session: session.sessionId, code: 'BR_RESYNC_SESSION_EXPIRED' }, `resync session on disk ${session.diskId} expired; its applier resumes`);
      void this.end(session, 'expired').catch((err: unknown) => this.options.logger.error({ disk: session.diskId, err }, 'ending an expired resync session failed'));
    }, this.options.idleTimeoutMs ?? RESYNC_SESSION_DEFAULTS.idleTimeoutMs);
  }

  /**
   * Ends a session: no request of it is served any more; those in flight
   * finish; the target is flushed and the journal closed; then the held
   * logs go on (relayed: the master target's session is ended first).
   */
  private end(session: Session, why: string, completion?: Completion, code: EndedCode = 'BR_RESYNC_SESSION_EXPIRED'): Promise<void> {
    session.ending ??= this.endOnce(session, why, completion, code);
    return session.ending;
  }

  private async endOnce(session: Session, why: string, completion: Completion | undefined, code: EndedCode): Promise<void> {
    session.ended = true;
    session.idleTimer?.cancel();
    this.remember(`${session.sessionId}:${session.attempt}`, { diskId: session.diskId, code });
    try {
      if (session.inFlight > 0) await new Promise<void>((resolve) => session.drained.push(resolve));
      if (session.access.kind === 'relay') {
        const headers = { ...sessionHeaders({ sessionId: session.sessionId, attempt: session.attempt, diskSizeBytes: session.diskSizeBytes, afterSeq: session.afterSeq ?? undefined }), ...completionHeaders(completion) };
        // With a completion, asked again while the master target is still ending its session (its end work can take minutes).
        const ended = endSession(session.access.peer, session.diskId, headers, completion !== undefined, this.options.clock);
        if (completion !== undefined) {
          // The source must learn if the master target did not record the completion.
          session.relayedEnd = await ended;
        } else {
          await ended.then((answer) => {
            session.relayedEnd = answer;
          }).catch((err: unknown) => {
            // The master target ends it on its own when idle.
            this.options.logger.warn({ disk: session.diskId, code: isBlockrelayError(err) ? err.code : undefined }, `could not end the master target's resync session: ${(err as Error).message}`);
          });
        }
      } else if (session.target !== undefined) {
        await session.target.flush();
        await session.journal?.finish(session.target);
        if (completion !== undefined) await this.complete(session.diskId, completion, session.access.receivedSeq());
      }
    } finally {
      // Only now may another session take the disk (and its own hold).
      if (this.sessions.get(session.diskId) === session) this.sessions.delete(session.diskId);
      session.agent?.destroy();
      session.access.drain.release();
      this.options.logger.info({ disk: session.diskId, session: session.sessionId, attempt: session.attempt, exchanges: session.exchanges }, `resync session on disk ${session.diskId} ${why}`);
    }
  }

  private remember(key: string, ended: { diskId: string; code: EndedCode }): void {
    this.ended.set(key, ended);
    if (this.ended.size > ENDED_SESSIONS_MAX) this.ended.delete(this.ended.keys().next().value!);
  }

  private blockHasher(): Promise<BlockHasher> {
    this.hasher ??= BlockHasher.create();
    return this.hasher;
  }
}

