import type * as http from 'node:http';
import { sendLogBody, type PeerOptions, type SendResult } from './log-client';
import { LZ4_MIN_SAVING_UNPACED, Lz4FrameEncoder } from './lz4-frame-encoder';
import type { LogEnvelope } from './transport-protocol';

/**
 * Most bytes a cut-through forward lets wait for the next hop's socket. It
 * never slows the upload it passes on (the process server's own receipt of
 * the log comes first): when the next hop takes the bytes slower than they
 * arrive, the forward is abandoned past this bound, and the log goes from
 * the spool as usual once it is committed.
 */
export const CUT_THROUGH_MAX_QUEUED_BYTES = 64 * 1024 * 1024;

export interface CutThroughForwardOptions {
  readonly peer: PeerOptions;
  /** The upload's envelope, parsed from its headers: it travels on unchanged. */
  readonly envelope: LogEnvelope;
  /** The upload arriving at this hop: a plain body (not lz4) of `envelope.logLength` bytes. */
  readonly incoming: http.IncomingMessage;
  /** This hop's answer to it: one sent before the whole body arrived is a refusal, and ends the forward. */
  readonly response: http.ServerResponse;
  /**
   * Send nothing until start() (the log before this one has not gone out
   * to the next hop yet, and must reach it first): what arrives meanwhile
   * is kept, within the same bound as the socket's queue.
   */
  readonly deferStart?: boolean;
  readonly maxQueuedBytes?: number;
}

/**
 * Forwards a log to the next hop while it still arrives here (the process
 * server's cut-through, docs/transport.md): every chunk of the incoming
 * upload goes on, lz4-framed as blocks of its own (views of the chunk, no
 * copy), beside the receiver's own streaming of the log into the spool. It
 * only listens to the upload: it never pauses, consumes or fails it, so the
 * receiver's checks, fsync and answer are exactly what they are without it.
 *
 * Why passing bytes on before this hop has verified and fsynced them is
 * safe: the next hop verifies the log on its own (length, xxhash64 of the
 * envelope, [MS-HRL]) before it accepts it, so a damaged upload is refused
 * there as here; an upload that breaks off, grows past its declared length
 * or is answered (refused) here before it arrived whole makes the forward
 * destroy its request, which the next hop discards as incomplete. A log the
 * next hop accepted but this hop did not (a local failure here) is sent
 * again by the source, and the next hop answers that resend as a duplicate.
 * Nothing is lost either way: the sender deletes a log only after this
 * hop's own durable answer, and this hop deletes it only after the next
 * hop's.
 */
export class CutThroughForward {
  /** The next hop's answer: resolves once it holds the log durably (or applied it); rejects if abandoned or refused. */
  readonly result: Promise<SendResult>;
  /** Resolves true once the whole body is on the wire, false if the forward ended before. */
  readonly bodySent: Promise<boolean>;
  private readonly encoder = new Lz4FrameEncoder({ minSaving: LZ4_MIN_SAVING_UNPACED });
  private started = false;
  private settleResult!: { resolve: (r: SendResult) => void; reject: (err: Error) => void };
  private readonly maxQueuedBytes: number;
  private out: http.ClientRequest | undefined;
  /** Frame pieces made before the request could take them (while the frame header is prepared). */
  private early: Buffer[] = [];
  private earlyBytes = 0;
  private receivedBytes = 0;
  private incomingEnded = false;
  private finished = false;
  private abandoned: Error | undefined;
  private writerDone: { resolve: () => void; reject: (err: Error) => void } | undefined;
  private resolveBodySent!: (sent: boolean) => void;
  private readonly onData = (chunk: Buffer): void => this.take(chunk);
  private readonly onEnd = (): void => {
    this.incomingEnded = true;
    if (this.out !== undefined) this.finish();
  };
  private readonly onClose = (): void => {
    if (!this.incomingEnded) this.abandon('the upload broke off');
  };
  private readonly onAnswered = (): void => {
    if (!this.incomingEnded) this.abandon('the upload was answered before it arrived whole');
  };

  constructor(private readonly options: CutThroughForwardOptions) {
    this.maxQueuedBytes = options.maxQueuedBytes ?? CUT_THROUGH_MAX_QUEUED_BYTES;
    this.bodySent = new Promise<boolean>((resolve) => {
      this.resolveBodySent = resolve;
    });
    this.result = new Promise<SendResult>((resolve, reject) => {
      this.settleResult = { resolve, reject };
    });
    this.result.catch(() => undefined);
    const { incoming } = options;
    // Listening for data would start the upload flowing before the receiver
    // pipes it anywhere; paused, it flows once the receiver's pipe resumes
    // it, and every chunk then comes to both.
    incoming.on('data', this.onData);
    incoming.pause();
    incoming.on('end', this.onEnd);
    incoming.on('close', this.onClose);
    options.response.on('finish', this.onAnswered);
    options.response.on('close', this.onAnswered);
    if (options.deferStart !== true) this.start();
  }

  /** Whether the request to the next hop has begun (at once, or at start()). */
  get isStarted(): boolean {
    return this.started;
  }

  /** Whether it ended before its whole body went out. */
  get isAbandoned(): boolean {
    return this.abandoned !== undefined;
  }

  /** Begins the request to the next hop (a no-op once begun or abandoned). */
  start(): void {
    if (this.started || this.abandoned !== undefined) return;
    this.started = true;
    sendLogBody(this.options.peer, this.options.envelope, (req) => this.write(req), { lz4: true, onBodySent: () => this.resolveBodySent(true) }).then(
      (answer) => {
        this.detach();
        this.settleResult.resolve(answer);
      },
      (err: Error) => {
        // Refused early (a gap, a busy receiver): stop passing bytes on.
        this.abandon('the next hop refused it');
        this.settleResult.reject(err);
      },
    );
  }

  /** Ends the forward unless its whole body is out already (the next hop then discards what it got). */
  abandon(reason: string): void {
    if (this.finished || this.abandoned !== undefined) return;
    this.abandoned = Object.assign(new Error(`cut-through of log ${this.options.envelope.seq} abandoned: ${reason}`), { code: 'ECONNRESET' });
    this.detach();
    this.early = [];
    this.out?.destroy(this.abandoned);
    this.writerDone?.reject(this.abandoned);
    this.resolveBodySent(false);
    // Never begun: no request will settle it.
    if (!this.started) this.settleResult.reject(this.abandoned);
  }

  private detach(): void {
    const { incoming, response } = this.options;
    incoming.off('data', this.onData);
    incoming.off('end', this.onEnd);
    incoming.off('close', this.onClose);
    response.off('finish', this.onAnswered);
    response.off('close', this.onAnswered);
  }

  /** The request's body writer: resolves once the body is ended, rejects once abandoned. */
  private async write(req: http.ClientRequest): Promise<void> {
    const header = await Lz4FrameEncoder.header();
    if (this.abandoned !== undefined) {
      req.destroy(this.abandoned);
      throw this.abandoned;
    }
    const ended = new Promise<void>((resolve, reject) => {
      this.writerDone = { resolve, reject };
    });
    req.once('close', () => {
      if (!this.finished) this.abandon('the next hop closed the request');
    });
    req.write(header);
    for (const piece of this.early) req.write(piece);
    this.early = [];
    this.earlyBytes = 0;
    this.out = req;
    if (this.incomingEnded) this.finish();
    return ended;
  }

  private take(chunk: Buffer): void {
    if (this.abandoned !== undefined) return;
    if (this.options.response.headersSent) return this.abandon('the upload was answered before it arrived whole');
    this.receivedBytes += chunk.length;
    if (this.receivedBytes > this.options.envelope.logLength) return this.abandon(`the upload is longer than its declared ${this.options.envelope.logLength} bytes`);
    const pieces = this.encoder.encodeChunk(chunk);
    const out = this.out;
    if (out === undefined) {
      for (const piece of pieces) this.earlyBytes += piece.length;
      this.early.push(...pieces);
      if (this.earlyBytes > this.maxQueuedBytes) this.abandon(`${this.earlyBytes} bytes arrived before the request could start`);
      return;
    }
    for (const piece of pieces) out.write(piece);
    if (out.writableLength > this.maxQueuedBytes) this.abandon(`the next hop takes it slower than it arrives (${out.writableLength} bytes queued)`);
  }

  private finish(): void {
    if (this.abandoned !== undefined || this.finished) return;
    if (this.receivedBytes !== this.options.envelope.logLength) return this.abandon(`the upload ended after ${this.receivedBytes} of ${this.options.envelope.logLength} bytes`);
    if (this.options.response.headersSent) return this.abandon('the upload was answered before it arrived whole');
    const out = this.out!;
    for (const piece of this.encoder.finish()) out.write(piece);
    this.finished = true;
    this.detach();
    out.end(() => this.writerDone?.resolve());
  }
}
