import * as net from 'node:net';
import { ByteQueue } from './byte-queue';
import * as P from './nbd-protocol';
import { BlockrelayError } from '../retry/blockrelay-error';

export interface NbdClientOptions {
  readonly host: string;
  readonly port: number;
  readonly exportName: string;
  /** Requests sent and not yet answered; later ones wait (default 16). */
  readonly maxInFlight?: number;
  /** Giving up on connect and handshake after this (default 30 s). */
  readonly connectTimeoutMs?: number;
}

/** Block size constraints the server advertised (or the protocol's defaults). */
export interface NbdBlockSizes {
  readonly minimumBytes: number;
  readonly preferredBytes: number;
  readonly maximumBytes: number;
}

interface PendingRequest {
  readonly type: number;
  /** Payload bytes a successful READ reply carries. */
  readonly readLength: number;
  readonly offset: number;
  resolve(data: Buffer | undefined): void;
  reject(err: BlockrelayError): void;
}

/** Option replies longer than this are treated as a protocol violation. */
const MAX_OPTION_REPLY_BYTES = 64 * 1024;
/** The largest request this client sends when the server advertises no maximum: the protocol's 32 MiB. */
const DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024;

/**
 * A small NBD client: fixed newstyle handshake with NBD_OPT_GO (falling back
 * to NBD_OPT_EXPORT_NAME), simple replies, READ/WRITE/FLUSH/TRIM/WRITE_ZEROES
 * with several requests in flight, DISC on close. Requests longer than the
 * server's maximum block size are split.
 */
export class NbdClient {
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
  readonly blockSizes: NbdBlockSizes;
  private readonly input = new ByteQueue();
  private readonly pending = new Map<number, PendingRequest>();
  private readonly waitingForSlot: (() => void)[] = [];
  private readonly maxInFlight: number;
  private nextHandle = 1;
  private replyHeader: { error: number; handle: number } | undefined;
  private failure: BlockrelayError | undefined;
  private closing = false;

  private constructor(
    private readonly socket: net.Socket,
    private readonly where: string,
    negotiated: { sizeBytes: number; transmissionFlags: number; blockSizes: NbdBlockSizes },
    input: ByteQueue,
    maxInFlight: number,
  ) {
    this.sizeBytes = negotiated.sizeBytes;
    this.transmissionFlags = negotiated.transmissionFlags;
    this.blockSizes = negotiated.blockSizes;
    this.maxInFlight = maxInFlight;
    // Bytes that arrived with the end of the handshake belong to transmission.
    const leftover = input.take(input.length);
    this.input.push(Buffer.from(leftover));
    socket.on('data', (chunk: Buffer) => {
      this.input.push(chunk);
      this.parseReplies();
    });
    socket.on('error', (err) => this.fail(new BlockrelayError('BR_NBD_CONNECTION', `NBD connection to ${this.where} failed: ${err.message}`, { cause: err })));
    socket.on('close', () => this.fail(new BlockrelayError('BR_NBD_CONNECTION', `NBD server ${this.where} closed the connection`)));
    this.parseReplies();
  }

  /** Connects, negotiates the export and enters the transmission phase. */
  static async connect(options: NbdClientOptions): Promise<NbdClient> {
    const where = `nbd://${options.host}:${options.port}/${options.exportName}`;
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ host: options.host, port: options.port, noDelay: true });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new BlockrelayError('BR_NBD_CONNECTION', `timed out connecting to ${where}`));
      }, options.connectTimeoutMs ?? 30_000);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', (err) => {
        clearTimeout(timer);
        reject(new BlockrelayError('BR_NBD_CONNECTION', `cannot connect to ${where}: ${err.message}`, { cause: err }));
      });
    });
    const handshake = new Handshake(socket, where, options.connectTimeoutMs ?? 30_000);
    try {
      const negotiated = await handshake.run(options.exportName);
      handshake.detach();
      return new NbdClient(socket, where, negotiated, handshake.input, options.maxInFlight ?? 16);
    } catch (err) {
      handshake.detach();
      socket.destroy();
      throw err;
    }
  }

  get readOnly(): boolean {
    return (this.transmissionFlags & P.NBD_FLAG_READ_ONLY) !== 0;
  }

  /** Whether the server advertised a transmission flag (e.g. NBD_FLAG_SEND_TRIM). */
  has(flag: number): boolean {
    return (this.transmissionFlags & flag) !== 0;
  }

  private get maxRequestBytes(): number {
    const max = this.blockSizes.maximumBytes;
    return Math.min(max === 0xffffffff ? DEFAULT_MAX_REQUEST_BYTES : max, DEFAULT_MAX_REQUEST_BYTES);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (length <= this.maxRequestBytes) return (await this.request(P.NBD_CMD_READ, 0, offset, length))!;
    const out = Buffer.allocUnsafe(length);
    await this.split(offset, length, async (at, n) => {
      const part = (await this.request(P.NBD_CMD_READ, 0, at, n))!;
      part.copy(out, at - offset);
    });
    return out;
  }

  async write(offset: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    const flags = options.fua ? P.NBD_CMD_FLAG_FUA : 0;
    await this.split(offset, data.length, (at, n) => this.request(P.NBD_CMD_WRITE, flags, at, n, data.subarray(at - offset, at - offset + n)).then(() => {}));
  }

  async writeZeroes(offset: number, length: number, options: { noHole?: boolean; fua?: boolean } = {}): Promise<void> {
    const flags = (options.noHole ? P.NBD_CMD_FLAG_NO_HOLE : 0) | (options.fua ? P.NBD_CMD_FLAG_FUA : 0);
    await this.split(offset, length, (at, n) => this.request(P.NBD_CMD_WRITE_ZEROES, flags, at, n).then(() => {}));
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.split(offset, length, (at, n) => this.request(P.NBD_CMD_TRIM, 0, at, n).then(() => {}));
  }

  async flush(): Promise<void> {
    await this.request(P.NBD_CMD_FLUSH, 0, 0, 0);
  }

  /** Waits for every request in flight, sends NBD_CMD_DISC and closes. Idempotent. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    while (this.pending.size > 0 && this.failure === undefined) {
      await new Promise<void>((resolve) => this.waitingForSlot.push(resolve));
    }
    if (this.failure === undefined) {
      const header = Buffer.alloc(P.REQUEST_HEADER_BYTES);
      P.encodeRequestHeader(header, 0, { flags: 0, type: P.NBD_CMD_DISC, handleHi: 0, handleLo: 0, offset: 0, length: 0 });
      await new Promise<void>((resolve) => this.socket.end(header, () => resolve()));
    }
    this.socket.destroy();
  }

  private async split(offset: number, length: number, each: (at: number, n: number) => Promise<void>): Promise<void> {
    const max = this.maxRequestBytes;
    if (length <= max) return each(offset, length);
    const parts: Promise<void>[] = [];
    for (let at = offset; at < offset + length; at += max) parts.push(each(at, Math.min(max, offset + length - at)));
    await Promise.all(parts);
  }

  private async request(type: number, flags: number, offset: number, length: number, payload?: Buffer): Promise<Buffer | undefined> {
    while (this.pending.size >= this.maxInFlight && this.failure === undefined) {
      await new Promise<void>((resolve) => this.waitingForSlot.push(resolve));
    }
    if (this.failure !== undefined) throw this.failure;
    const handle = this.nextHandle;
    this.nextHandle = this.nextHandle >= 0xffffffff ? 1 : this.nextHandle + 1;
    const header = Buffer.allocUnsafe(P.REQUEST_HEADER_BYTES);
    P.encodeRequestHeader(header, 0, { flags, type, handleHi: 0, handleLo: handle, offset, length });
    return new Promise<Buffer | undefined>((resolve, reject) => {
      this.pending.set(handle, { type, readLength: type === P.NBD_CMD_READ ? length : 0, offset, resolve, reject });
      this.socket.cork();
      this.socket.write(header);
      if (payload !== undefined) this.socket.write(payload);
      this.socket.uncork();
    });
  }

  private parseReplies(): void {
    for (;;) {
      if (this.replyHeader === undefined) {
        if (this.input.length < P.SIMPLE_REPLY_BYTES) return;
        const h = this.input.take(P.SIMPLE_REPLY_BYTES);
        const magic = h.readUInt32BE(0);
        if (magic !== P.NBD_SIMPLE_REPLY_MAGIC) {
          this.fail(new BlockrelayError('BR_NBD_PROTOCOL', `NBD server ${this.where} sent a reply with magic 0x${magic.toString(16)}`));
          return;
        }
        const handle = h.readUInt32BE(12);
        if (h.readUInt32BE(8) !== 0 || !this.pending.has(handle)) {
          this.fail(new BlockrelayError('BR_NBD_PROTOCOL', `NBD server ${this.where} answered a request that is not in flight`));
          return;
        }
        this.replyHeader = { error: h.readUInt32BE(4), handle };
      }
      const { error, handle } = this.replyHeader;
      const req = this.pending.get(handle)!;
      const payloadBytes = error === 0 ? req.readLength : 0;
      if (this.input.length < payloadBytes) return;
      this.replyHeader = undefined;
      this.pending.delete(handle);
      if (error === 0) {
        req.resolve(payloadBytes > 0 ? this.input.take(payloadBytes) : undefined);
      } else {
        const name = P.NBD_ERROR_NAMES[error] ?? `error ${error}`;
        const command = P.NBD_COMMAND_NAMES[req.type] ?? `command ${req.type}`;
        const code = error === P.NBD_EPERM ? 'BR_NBD_READ_ONLY' : error === P.NBD_EINVAL || error === P.NBD_ENOSPC ? 'BR_NBD_OUT_OF_RANGE' : 'BR_NBD_REQUEST_FAILED';
        req.reject(new BlockrelayError(code, `NBD ${command} at offset ${req.offset} on ${this.where} failed with ${name}`, { details: { nbdError: error, offset: req.offset } }));
      }
      this.wakeOne();
    }
  }

  private wakeOne(): void {
    const next = this.waitingForSlot.shift();
    if (next !== undefined) next();
  }

  private fail(err: BlockrelayError): void {
    if (this.failure !== undefined) return;
    this.failure = err;
    for (const req of this.pending.values()) req.reject(err);
    this.pending.clear();
    for (const w of this.waitingForSlot.splice(0)) w();
    this.socket.destroy();
  }
}

/** The handshake, written as a sequence of awaited reads. */
class Handshake {
  readonly input = new ByteQueue();
  private waiter: (() => void) | undefined;
  private closed = false;
  private readonly onData = (chunk: Buffer): void => {
    this.input.push(chunk);
    this.waiter?.();
  };
  private readonly onEnd = (): void => {
    this.closed = true;
    this.waiter?.();
  };
  private readonly deadline: number;

  constructor(
    private readonly socket: net.Socket,
    private readonly where: string,
    timeoutMs: number,
  ) {
    this.deadline = Date.now() + timeoutMs;
    socket.on('data', this.onData);
    socket.on('close', this.onEnd);
    socket.on('error', this.onEnd);
  }

  detach(): void {
    this.socket.off('data', this.onData);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onEnd);
  }

  async run(exportName: string): Promise<{ sizeBytes: number; transmissionFlags: number; blockSizes: NbdBlockSizes }> {
    const greeting = await this.read(P.GREETING_BYTES);
    if (!greeting.subarray(0, 8).equals(P.NBD_INIT_MAGIC) || !greeting.subarray(8, 16).equals(P.NBD_OPTS_MAGIC)) {
      throw this.protocol('the greeting is not NBDMAGIC IHAVEOPT (oldstyle servers are not supported)');
    }
    const handshakeFlags = greeting.readUInt16BE(16);
    if ((handshakeFlags & P.NBD_FLAG_FIXED_NEWSTYLE) === 0) throw this.protocol('the server does not speak fixed newstyle');
    const noZeroes = (handshakeFlags & P.NBD_FLAG_NO_ZEROES) !== 0;
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
    this.socket.write(clientFlags);
    this.socket.write(P.encodeOption(P.NBD_OPT_GO, P.encodeGoRequest(exportName, [P.NBD_INFO_BLOCK_SIZE])));
    let sizeBytes: number | undefined;
    let transmissionFlags = 0;
    let blockSizes: NbdBlockSizes = { minimumBytes: 1, preferredBytes: 4096, maximumBytes: DEFAULT_MAX_REQUEST_BYTES };
    for (;;) {
      const head = await this.read(P.OPTION_REPLY_HEADER_BYTES);
      if (head.readUInt32BE(0) !== P.NBD_REP_MAGIC_HI || head.readUInt32BE(4) !== P.NBD_REP_MAGIC_LO) throw this.protocol('bad option reply magic');
      if (head.readUInt32BE(8) !== P.NBD_OPT_GO) throw this.protocol('an option reply names another option');
      const replyType = head.readUInt32BE(12);
      const length = head.readUInt32BE(16);
      if (length > MAX_OPTION_REPLY_BYTES) throw this.protocol(`an option reply of ${length} bytes`);
      const data = await this.read(length);
      if (replyType === P.NBD_REP_INFO) {
        if (data.length < 2) throw this.protocol('an NBD_REP_INFO without a type');
        const infoType = data.readUInt16BE(0);
        if (infoType === P.NBD_INFO_EXPORT) {
          if (data.length !== 12) throw this.protocol('NBD_INFO_EXPORT is not 12 bytes');
          sizeBytes = P.readU64(data, 2);
          transmissionFlags = data.readUInt16BE(10);
        } else if (infoType === P.NBD_INFO_BLOCK_SIZE) {
          if (data.length !== 14) throw this.protocol('NBD_INFO_BLOCK_SIZE is not 14 bytes');
          blockSizes = { minimumBytes: data.readUInt32BE(2), preferredBytes: data.readUInt32BE(6), maximumBytes: data.readUInt32BE(10) };
        }
        continue;
      }
      if (replyType === P.NBD_REP_ACK) {
        if (sizeBytes === undefined) throw this.protocol('NBD_OPT_GO succeeded without NBD_INFO_EXPORT');
        return { sizeBytes, transmissionFlags, blockSizes };
      }
      if (replyType === P.NBD_REP_ERR_UNSUP) return this.exportNameFallback(exportName, noZeroes);
      const message = data.toString('utf8');
      if (replyType === P.NBD_REP_ERR_UNKNOWN) {
        throw new BlockrelayError('BR_NBD_EXPORT_UNKNOWN', `NBD server ${this.where} has no export '${exportName}'${message ? `: ${message}` : ''}`, { details: { exportName } });
      }
      if (P.isOptionReplyError(replyType)) {
        throw new BlockrelayError('BR_NBD_CONNECTION', `NBD server ${this.where} refused the export (reply 0x${replyType.toString(16)})${message ? `: ${message}` : ''}`);
      }
      throw this.protocol(`unexpected option reply type ${replyType}`);
    }
  }

  /** Servers without NBD_OPT_GO: NBD_OPT_EXPORT_NAME, which answers with size and flags or a disconnect. */
  private async exportNameFallback(exportName: string, noZeroes: boolean): Promise<{ sizeBytes: number; transmissionFlags: number; blockSizes: NbdBlockSizes }> {
    this.socket.write(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
    let reply: Buffer;
    try {
      reply = await this.read(P.EXPORT_NAME_REPLY_BYTES + (noZeroes ? 0 : P.EXPORT_NAME_ZERO_PAD_BYTES));
    } catch (err) {
      throw new BlockrelayError('BR_NBD_EXPORT_UNKNOWN', `NBD server ${this.where} closed the connection on export '${exportName}'`, { cause: err, details: { exportName } });
    }
    return {
      sizeBytes: P.readU64(reply, 0),
      transmissionFlags: reply.readUInt16BE(8),
      blockSizes: { minimumBytes: 1, preferredBytes: 4096, maximumBytes: DEFAULT_MAX_REQUEST_BYTES },
    };
  }

  private protocol(what: string): BlockrelayError {
    return new BlockrelayError('BR_NBD_PROTOCOL', `NBD server ${this.where}: ${what}`);
  }

  private async read(n: number): Promise<Buffer> {
    while (this.input.length < n) {
      if (this.closed) throw new BlockrelayError('BR_NBD_CONNECTION', `NBD server ${this.where} closed the connection during the handshake`);
      const left = this.deadline - Date.now();
      if (left <= 0) throw new BlockrelayError('BR_NBD_CONNECTION', `NBD handshake with ${this.where} timed out`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.waiter = undefined;
    }
    return Buffer.from(this.input.take(n));
  }
}
