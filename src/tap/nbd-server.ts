import * as net from 'node:net';
import { DEFAULT_NBD_CONNECTION_LIMITS, NbdConnection, type ConnectionHost, type NbdConnectionLimits } from './nbd-connection';
import type { NbdExport } from './nbd-export';
import { NBD_DEFAULT_MAX_BLOCK_BYTES, ServedExport } from './served-export';
import { DEFAULT_RECORD_QUEUE_LIMITS, type RecordQueueLimits } from './record-queue';
import { PayloadPool } from './payload-pool';
import { resolvesWithin, systemClock, type Clock } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';

export interface NbdServerOptions {
  readonly exports: readonly NbdExport[];
  /** Per-connection bounds; defaults in DEFAULT_NBD_CONNECTION_LIMITS. */
  readonly limits?: Partial<NbdConnectionLimits>;
  /** Largest READ/WRITE/WRITE_ZEROES length advertised and accepted (default 32 MiB). */
  readonly maxBlockBytes?: number;
  /** How far records may run ahead of replies, per export (DEFAULT_RECORD_QUEUE_LIMITS). */
  readonly recordLimits?: Partial<RecordQueueLimits>;
  /** Connections beyond this are closed at once (default 64). */
  readonly maxConnections?: number;
  readonly clock?: Clock;
  /** Where protocol violations and failed requests are reported; silent by default. */
  readonly warn?: (message: string, details?: Record<string, unknown>) => void;
  /**
   * Leave READ and WRITE of eligible exports to the native data path after
   * the handshake (default true; see ServedExport.native). False keeps every
   * request in TypeScript.
   */
  readonly nativeDataPath?: boolean;
}

/** Where the server listens once started. */
export interface NbdServerAddress {
  readonly host: string;
  readonly port: number;
}

/**
 * An NBD server (fixed newstyle, simple replies) serving a fixed set of
 * named exports. Each client connection is an independent `NbdConnection`;
 * a misbehaving client is answered with errors or dropped without touching
 * the others.
 */
export class NbdServer implements ConnectionHost {
  readonly limits: NbdConnectionLimits;
  readonly clock: Clock;
  readonly payloadPool = new PayloadPool();
  private readonly exports = new Map<string, ServedExport>();
  private readonly exportList: ServedExport[] = [];
  private readonly connections = new Set<NbdConnection>();
  private readonly maxConnections: number;
  private readonly warnSink: (message: string, details?: Record<string, unknown>) => void;
  private server: net.Server | undefined;
  private closing = false;
  private idleWaiters: (() => void)[] = [];
  /** Requests in flight on connections dropped at shutdown: never answered. */
  private droppedRequests = 0;
  /** Exports whose native writer had not ended when close() last looked (a write stuck on a hung disk). */
  private readonly stillWriting = new Set<string>();

  constructor(options: NbdServerOptions) {
    this.limits = { ...DEFAULT_NBD_CONNECTION_LIMITS, ...options.limits };
    this.clock = options.clock ?? systemClock;
    this.maxConnections = options.maxConnections ?? 64;
    this.warnSink = options.warn ?? (() => {});
    const maxBlockBytes = options.maxBlockBytes ?? NBD_DEFAULT_MAX_BLOCK_BYTES;
    if (this.limits.maxBufferedBytes < maxBlockBytes + 64 * 1024) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `NBD maxBufferedBytes (${this.limits.maxBufferedBytes}) must exceed the max block size (${maxBlockBytes}) by 64 KiB`);
    }
    for (const exp of options.exports) {
      if (this.exports.has(exp.name)) throw new BlockrelayError('BR_CONFIG_INVALID', `two NBD exports are named '${exp.name}'`);
      const served = new ServedExport(exp, maxBlockBytes, (message, details) => this.warn(message, details), { ...DEFAULT_RECORD_QUEUE_LIMITS, ...options.recordLimits }, options.nativeDataPath ?? true);
      this.exports.set(exp.name, served);
      this.exportList.push(served);
    }
  }

  get shuttingDown(): boolean {
    return this.closing;
  }

  /** Number of open client connections. */
  get connectionCount(): number {
    return this.connections.size;
  }

  /**
   * What a shutdown left undone so far: requests in flight on connections
   * still open or dropped by `close()` (never answered), and exports whose
   * native writer has not ended (a write stuck on a hung disk).
   */
  shutdownLeftovers(): { unansweredRequests: number; openConnections: number; exportsStillWriting: string[] } {
    let inFlight = 0;
    for (const conn of this.connections) inFlight += conn.requestsInFlight;
    return { unansweredRequests: this.droppedRequests + inFlight, openConnections: this.connections.size, exportsStillWriting: [...this.stillWriting].sort() };
  }

  findExport(name: string): ServedExport | undefined {
    return this.exports.get(name);
  }

  listExports(): readonly ServedExport[] {
    return this.exportList;
  }

  warn(message: string, details?: Record<string, unknown>): void {
    this.warnSink(message, details);
  }

  /** Starts listening; port 0 picks a free port. Resolves with the bound address. */
  listen(host: string, port: number): Promise<NbdServerAddress> {
    if (this.server !== undefined) throw new Error('NbdServer.listen called twice');
    const server = net.createServer({ noDelay: true }, (socket) => this.accept(socket));
    this.server = server;
    return new Promise((resolve, reject) => {
      server.once('error', (err) => {
        reject(new BlockrelayError('BR_TAP_LISTEN', `cannot listen on ${host}:${port}: ${err.message}`, { cause: err, details: { host, port } }));
      });
      server.listen({ host, port }, () => {
        const addr = server.address() as net.AddressInfo;
        server.on('error', (err) => this.warn('NBD server socket error', { message: err.message }));
        resolve({ host: addr.address, port: addr.port });
      });
    });
  }

  /**
   * Stops accepting, lets every connection finish the requests it has in
   * flight (their replies are sent), then closes them. Resolves when all
   * are closed; after `graceMs` the remaining ones are dropped and the
   * server stops waiting for their requests (a source that never answers
   * cannot hold the shutdown). `graceMs` bounds the whole close: the waits
   * for busy connections, native writers and the listener share one
   * deadline, so a disk with both a READ and a WRITE stuck in it costs one
   * grace, not three.
   */
  async close(graceMs = 10_000): Promise<void> {
    this.closing = true;
    const deadlineMs = this.clock.now() + graceMs;
    const leftMs = (): number => Math.max(0, deadlineMs - this.clock.now());
    const server = this.server;
    const closed = server === undefined ? Promise.resolve() : new Promise<void>((resolve) => server.close(() => resolve()));
    for (const conn of this.connections) conn.shutdown();
    if (this.connections.size > 0) {
      const idle = new Promise<void>((resolve) => this.idleWaiters.push(resolve));
      const timer = this.clock.setTimer(() => {
        for (const conn of this.connections) {
          this.warn('NBD connection still busy at shutdown; dropping it', { export: conn.exportName, inFlight: conn.requestsInFlight });
          this.droppedRequests += conn.requestsInFlight;
          conn.hardDisconnect();
          this.connectionFinished(conn);
        }
      }, leftMs());
      await idle;
      timer.cancel();
    }
    // A native writer ends once its queued writes are on the disk; one stuck
    // on a hung disk ends when the disk answers. The event loop runs
    // meanwhile, and the server stops waiting for it at the deadline.
    for (const exp of this.exportList) if (exp.native !== undefined) this.stillWriting.add(exp.name);
    const nativeClosed = Promise.all(this.exportList.map((exp) => exp.closeNative().finally(() => this.stillWriting.delete(exp.name))));
    if (!(await resolvesWithin(nativeClosed, leftMs(), this.clock))) this.warn('NBD export still writing to its disk at shutdown (a write is stuck); not waiting for it');
    // The listener closes once every socket has: a native connection's
    // socket stays open until its thread lets go, and a thread in a READ
    // from a hung disk does not. Not waited for beyond the grace either.
    if (!(await resolvesWithin(closed, leftMs(), this.clock))) this.warn('NBD connection thread still in a disk read at shutdown (the disk hangs); not waiting for it');
  }

  connectionFinished(conn: NbdConnection): void {
    this.connections.delete(conn);
    if (this.connections.size === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  private accept(socket: net.Socket): void {
    if (this.closing || this.connections.size >= this.maxConnections) {
      this.warn('NBD connection refused', { reason: this.closing ? 'shutting down' : 'too many connections', remote: socket.remoteAddress });
      socket.on('error', () => {});
      socket.destroy();
      return;
    }
    this.connections.add(new NbdConnection(socket, this));
  }
}
