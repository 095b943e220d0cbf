import * as fsp from 'node:fs/promises';
import * as http from 'node:http';
import * as https from 'node:https';
import { PassThrough, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { BlockrelayError } from '../retry/blockrelay-error';
import { isErrorCode, type ErrorCode } from '../retry/error-codes';
import type { BandwidthLimiter } from './bandwidth-limiter';
import { LZ4_FRAME_BLOCK_BYTES, LZ4_MIN_SAVING_PACED, LZ4_MIN_SAVING_UNPACED, Lz4FrameEncoder } from './lz4-frame-encoder';
import { envelopeHeaders, logPath, PROTOCOL_VERSION, type LogEnvelope } from './transport-protocol';

/**
 * The sending side of the transport protocol: uploads one sealed log to the
 * next hop and turns every way that can fail into a coded error, so the
 * retry policy can decide from the code alone.
 */
export interface PeerOptions {
  /** Base URL of the next hop, e.g. `http://127.0.0.1:9440`. */
  readonly url: string;
  readonly secret: string;
  /** CA certificate(s) to trust for an https peer. */
  readonly ca?: Buffer | undefined;
  /** Abandon a request that makes no progress for this long. */
  readonly timeoutMs?: number;
}

export interface SendOptions {
  readonly lz4?: boolean;
  readonly limiter?: BandwidthLimiter | undefined;
  /**
   * Called once the whole body is handed to the socket, before the answer:
   * the receiver is making the log durable, and a sender may start the next
   * one (src/transport/upload-pipeline.ts).
   */
  readonly onBodySent?: () => void;
  /** Called once the request's headers and first bytes are handed to the socket (the peer takes uploads of a disk in the order they begin). */
  readonly onStarted?: () => void;
}

const DEFAULT_TIMEOUT_MS = 60_000;

const agents = { http: new http.Agent({ keepAlive: true, maxSockets: 16 }), https: new https.Agent({ keepAlive: true, maxSockets: 16 }) };

/** Maps a failed HTTP answer to the coded error the peer sent, or one from the status. */
export function errorFromResponse(status: number, body: string): BlockrelayError {
  let parsed: { error?: { code?: string; message?: string; details?: Record<string, string | number | boolean | null> } } | undefined;
  try {
    parsed = JSON.parse(body) as typeof parsed;
  } catch {
    parsed = undefined;
  }
  const code = parsed?.error?.code;
  const message = parsed?.error?.message ?? `HTTP ${status}: ${body.slice(0, 200)}`;
  if (code !== undefined && isErrorCode(code)) return new BlockrelayError(code, `peer: ${message}`, { details: parsed?.error?.details ?? {} });
  let mapped: ErrorCode;
  if (status === 401 || status === 403) mapped = 'BR_AUTH_FAILED';
  else if (status === 429 || status === 503) mapped = 'BR_PEER_BUSY';
  else if (status === 507) mapped = 'BR_SPOOL_FULL';
  else if (status >= 500) mapped = 'BR_PEER_ERROR';
  else mapped = 'BR_PROTOCOL';
  return new BlockrelayError(mapped, `peer: ${message}`);
}

/** Maps a socket-level failure to a coded, recoverable error. */
export function errorFromNetwork(err: NodeJS.ErrnoException, what: string): BlockrelayError {
  if (err instanceof BlockrelayError) return err;
  const timeout = err.code === 'ETIMEDOUT' || err.code === 'ESOCKETTIMEDOUT' || err.message === 'timeout';
  return new BlockrelayError(timeout ? 'BR_NET_TIMEOUT' : 'BR_NET_UNREACHABLE', `${what}: ${err.code ?? ''} ${err.message}`.trim(), { cause: err });
}

/** Writes a request's body and ends it; rejects if the body cannot be written (the request is destroyed then). */
export type BodyWriter = (req: http.ClientRequest) => Promise<void>;

/** One request to a peer (see peerRequest). */
export interface PeerRequest {
  readonly method: string;
  /** Path and query, resolved against the peer's URL. */
  readonly path: string;
  /** Sent as given, with the peer's secret as a bearer token added. */
  readonly headers: Record<string, string>;
  /** Writes and ends the body; none: the request is sent without one. */
  readonly body?: BodyWriter | undefined;
  /** Called once the body is written, before the answer (SendOptions.onBodySent). */
  readonly onBodySent?: (() => void) | undefined;
  /** Connections: this module's kept-alive pool when undefined, a caller's pool, or false for a connection of its own. */
  readonly agent?: http.Agent | false | undefined;
  /** The request's timeout when the peer names none (default 60 s). */
  readonly defaultTimeoutMs?: number;
  /** Answer bytes kept (default 64 KiB, ample for the JSON answers of the log routes). */
  readonly maxAnswerBytes?: number;
  /** An answer longer than maxAnswerBytes fails with this code; undefined: it is cut there (the rest is read and dropped). */
  readonly answerTooLarge?: ErrorCode | undefined;
}

/** A peer's answer: status and (bounded) body. */
export interface PeerAnswer {
  readonly status: number;
  readonly body: Buffer;
}

const DEFAULT_MAX_ANSWER_BYTES = 64 * 1024;

/**
 * One HTTP(S) request to a peer, every failure coded: socket failures and
 * timeouts become BR_NET_UNREACHABLE / BR_NET_TIMEOUT (recoverable), an
 * answer cut short too. Resolves with any status; the caller maps the ones
 * it does not expect (errorFromResponse). A failure on a kept-alive
 * connection the peer had closed as it was reused (ECONNRESET on a reused
 * socket) carries `reusedSocket: true`, so an idempotent exchange may be
 * sent again on a fresh connection.
 */
export function peerRequest(peer: PeerOptions, r: PeerRequest): Promise<PeerAnswer> {
  const url = new URL(r.path, peer.url);
  const secure = url.protocol === 'https:';
  const lib = secure ? https : http;
  const what = `${r.method} ${url.href}`;
  const maxAnswerBytes = r.maxAnswerBytes ?? DEFAULT_MAX_ANSWER_BYTES;
  return new Promise<PeerAnswer>((resolve, reject) => {
    let settled = false;
    const finish = (fn: () => void): void => {
      if (!settled) {
        settled = true;
        fn();
      }
    };
    const req = lib.request(
      url,
      {
        method: r.method,
        headers: { ...r.headers, authorization: `Bearer ${peer.secret}` },
        agent: r.agent !== undefined ? r.agent : secure ? (peer.ca ? undefined : agents.https) : agents.http,
        ...(secure && peer.ca ? { ca: peer.ca } : {}),
        timeout: peer.timeoutMs ?? r.defaultTimeoutMs ?? DEFAULT_TIMEOUT_MS,
      },
      (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (c: Buffer) => {
          if (size + c.length > maxAnswerBytes && r.answerTooLarge !== undefined) {
            const code = r.answerTooLarge;
            // Settled first: destroying the answer reports it cut short, synchronously.
            finish(() => reject(new BlockrelayError(code, `${what}: answer exceeds ${maxAnswerBytes} bytes`, { details: { offset: size + c.length } })));
            res.destroy();
            return;
          }
          if (size < maxAnswerBytes) chunks.push(c.length <= maxAnswerBytes - size ? c : c.subarray(0, maxAnswerBytes - size));
          size += c.length;
        });
        res.on('end', () => finish(() => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) })));
        res.on('error', (err) => finish(() => reject(errorFromNetwork(err, what))));
        res.on('aborted', () => finish(() => reject(errorFromNetwork(Object.assign(new Error('answer cut short'), { code: 'ECONNRESET' }), what))));
      },
    );
    req.on('timeout', () => req.destroy(Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' })));
    req.on('error', (err) =>
      finish(() => {
        const coded = errorFromNetwork(err, what);
        const stale = req.reusedSocket && (err as NodeJS.ErrnoException).code === 'ECONNRESET';
        reject(stale ? Object.assign(coded, { reusedSocket: true }) : coded);
      }),
    );
    if (r.body === undefined) {
      req.end();
      return;
    }
    r.body(req).then(() => {
      if (!settled) r.onBodySent?.();
    }, (err: NodeJS.ErrnoException) => {
      // The peer may answer (e.g. 401, spool full) before reading the whole
      // body; its answer, not our broken pipe, is what happened.
      setTimeout(() => finish(() => reject(errorFromNetwork(err, what))), 200);
    });
  });
}

export interface SendResult {
  readonly status: number;
  readonly duplicate: boolean;
}

/** Bytes an upload reads from its log file at a time (a multiple of the lz4 frame's 64 KiB blocks). */
export const UPLOAD_READ_CHUNK_BYTES = 1024 * 1024;
/** Read buffers of one upload, reused as the socket takes their bytes. */
const UPLOAD_READ_BUFFERS = 4;

/**
 * Streams a log file into a request: read into a few buffers that are
 * reused once the socket has taken their bytes (a fresh buffer per read
 * made the runtime run a full garbage collection every 64 MiB or so),
 * lz4-framed and paced when asked, then ends the request.
 */
function logFileBody(file: string, options: SendOptions): BodyWriter {
  return async (req) => {
    // Listen for the request's end before anything is awaited: a request
    // refused while the file opens (ECONNREFUSED as a hop restarts) closes
    // then, and a 'close' missed here left the body waiting at req.end()
    // forever, its file handle closed only by the garbage collector.
    let wake: (() => void) | undefined;
    let closed = req.destroyed;
    const onClose = (): void => {
      closed = true;
      wake?.();
    };
    req.once('close', onClose);
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(file, 'r');
    } catch (err) {
      req.off('close', onClose);
      req.destroy(err as Error);
      throw err;
    }
    const limiter = options.limiter !== undefined && !options.limiter.unlimited ? options.limiter : undefined;
    // Only a paced link is worth compressing blocks that barely shrink (lz4-frame-encoder.ts).
    const encoder = options.lz4 ? new Lz4FrameEncoder({ minSaving: limiter === undefined ? LZ4_MIN_SAVING_UNPACED : LZ4_MIN_SAVING_PACED }) : undefined;
    // lz4-framed, each read goes straight into a frame's layout (block data
    // after room for its size field, read with one readv), so a read of
    // blocks that are stored goes out as one piece instead of two per block.
    const free: Buffer[] = [];
    const slotsOf = new Map<Buffer, Buffer[]>();
    for (let i = 0; i < UPLOAD_READ_BUFFERS; i++) {
      if (encoder === undefined) {
        free.push(Buffer.allocUnsafeSlow(UPLOAD_READ_CHUNK_BYTES));
        continue;
      }
      const frame = Buffer.allocUnsafeSlow(Lz4FrameEncoder.laidOutBytes(UPLOAD_READ_CHUNK_BYTES));
      const slots: Buffer[] = [];
      for (let b = 0; b < UPLOAD_READ_CHUNK_BYTES / LZ4_FRAME_BLOCK_BYTES; b++) {
        const at = Lz4FrameEncoder.laidOutDataOffset(b);
        slots.push(frame.subarray(at, at + LZ4_FRAME_BLOCK_BYTES));
      }
      slotsOf.set(frame, slots);
      free.push(frame);
    }
    const gone = (): Error => Object.assign(new Error('request closed while sending its body'), { code: 'ECONNRESET' });
    /** Waits until the socket can take more (or a buffer came back). */
    const settle = (event: 'drain' | 'buffer'): Promise<void> => new Promise<void>((resolve) => {
      if (closed) return resolve();
      wake = () => {
        wake = undefined;
        req.off('drain', resolveDrain);
        resolve();
      };
      const resolveDrain = (): void => wake?.();
      if (event === 'drain') req.once('drain', resolveDrain);
    });
    // A read's pieces (up to 32 of an lz4-framed MiB) go out together, and
    // the socket's drain is awaited once after them: what is queued stays
    // bounded by the read buffers, which return only once written.
    let started = false;
    const write = async (pieces: Buffer[], done?: () => void): Promise<void> => {
      if (!started && pieces.length > 0) {
        started = true;
        queueMicrotask(() => options.onStarted?.());
      }
      let full = false;
      for (let i = 0; i < pieces.length; i++) {
        if (closed) throw gone();
        const piece = pieces[i]!;
        if (limiter !== undefined) {
          for (let off = 0; off < piece.length; off += limiter.chunkBytes) await limiter.take(Math.min(limiter.chunkBytes, piece.length - off));
        }
        const last = i === pieces.length - 1;
        if (!req.write(piece, last ? done : undefined)) full = true;
      }
      if (pieces.length === 0) done?.();
      if (full) await settle('drain');
    };
    try {
      if (encoder !== undefined) await write([await Lz4FrameEncoder.header()]);
      for (let position = 0; ;) {
        while (free.length === 0) {
          if (closed) throw gone();
          await settle('buffer');
        }
        const buffer = free.pop()!;
        const slots = slotsOf.get(buffer);
        const { bytesRead } = slots === undefined ? await fh.read(buffer, 0, buffer.length, position) : await fh.readv(slots, position);
        if (bytesRead === 0) break;
        position += bytesRead;
        // The buffer comes back once the socket has written the last piece that views it.
        await write(encoder === undefined ? [buffer.subarray(0, bytesRead)] : encoder.encodeLaidOut(buffer, bytesRead), () => {
          free.push(buffer);
          wake?.();
        });
      }
      if (encoder !== undefined) await write(encoder.finish());
      if (closed) throw gone();
      await new Promise<void>((resolve, reject) => {
        // 'finish' never comes to a request destroyed first.
        const onEarlyClose = (): void => reject(gone());
        req.once('close', onEarlyClose);
        req.end(() => {
          req.off('close', onEarlyClose);
          resolve();
        });
      });
    } catch (err) {
      req.destroy(err as Error);
      throw err;
    } finally {
      req.off('close', onClose);
      await fh.close();
    }
  };
}

/** Uploads one sealed log file with its envelope; resolves when the peer holds it durably. */
export async function sendLog(peer: PeerOptions, envelope: LogEnvelope, file: string, options: SendOptions = {}): Promise<SendResult> {
  return sendLogBody(peer, envelope, logFileBody(file, options), options);
}

/**
 * Uploads one log whose body `body` writes (an lz4 frame stream when
 * `options.lz4`, else the log itself, `envelope.logLength` bytes); resolves
 * when the peer holds it durably. A cut-through forward passes on an
 * upload as it arrives this way (cut-through-forward.ts).
 */
export async function sendLogBody(peer: PeerOptions, envelope: LogEnvelope, body: BodyWriter, options: Pick<SendOptions, 'lz4' | 'onBodySent'> = {}): Promise<SendResult> {
  const headers: Record<string, string> = {
    ...envelopeHeaders(envelope),
    'content-type': 'application/octet-stream',
  };
  if (options.lz4) headers['x-blockrelay-encoding'] = 'lz4';
  else headers['content-length'] = String(envelope.logLength);
  const answer = await peerRequest(peer, { method: 'PUT', path: logPath(envelope.diskId, envelope.seq), headers, body, onBodySent: options.onBodySent });
  if (answer.status === 200 || answer.status === 201) return { status: answer.status, duplicate: answer.status === 200 };
  throw errorFromResponse(answer.status, answer.body.toString('utf8'));
}

/** What a hop knows of a disk: the next sequence number it expects (null: any). */
export interface DiskState {
  readonly diskId: string;
  readonly nextSeq: number | null;
}

export async function getDiskState(peer: PeerOptions, diskId: string): Promise<DiskState> {
  const answer = await peerRequest(peer, { method: 'GET', path: `/${PROTOCOL_VERSION}/disks/${encodeURIComponent(diskId)}`, headers: {} });
  const text = answer.body.toString('utf8');
  if (answer.status !== 200) throw errorFromResponse(answer.status, text);
  return JSON.parse(text) as DiskState;
}

/** A JSON call to a peer's API (status, tags); used by the CLI. */
export async function callJson(peer: PeerOptions, method: string, path: string, body?: unknown): Promise<unknown> {
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  const answer = await peerRequest(peer, {
    method,
    path,
    headers: payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': String(payload.length) },
    body: payload === undefined ? undefined : (req) => pipeline(PassThrough.from(payload) as Readable, req),
  });
  const text = answer.body.toString('utf8');
  if (answer.status < 200 || answer.status >= 300) throw errorFromResponse(answer.status, text);
  return text === '' ? undefined : JSON.parse(text);
}
