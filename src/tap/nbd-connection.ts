import type { Socket } from 'node:net';
import { ByteQueue } from './byte-queue';
import * as P from './nbd-protocol';
import type { ServedExport } from './served-export';
import type { WriteRecorder } from './nbd-export';
import type { GateTicket } from './write-order-gate';
import type { PayloadPool } from './payload-pool';
import type { Clock, TimerHandle } from '../platform/clock';
import { isBlockrelayError } from '../retry/blockrelay-error';
import { loadNativeTap, NATIVE_TAP_MODE, type NativeTapConnection } from '../platform/native';
import { ChangeTracker } from '../tracking/change-tracker';

/** Bounds on what one client connection may hold. */
export interface NbdConnectionLimits {
  /** Requests dispatched and not yet answered; beyond it the socket is paused. */
  readonly maxInFlightRequests: number;
  /**
   * Bytes held for a connection: unparsed input, write payloads in flight,
   * read data in flight and replies queued on the socket. Beyond it the
   * socket is paused. Must exceed the max block size plus one header.
   */
  readonly maxBufferedBytes: number;
  /** Option data longer than this ends the session (a denial-of-service guard). */
  readonly maxOptionBytes: number;
  /** Options one session may send before it is cut off. */
  readonly maxOptions: number;
  /** A client that has not entered transmission by then is disconnected. */
  readonly handshakeTimeoutMs: number;
}

export const DEFAULT_NBD_CONNECTION_LIMITS: NbdConnectionLimits = {
  maxInFlightRequests: 64,
  maxBufferedBytes: 80 * 1024 * 1024,
  maxOptionBytes: 64 * 1024,
  maxOptions: 256,
  handshakeTimeoutMs: 30_000,
};

/** What a connection needs from its server. */
export interface ConnectionHost {
  readonly limits: NbdConnectionLimits;
  readonly clock: Clock;
  readonly shuttingDown: boolean;
  /** Buffers for payloads that straddle socket chunks, shared by the server's connections. */
  readonly payloadPool: PayloadPool;
  findExport(name: string): ServedExport | undefined;
  listExports(): readonly ServedExport[];
  /** Called once when the connection has closed and every request it started has finished. */
  connectionFinished(conn: NbdConnection): void;
  warn(message: string, details?: Record<string, unknown>): void;
}

/** How long a soft-closed session waits for the client to close its side before it is dropped. */
const CLOSE_GRACE_MS = 5_000;

const enum Phase {
  ClientFlags,
  Options,
  Transmission,
  Closed,
}

/** Events of a native connection thread (native/tap-transmission.cc). */
const NATIVE_EVENT = { intent: 1, flush: 2, slow: 3, writeFailed: 4, exit: 5 } as const;
/** Why a native connection thread ended. */
const NATIVE_EXIT = { peerClosed: 0, badMagic: 1, socketError: 2, stopped: 3, disconnect: 4 } as const;
/** How long the handover to the native thread waits for the handshake's last replies to leave. */
const NATIVE_HANDOVER_TIMEOUT_MS = 5_000;

/** Counters a connection keeps for tests and metrics. */
export interface NbdConnectionStats {
  requests: number;
  errorReplies: number;
  bytesWritten: number;
  bytesRead: number;
}

/**
 * One client session: fixed newstyle handshake, then the transmission phase
 * with many requests in flight and replies in completion order.
 *
 * Bad input never throws out of here: a malformed request gets an NBD error
 * reply where the stream can continue, and a hard disconnect where it cannot
 * (wrong magic, an option that breaks the framing). A write payload is never
 * applied unless the whole request was valid and every byte of it arrived.
 */
export class NbdConnection {
  readonly stats: NbdConnectionStats = { requests: 0, errorReplies: 0, bytesWritten: 0, bytesRead: 0 };
  private readonly input = new ByteQueue();
  private phase = Phase.ClientFlags;
  private noZeroes = false;
  private optionCount = 0;
  private exp: ServedExport | undefined;
  private handshakeTimer: TimerHandle | undefined;

  /** Request header being assembled; reused to avoid an allocation per request. */
  private readonly header: P.RequestHeader = { magic: 0, flags: 0, type: 0, handleHi: 0, handleLo: 0, offset: 0, length: 0 };
  /** A valid WRITE whose payload has not fully arrived. */
  private pendingWrite: { flags: number; handleHi: number; handleLo: number; offset: number; length: number } | undefined;
  /** Payload bytes of a refused WRITE still to be thrown away. */
  private skipBytes = 0;

  private inFlight = 0;
  private heldBytes = 0;
  /** Parsing stops while the connection holds too much (see overLimits). */
  private parsingBlocked = false;
  private socketPaused = false;
  private disconnectRequested = false;
  private corked = false;
  private finishedReported = false;
  /**
   * The native data path: 'off' (TypeScript parses every request), 'starting'
   * (handing the socket over), 'on' (a native thread owns the socket for
   * reading and writing), 'ended' (the thread is gone; the socket is ours
   * again, only to answer what is in flight and close).
   */
  private nativeState: 'off' | 'starting' | 'on' | 'ended' = 'off';
  private nativeConn: NativeTapConnection | undefined;
  /**
   * The slow request (TRIM, WRITE_ZEROES, …) the native thread waits on,
   * by an id of ours: clients may reuse a handle for requests in flight.
   */
  private nativeSlow: { id: number; paused: boolean } | undefined;
  private nativeSlowIds = 0;
  /** Destroy the socket once the native thread has let go of it. */
  private destroyAfterNative = false;

  constructor(
    private readonly socket: Socket,
    private readonly host: ConnectionHost,
  ) {
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('drain', () => this.maybeResume());
    // A client vanishing produces ECONNRESET/EPIPE; the 'close' that follows does the cleanup.
    socket.on('error', () => {});
    socket.on('close', () => this.onClose());
    this.handshakeTimer = host.clock.setTimer(() => {
      if (this.phase === Phase.ClientFlags || this.phase === Phase.Options) {
        host.warn('NBD client did not finish the handshake in time; disconnecting', { remote: this.remote() });
        this.hardDisconnect();
      }
    }, host.limits.handshakeTimeoutMs);
    this.send(P.encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES));
  }

  /** The export this session entered transmission with, if any. */
  get exportName(): string | undefined {
    return this.exp?.name;
  }

  get requestsInFlight(): number {
    return this.inFlight;
  }

  /**
   * Server shutdown: stop reading requests, let the ones in flight finish and
   * answer, then close. The client sees a disconnect only after every
   * request it got an answer for was carried out.
   */
  shutdown(): void {
    if (this.phase === Phase.Closed) return;
    this.disconnectRequested = true;
    this.pauseReading();
    this.input.clear();
    if (this.nativeConn !== undefined) {
      // The thread stops reading and answers what it carried out; its exit
      // ends the session once nothing is in flight.
      this.nativeConn.stop(true);
      return;
    }
    if (this.inFlight === 0) this.endSession();
  }

  /** Drops the connection at once (hard disconnect). */
  hardDisconnect(): void {
    if (this.phase === Phase.Closed) return;
    this.phase = Phase.Closed;
    this.input.clear();
    if (this.nativeConn !== undefined) {
      // The descriptor stays open until the thread has let go of it.
      this.destroyAfterNative = true;
      this.nativeConn.stop(false);
      return;
    }
    this.socket.destroy();
  }

  private remote(): string {
    return `${this.socket.remoteAddress ?? '?'}:${this.socket.remotePort ?? '?'}`;
  }

  // --- input -----------------------------------------------------------------

  private onData(chunk: Buffer): void {
    if (this.phase === Phase.Closed || this.disconnectRequested) return;
    this.input.push(chunk);
    this.process();
  }

  private process(): void {
    while (this.phase !== Phase.Closed && !this.disconnectRequested) {
      let progressed: boolean;
      switch (this.phase) {
        case Phase.ClientFlags:
          progressed = this.readClientFlags();
          break;
        case Phase.Options:
          progressed = this.readOption();
          break;
        case Phase.Transmission:
          progressed = this.readRequest();
          break;
        default:
          progressed = false;
      }
      if (!progressed) break;
    }
    this.updateSocketFlow();
  }

  private readClientFlags(): boolean {
    if (this.input.length < P.CLIENT_FLAGS_BYTES) return false;
    const flags = this.input.take(P.CLIENT_FLAGS_BYTES).readUInt32BE(0);
    const known = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES;
    if ((flags & ~known) !== 0) {
      // The protocol requires dropping a client that sets flags we did not offer.
      this.host.warn('NBD client sent unknown client flags; disconnecting', { remote: this.remote(), flags });
      this.hardDisconnect();
      return false;
    }
    this.noZeroes = (flags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
    this.phase = Phase.Options;
    return true;
  }

  // --- handshake options ------------------------------------------------------

  private readOption(): boolean {
    if (this.pendingOption === undefined) {
      if (this.input.length < P.OPTION_HEADER_BYTES) return false;
      const head = this.input.take(P.OPTION_HEADER_BYTES);
      if (!head.subarray(0, 8).equals(P.NBD_OPTS_MAGIC)) {
        this.host.warn('NBD client sent an option without the IHAVEOPT magic; disconnecting', { remote: this.remote() });
        this.hardDisconnect();
        return false;
      }
      const option = head.readUInt32BE(8);
      const dataBytes = head.readUInt32BE(12);
      if (dataBytes > this.host.limits.maxOptionBytes || ++this.optionCount > this.host.limits.maxOptions) {
        this.host.warn('NBD client option too long or too many options; disconnecting', { remote: this.remote(), option, dataBytes });
        this.hardDisconnect();
        return false;
      }
      this.pendingOption = { option, dataBytes };
    }
    const pending = this.pendingOption;
    if (this.input.length < pending.dataBytes) return false;
    this.pendingOption = undefined;
    this.handleOption(pending.option, this.input.take(pending.dataBytes));
    return true;
  }

  /** An option whose header arrived and whose data has not (fully). */
  private pendingOption: { option: number; dataBytes: number } | undefined;

  private handleOption(option: number, data: Buffer): void {
    if (this.host.shuttingDown && option !== P.NBD_OPT_ABORT) {
      this.send(P.encodeOptionError(option, P.NBD_REP_ERR_SHUTDOWN, 'server is shutting down'));
      return;
    }
    switch (option) {
      case P.NBD_OPT_EXPORT_NAME: {
        const exp = this.lookupExport(data.toString('utf8'));
        if (exp === undefined) {
          // NBD_OPT_EXPORT_NAME cannot carry an error: the protocol mandates a hard disconnect.
          this.host.warn('NBD client asked for an unknown export; disconnecting', { remote: this.remote(), name: data.toString('utf8') });
          this.hardDisconnect();
          return;
        }
        this.send(P.encodeExportNameReply(exp.sizeBytes, exp.transmissionFlags, this.noZeroes));
        this.enterTransmission(exp);
        return;
      }
      case P.NBD_OPT_ABORT:
        this.send(P.encodeOptionReply(option, P.NBD_REP_ACK));
        this.endSession();
        return;
      case P.NBD_OPT_LIST:
        if (data.length !== 0) {
          this.send(P.encodeOptionError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data'));
          return;
        }
        for (const exp of this.host.listExports()) {
          this.send(P.encodeOptionReply(option, P.NBD_REP_SERVER, P.encodeServerEntry(exp.name, exp.description)));
        }
        this.send(P.encodeOptionReply(option, P.NBD_REP_ACK));
        return;
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO:
        this.handleInfoOrGo(option, data);
        return;
      default:
        // STARTTLS, STRUCTURED_REPLY, meta contexts and anything unknown.
        this.send(P.encodeOptionError(option, P.NBD_REP_ERR_UNSUP, `option ${option} is not supported by this server`));
    }
  }

  private handleInfoOrGo(option: number, data: Buffer): void {
    const request = P.decodeGoRequest(data);
    if (request === undefined) {
      this.send(P.encodeOptionError(option, P.NBD_REP_ERR_INVALID, 'malformed NBD_OPT_INFO/NBD_OPT_GO data'));
      return;
    }
    const exp = this.lookupExport(request.name);
    if (exp === undefined) {
      this.send(P.encodeOptionError(option, P.NBD_REP_ERR_UNKNOWN, `no export named '${request.name}'`));
      return;
    }
    this.send(P.encodeOptionReply(option, P.NBD_REP_INFO, P.encodeInfoExport(exp.sizeBytes, exp.transmissionFlags)));
    // Block sizes are sent whether asked for or not (the protocol allows it),
    // so clients that read them stay inside our maximum.
    this.send(P.encodeOptionReply(option, P.NBD_REP_INFO, P.encodeInfoBlockSize(exp.minBlockBytes, exp.preferredBlockBytes, exp.maxBlockBytes)));
    if (request.infoRequests.includes(P.NBD_INFO_NAME)) {
      this.send(P.encodeOptionReply(option, P.NBD_REP_INFO, P.encodeInfoString(P.NBD_INFO_NAME, exp.name)));
    }
    if (request.infoRequests.includes(P.NBD_INFO_DESCRIPTION) && exp.description !== '') {
      this.send(P.encodeOptionReply(option, P.NBD_REP_INFO, P.encodeInfoString(P.NBD_INFO_DESCRIPTION, exp.description)));
    }
    this.send(P.encodeOptionReply(option, P.NBD_REP_ACK));
    if (option === P.NBD_OPT_GO) this.enterTransmission(exp);
  }

  /** The empty name selects the default export, which exists when exactly one is served. */
  private lookupExport(name: string): ServedExport | undefined {
    if (name === '') {
      const all = this.host.listExports();
      return all.length === 1 ? all[0] : undefined;
    }
    return this.host.findExport(name);
  }

  private enterTransmission(exp: ServedExport): void {
    this.exp = exp;
    this.phase = Phase.Transmission;
    this.handshakeTimer?.cancel();
    this.handshakeTimer = undefined;
    if (exp.native !== undefined) this.handOverToNative();
  }

  // --- native data path ---------------------------------------------------------

  /**
   * Hands the socket to a native thread (native/tap-transmission.cc) for the
   * transmission phase: Node stops reading it, the handshake's last replies
   * are let out, and whatever the client already sent goes to the thread
   * first. Falls back to TypeScript when the socket has no descriptor.
   */
  private handOverToNative(): void {
    const handle = (this.socket as unknown as { _handle?: { fd?: unknown; reading?: boolean; readStop?: () => number } })._handle;
    const fd = handle?.fd;
    const addon = loadNativeTap();
    if (handle === undefined || typeof fd !== 'number' || fd < 0 || typeof handle.readStop !== 'function' || addon === undefined) return;
    const readStop = (): void => {
      handle.reading = false;
      handle.readStop!();
    };
    this.nativeState = 'starting';
    this.socket.pause();
    // Node restarts reading whenever its stream asks for more (read(0) after
    // a push, resume()); from now on it must never read this descriptor.
    (this.socket as unknown as { _read: (n: number) => void })._read = () => {};
    readStop();
    if (this.corked) this.uncork();
    const startedMs = this.host.clock.now();
    const start = (): void => {
      if (this.phase === Phase.Closed || this.disconnectRequested) {
        this.nativeState = 'ended';
        if (this.disconnectRequested && this.inFlight === 0) this.endSession();
        return;
      }
      if (this.socket.writableLength > 0) {
        if (this.host.clock.now() - startedMs > NATIVE_HANDOVER_TIMEOUT_MS) {
          this.host.warn('NBD client does not read the handshake replies; disconnecting', { remote: this.remote() });
          this.nativeState = 'ended';
          this.hardDisconnect();
          return;
        }
        setImmediate(start);
        return;
      }
      // Bytes Node had already read: read() hands them to onData, which queues them.
      if (this.socket.readableLength > 0) {
        while (this.socket.read() !== null) {
          // drained into this.input
        }
      }
      readStop();
      const prefix = this.input.take(this.input.length);
      this.nativeConn = new addon.TapConnection(fd, this.exp!.native!, prefix, this.onNativeEvent);
      this.nativeState = 'on';
    };
    start();
  }

  private readonly onNativeEvent = (kind: number, type: number, flags: number, handleHi: number, handleLo: number, offset: number, length: number, error: number): void => {
    const exp = this.exp!;
    switch (kind) {
      case NATIVE_EVENT.intent: {
        const tracker = exp.exp.recorder as ChangeTracker;
        tracker.intendNative(offset, length).then(
          () => this.nativeConn?.resume(0),
          (err: unknown) => {
            this.host.warn('NBD WRITE failed: its write intent could not be made durable', { export: exp.name, offset, length, message: err instanceof Error ? err.message : String(err) });
            this.nativeConn?.resume(P.NBD_EIO);
          },
        );
        return;
      }
      case NATIVE_EVENT.flush: {
        // A FLUSH, or a FUA WRITE the thread has carried out.
        const name = type === P.NBD_CMD_FLUSH ? 'FLUSH' : 'WRITE';
        if (type === P.NBD_CMD_FLUSH && (flags & ~P.NBD_CMD_FLAG_FUA) !== 0) {
          this.replyError(P.NBD_EINVAL, handleHi, handleLo, true);
          return;
        }
        this.begin(0);
        this.flushBoth().then(
          () => {
            this.finish(0);
            this.sendEventReply(P.encodeSimpleReply(0, handleHi, handleLo));
          },
          (err: unknown) => {
            this.finish(0);
            this.failRequest(err, name, offset, length, handleHi, handleLo, true);
          },
        );
        return;
      }
      case NATIVE_EVENT.slow: {
        // A mutation other than WRITE holds the export's native writers, so
        // no write on another connection overtakes it between its record and
        // its disk operation (log order = disk order).
        const paused = type === P.NBD_CMD_TRIM || type === P.NBD_CMD_WRITE_ZEROES;
        const id = ++this.nativeSlowIds;
        this.nativeSlow = { id, paused };
        this.stats.requests++;
        const h: P.RequestHeader = { magic: P.NBD_REQUEST_MAGIC, flags, type, handleHi, handleLo, offset, length };
        if (!paused) {
          this.dispatch(h);
          return;
        }
        // Dispatched once no native write is in flight any more (the hold
        // resolves off the main thread, however slow the disk).
        const name = P.NBD_COMMAND_NAMES[type] ?? 'request';
        this.pauseNativeWriters().then(
          () => {
            // The thread ended meanwhile and its end let the writers go:
            // carrying the request out now could race them, so it fails untouched.
            if (this.nativeSlow?.id !== id) this.failRequest(new Error('the native connection ended before the request ran'), name, offset, length, handleHi, handleLo);
            else this.dispatch(h);
          },
          (err: unknown) => this.failRequest(err, name, offset, length, handleHi, handleLo),
        );
        return;
      }
      case NATIVE_EVENT.writeFailed:
        this.logNoLongerMatches(exp, Object.assign(new Error(`native disk write failed with errno ${error}`), { errno: error }), 'WRITE', offset, length);
        this.host.warn('NBD WRITE failed', { export: exp.name, offset, length, errno: error });
        return;
      case NATIVE_EVENT.exit:
        this.nativeExited(error);
        return;
      default:
        this.host.warn('unknown event from the native tap thread', { kind });
    }
  };

  private async pauseNativeWriters(): Promise<void> {
    const exp = this.exp!;
    const recorder = exp.exp.recorder;
    if (recorder instanceof ChangeTracker) await recorder.pauseNative();
    else await exp.native!.hold();
  }

  private resumeNativeWriters(): void {
    const exp = this.exp!;
    const recorder = exp.exp.recorder;
    if (recorder instanceof ChangeTracker) recorder.resumeNative();
    else exp.native!.release(NATIVE_TAP_MODE.untracked, null, 0);
  }

  /**
   * Queues a reply on the native thread; false when the thread is gone.
   * On a native connection JavaScript answers two kinds of requests: FLUSH
   * and FUA events, whose replies go through sendEventReply, and the one
   * slow request the thread waits on, whose replies come here. So a reply
   * here ends the slow request and resumes the thread. (Matching the
   * client's handle instead ended it early when a client reused a handle
   * for a FLUSH and a TRIM in flight at once.)
   */
  private sendNative(buf: Buffer): boolean {
    const conn = this.nativeConn!;
    if (!conn.reply(buf)) return false;
    const slow = this.nativeSlow;
    if (slow !== undefined) {
      this.nativeSlow = undefined;
      if (slow.paused) this.resumeNativeWriters();
      conn.resume(0);
    }
    return true;
  }

  /** A reply to a FLUSH or FUA event of the native thread: never ends its slow request. */
  private sendEventReply(buf: Buffer): void {
    if (this.phase === Phase.Closed) return;
    if (this.nativeConn !== undefined && this.nativeConn.reply(buf)) return;
    this.cork();
    this.socket.write(buf);
  }

  private nativeExited(reason: number): void {
    const conn = this.nativeConn!;
    conn.join();
    const [requests, errorReplies, bytesWritten, bytesRead] = conn.stats();
    this.stats.requests += requests!;
    this.stats.errorReplies += errorReplies!;
    this.stats.bytesWritten += bytesWritten!;
    this.stats.bytesRead += bytesRead!;
    this.nativeConn = undefined;
    this.nativeState = 'ended';
    const slow = this.nativeSlow;
    this.nativeSlow = undefined;
    if (slow?.paused) this.resumeNativeWriters();
    if (this.destroyAfterNative) {
      this.socket.destroy();
      return;
    }
    switch (reason) {
      case NATIVE_EXIT.badMagic:
        this.host.warn('NBD request with a wrong magic; disconnecting', { remote: this.remote() });
        this.hardDisconnect();
        return;
      case NATIVE_EXIT.disconnect:
      case NATIVE_EXIT.stopped:
        this.disconnectRequested = true;
        if (this.inFlight === 0) this.endSession();
        return;
      default:
        // The client vanished (EOF or a socket error): what is in flight finishes unanswered.
        this.phase = Phase.Closed;
        this.socket.destroy();
    }
  }

  // --- transmission -----------------------------------------------------------

  /** Parses at most one request (or one piece of payload); false when it needs more input or must wait. */
  private readRequest(): boolean {
    if (this.parsingBlocked || this.nativeState !== 'off') return false;
    if (this.skipBytes > 0) {
      this.skipBytes -= this.input.skip(this.skipBytes);
      return this.skipBytes === 0;
    }
    const pending = this.pendingWrite;
    if (pending !== undefined) {
      if (this.input.length < pending.length) return false;
      this.pendingWrite = undefined;
      const payload = this.input.take(pending.length, this.host.payloadPool.alloc);
      this.startWrite(pending.flags, pending.handleHi, pending.handleLo, pending.offset, payload, this.input.lastTakeCopied);
      return true;
    }
    if (this.input.length < P.REQUEST_HEADER_BYTES) return false;
    const h = P.decodeRequestHeader(this.input.take(P.REQUEST_HEADER_BYTES), 0, this.header);
    if (h.magic !== P.NBD_REQUEST_MAGIC) {
      // Without a valid header the stream cannot be re-framed.
      this.host.warn('NBD request with a wrong magic; disconnecting', { remote: this.remote(), magic: h.magic });
      this.hardDisconnect();
      return false;
    }
    this.stats.requests++;
    this.dispatch(h);
    this.checkLimits();
    return true;
  }

  private dispatch(h: P.RequestHeader): void {
    const exp = this.exp!;
    const { type, flags, handleHi, handleLo, offset, length } = h;
    const fua = (flags & P.NBD_CMD_FLAG_FUA) !== 0;
    switch (type) {
      case P.NBD_CMD_READ: {
        const error = (flags & ~P.NBD_CMD_FLAG_FUA) !== 0 ? P.NBD_EINVAL : this.checkRange(exp, offset, length, true, P.NBD_EINVAL);
        if (error !== 0) return this.replyError(error, handleHi, handleLo);
        this.startRead(handleHi, handleLo, offset, length);
        return;
      }
      case P.NBD_CMD_WRITE: {
        let error = (flags & ~P.NBD_CMD_FLAG_FUA) !== 0 ? P.NBD_EINVAL : 0;
        if (error === 0 && exp.readOnly) error = P.NBD_EPERM;
        if (error === 0) error = this.checkRange(exp, offset, length, true, P.NBD_ENOSPC);
        if (error !== 0) {
          // The payload follows regardless; throw it away unbuffered so the stream stays framed.
          this.skipBytes = length;
          return this.replyError(error, handleHi, handleLo);
        }
        this.pendingWrite = { flags, handleHi, handleLo, offset, length };
        // Payload bytes count against the buffer bound while they arrive.
        return;
      }
      case P.NBD_CMD_DISC:
        this.disconnectRequested = true;
        this.pauseReading();
        this.input.clear();
        if (this.inFlight === 0) this.endSession();
        return;
      case P.NBD_CMD_FLUSH: {
        if ((flags & ~P.NBD_CMD_FLAG_FUA) !== 0) return this.replyError(P.NBD_EINVAL, handleHi, handleLo);
        this.startFlush(handleHi, handleLo);
        return;
      }
      case P.NBD_CMD_TRIM:
      case P.NBD_CMD_WRITE_ZEROES: {
        const allowed = type === P.NBD_CMD_TRIM ? P.NBD_CMD_FLAG_FUA : P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE;
        let error = (flags & ~allowed) !== 0 ? P.NBD_EINVAL : 0;
        if (error === 0 && exp.readOnly) error = P.NBD_EPERM;
        // TRIM has no payload and no length limit; WRITE_ZEROES obeys the maximum.
        if (error === 0) error = this.checkRange(exp, offset, length, type === P.NBD_CMD_WRITE_ZEROES, type === P.NBD_CMD_TRIM ? P.NBD_EINVAL : P.NBD_ENOSPC);
        if (error !== 0) return this.replyError(error, handleHi, handleLo);
        this.startZero(type, fua, handleHi, handleLo, offset, length);
        return;
      }
      default:
        // CACHE and BLOCK_STATUS are not advertised; unknown commands get EINVAL.
        this.replyError(P.NBD_EINVAL, handleHi, handleLo);
    }
  }

  /** The NBD error for a request outside the export or its block size constraints, else 0. */
  private checkRange(exp: ServedExport, offset: number, length: number, limitLength: boolean, pastEndError: number): number {
    if (limitLength && length > exp.maxBlockBytes) return P.NBD_EINVAL;
    if (exp.minBlockBytes > 1 && (offset % exp.minBlockBytes !== 0 || length % exp.minBlockBytes !== 0)) return P.NBD_EINVAL;
    if (offset > exp.sizeBytes || length > exp.sizeBytes - offset) return pastEndError;
    return 0;
  }

  private startRead(handleHi: number, handleLo: number, offset: number, length: number): void {
    this.begin(length);
    if (length === 0) {
      this.finish(length);
      this.send(P.encodeSimpleReply(0, handleHi, handleLo));
      return;
    }
    this.exp!.exp.source.read(offset, length).then(
      (data) => {
        if (data.length !== length) {
          // A source that returns the wrong length is a bug; never send a short payload.
          this.host.warn('NBD export source returned a short read', { offset, length, got: data.length });
          this.finish(length);
          this.replyError(P.NBD_EIO, handleHi, handleLo);
          return;
        }
        this.stats.bytesRead += length;
        this.finish(length);
        this.sendReplyWithData(handleHi, handleLo, data);
      },
      (err: unknown) => {
        this.finish(length);
        this.failRequest(err, 'READ', offset, length, handleHi, handleLo);
      },
    );
  }

  /**
   * A WRITE: recorded at once (arrival order is log order), then written to
   * the disk once no earlier overlapping write is in flight (arrival order is
   * disk order for overlapping ranges), then answered. The reply does not
   * wait for the record to finish unless the export's record queue is over
   * its bounds or FUA asks for durability; a record that fails surfaces at
   * the next FLUSH (see RecordQueue).
   */
  private startWrite(flags: number, handleHi: number, handleLo: number, offset: number, payload: Buffer, pooled: boolean): void {
    const exp = this.exp!;
    const length = payload.length;
    this.begin(length);
    if (length === 0) {
      this.finish(length);
      this.send(P.encodeSimpleReply(0, handleHi, handleLo));
      return;
    }
    const fua = (flags & P.NBD_CMD_FLAG_FUA) !== 0;
    // A pooled payload goes back once the disk write and the record are both done with it.
    let users = 1;
    const pool = this.host.payloadPool;
    const release = (): void => {
      if (--users === 0 && pooled) pool.release(payload);
    };
    let recordWait: Promise<void> | undefined;
    const recorder = exp.exp.recorder;
    if (recorder !== undefined) {
      users++;
      try {
        recordWait = exp.records.track(recorder.recordWrite(offset, payload), length, release);
      } catch (err) {
        // Refused before anything was logged: the disk is not touched either.
        users = 0;
        this.finish(length);
        this.failRequest(err, 'WRITE', offset, length, handleHi, handleLo);
        return;
      }
    }
    const run = (): void => {
      exp.writer!.write(offset, payload).then(
        () => {
          release();
          exp.gate.leave(ticket);
          this.stats.bytesWritten += length;
          this.completeMutation(recordWait, fua, 'WRITE', offset, length, handleHi, handleLo);
        },
        (err: unknown) => {
          release();
          exp.gate.leave(ticket);
          this.logNoLongerMatches(exp, err, 'WRITE', offset, length);
          this.finish(length);
          this.failRequest(err, 'WRITE', offset, length, handleHi, handleLo);
        },
      );
    };
    const go = this.afterIntent(recorder, offset, length, run, (err) => {
      release();
      exp.gate.leave(ticket);
      this.logNoLongerMatches(exp, err, 'WRITE', offset, length);
      this.finish(length);
      this.failRequest(err, 'WRITE', offset, length, handleHi, handleLo);
    });
    const ticket: GateTicket = exp.gate.enter(offset, length, go);
    if (!ticket.blocked) go();
  }

  /**
   * Runs `run` once the recorder's write intent for the range is durable
   * (at once when it already is); `fail` when marking it failed, in which
   * case the disk is not touched.
   */
  private afterIntent(recorder: WriteRecorder | undefined, offset: number, length: number, run: () => void, fail: (err: unknown) => void): () => void {
    if (recorder?.intend === undefined) return run;
    return () => {
      let wait: Promise<void> | undefined;
      try {
        wait = recorder.intend!(offset, length);
      } catch (err) {
        fail(err);
        return;
      }
      if (wait === undefined) run();
      else wait.then(run, fail);
    };
  }

  /** WRITE_ZEROES and TRIM, ordered and recorded like a WRITE. */
  private startZero(type: number, fua: boolean, handleHi: number, handleLo: number, offset: number, length: number): void {
    const exp = this.exp!;
    const name = P.NBD_COMMAND_NAMES[type]!;
    this.begin(0);
    if (length === 0) {
      this.finish(0);
      this.send(P.encodeSimpleReply(0, handleHi, handleLo));
      return;
    }
    let recordWait: Promise<void> | undefined;
    const recorder = exp.exp.recorder;
    if (recorder !== undefined) {
      try {
        // TRIM is carried out as a discard, which DiskTarget defines to read
        // back as zeroes afterwards, so the record says the range is zero.
        const recorded =
          type === P.NBD_CMD_TRIM && recorder.recordTrim !== undefined ? recorder.recordTrim(offset, length) : recorder.recordZeroes(offset, length);
        recordWait = exp.records.track(recorded, 0);
      } catch (err) {
        this.finish(0);
        this.failRequest(err, name, offset, length, handleHi, handleLo);
        return;
      }
    }
    const run = (): void => {
      const op = type === P.NBD_CMD_TRIM ? exp.writer!.discard(offset, length) : exp.writer!.writeZeroes(offset, length);
      op.then(
        () => {
          exp.gate.leave(ticket);
          this.completeMutation(recordWait, fua, name, offset, 0, handleHi, handleLo);
        },
        (err: unknown) => {
          exp.gate.leave(ticket);
          this.logNoLongerMatches(exp, err, name, offset, length);
          this.finish(0);
          this.failRequest(err, name, offset, length, handleHi, handleLo);
        },
      );
    };
    const go = this.afterIntent(recorder, offset, length, run, (err) => {
      exp.gate.leave(ticket);
      this.logNoLongerMatches(exp, err, name, offset, length);
      this.finish(0);
      this.failRequest(err, name, offset, length, handleHi, handleLo);
    });
    const ticket: GateTicket = exp.gate.enter(offset, length, go);
    if (!ticket.blocked) go();
  }

  /**
   * A disk write failed after its record was made: the log now holds bytes
   * the disk does not. The range cannot simply be re-recorded (later
   * overlapping writes were recorded on arrival, before any correction could
   * be), so the export's log is marked as diverged and every later FLUSH
   * fails; the disk needs a resync.
   */
  private logNoLongerMatches(exp: ServedExport, err: unknown, name: string, offset: number, length: number): void {
    if (exp.exp.recorder === undefined) return;
    exp.records.fail(err, `NBD ${name} failed on the disk after it was recorded; the change log no longer matches the disk, which needs a resync`, { offset, length });
  }

  /** After a mutation reached the disk: await the record where asked to, honour FUA, reply. */
  private completeMutation(
    recorded: Promise<void> | undefined,
    fua: boolean,
    name: string,
    offset: number,
    heldBytes: number,
    handleHi: number,
    handleLo: number,
  ): void {
    if (recorded === undefined && !fua) {
      this.finish(heldBytes);
      this.send(P.encodeSimpleReply(0, handleHi, handleLo));
      return;
    }
    Promise.resolve(recorded)
      .then(() => (fua ? this.flushBoth() : undefined))
      .then(
        () => {
          this.finish(heldBytes);
          this.send(P.encodeSimpleReply(0, handleHi, handleLo));
        },
        (err: unknown) => {
          this.finish(heldBytes);
          this.failRequest(err, name, offset, heldBytes, handleHi, handleLo);
        },
      );
  }

  private startFlush(handleHi: number, handleLo: number): void {
    this.begin(0);
    this.flushBoth().then(
      () => {
        this.finish(0);
        this.send(P.encodeSimpleReply(0, handleHi, handleLo));
      },
      (err: unknown) => {
        this.finish(0);
        this.failRequest(err, 'FLUSH', 0, 0, handleHi, handleLo);
      },
    );
  }

  /**
   * FLUSH and FUA make the disk and the recorder durable before the reply,
   * and fail if any record made before them failed: a write whose log entry
   * is lost must not be reported durable.
   */
  private async flushBoth(): Promise<void> {
    const exp = this.exp!;
    const disk = exp.diskFlushes !== undefined ? exp.diskFlushes.flush() : Promise.resolve();
    const recorder = exp.exp.recorder;
    if (recorder === undefined) {
      await disk;
      return;
    }
    await Promise.all([disk, exp.records.settled().then(() => recorder.flush())]);
    exp.records.throwIfFailed();
  }

  private failRequest(err: unknown, name: string, offset: number, length: number, handleHi: number, handleLo: number, eventReply = false): void {
    const code = isBlockrelayError(err) ? err.code : undefined;
    const error = code === 'BR_DISK_FULL' ? P.NBD_ENOSPC : code === 'BR_NBD_READ_ONLY' ? P.NBD_EPERM : P.NBD_EIO;
    this.host.warn(`NBD ${name} failed`, {
      export: this.exp?.name,
      offset,
      length,
      code: code ?? null,
      message: err instanceof Error ? err.message : String(err),
    });
    this.replyError(error, handleHi, handleLo, eventReply);
  }

  // --- bounds and back-pressure ----------------------------------------------

  private begin(heldBytes: number): void {
    this.inFlight++;
    this.heldBytes += heldBytes;
  }

  private finish(heldBytes: number): void {
    this.inFlight--;
    this.heldBytes -= heldBytes;
    if (this.inFlight === 0 && (this.disconnectRequested || this.phase === Phase.Closed)) {
      if (this.phase === Phase.Closed) this.reportFinished();
      else this.endSessionAfterReplies();
      return;
    }
    this.maybeResume();
  }

  /**
   * Whether the connection holds too much to parse further requests. Unparsed
   * input is left out on purpose: parsing is what drains it, so counting it
   * here could stall a connection with nothing in flight to wake it.
   */
  private overLimits(): boolean {
    const limits = this.host.limits;
    return this.inFlight >= limits.maxInFlightRequests || this.heldBytes + this.socket.writableLength >= limits.maxBufferedBytes;
  }

  private checkLimits(): void {
    if (this.overLimits()) this.parsingBlocked = true;
  }

  /** The socket reads while requests can be parsed and unparsed input stays under the bound. */
  private updateSocketFlow(): void {
    const pause =
      this.parsingBlocked || this.disconnectRequested || this.input.length > this.host.limits.maxBufferedBytes;
    if (pause && !this.socketPaused) {
      this.socketPaused = true;
      this.socket.pause();
    } else if (!pause && this.socketPaused && this.phase !== Phase.Closed) {
      this.socketPaused = false;
      this.socket.resume();
    }
  }

  private pauseReading(): void {
    this.parsingBlocked = true;
    this.updateSocketFlow();
  }

  private maybeResume(): void {
    if (!this.parsingBlocked || this.disconnectRequested || this.phase === Phase.Closed) return;
    if (this.overLimits()) return;
    this.parsingBlocked = false;
    // Requests already buffered are parsed before more are read.
    this.process();
  }

  // --- output -------------------------------------------------------------------

  /** `eventReply`: the reply to a native FLUSH/FUA event (see sendEventReply). */
  private replyError(error: number, handleHi: number, handleLo: number, eventReply = false): void {
    this.stats.errorReplies++;
    const buf = P.encodeSimpleReply(error, handleHi, handleLo);
    if (eventReply) this.sendEventReply(buf);
    else this.send(buf);
  }

  private sendReplyWithData(handleHi: number, handleLo: number, data: Buffer): void {
    if (this.phase === Phase.Closed) return;
    if (this.nativeConn !== undefined && this.sendNative(Buffer.concat([P.encodeSimpleReply(0, handleHi, handleLo), data]))) return;
    this.cork();
    this.socket.write(P.encodeSimpleReply(0, handleHi, handleLo));
    this.socket.write(data);
  }

  private send(buf: Buffer): void {
    if (this.phase === Phase.Closed) return;
    if (this.nativeConn !== undefined && this.sendNative(buf)) return;
    this.cork();
    this.socket.write(buf);
  }

  /**
   * Replies finished in one event-loop turn leave in one writev: disk writes
   * complete as separate callbacks of the poll phase, so uncorking at
   * setImmediate (the check phase right after it) batches all of them,
   * where a nextTick would send one syscall per completion.
   */
  private cork(): void {
    if (this.corked) return;
    this.corked = true;
    this.socket.cork();
    setImmediate(this.uncork);
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  // --- ending -------------------------------------------------------------------

  /** Soft end: flush queued replies, then close our side. */
  private endSession(): void {
    if (this.phase === Phase.Closed) return;
    // The native thread still owns the socket; its exit ends the session.
    if (this.nativeConn !== undefined) return;
    if (this.nativeState !== 'off') {
      // Node no longer reads this socket (see handOverToNative), so it would
      // never see the client's close: send what is queued, then close.
      this.phase = Phase.Closed;
      this.socket.once('finish', () => this.socket.destroy());
      this.socket.end();
      return;
    }
    this.phase = Phase.Closed;
    this.input.clear();
    this.socket.end();
    // A paused socket never sees the peer's EOF, so it would never close:
    // let input flow again (it is ignored now) and bound the wait for the peer.
    this.socket.resume();
    const timer = this.host.clock.setTimer(() => this.socket.destroy(), CLOSE_GRACE_MS);
    this.socket.once('close', () => timer.cancel());
  }

  private endSessionAfterReplies(): void {
    // The last replies are sent in this turn; end() flushes what is corked.
    process.nextTick(() => this.endSession());
  }

  private onClose(): void {
    this.phase = Phase.Closed;
    this.handshakeTimer?.cancel();
    this.input.clear();
    this.pendingWrite = undefined;
    if (this.inFlight === 0) this.reportFinished();
  }

  private reportFinished(): void {
    if (this.finishedReported) return;
    if (!this.socket.destroyed && !this.socket.closed) return;
    this.finishedReported = true;
    this.host.connectionFinished(this);
  }
}
