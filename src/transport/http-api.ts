import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo } from 'node:net';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import type { ErrorCode } from '../retry/error-codes';
import type { Logger } from '../daemon/logger';

/**
 * The small HTTP(S) layer every role's API sits on: routes, shared-secret
 * authentication compared in constant time, coded errors turned into HTTP
 * statuses with a JSON body `{ error: { code, message, details } }` that the
 * client turns back into the same coded error.
 */
export interface RouteContext {
  readonly req: http.IncomingMessage;
  readonly res: http.ServerResponse;
  readonly params: Record<string, string>;
  readonly url: URL;
}

export type RouteHandler = (ctx: RouteContext) => Promise<void>;

export interface Route {
  readonly method: string;
  /** A path pattern with `:name` segments, e.g. `/v1/disks/:disk/logs/:seq`. */
  readonly pattern: string;
  readonly handler: RouteHandler;
  /** Routes open without the secret (the status page and /metrics). */
  readonly public?: boolean;
}

export interface TlsFiles {
  readonly certFile: string;
  readonly keyFile: string;
  readonly caFile?: string | undefined;
}

export interface HttpApiOptions {
  readonly secret: string | undefined;
  readonly routes: readonly Route[];
  readonly tls?: TlsFiles | undefined;
  readonly logger: Logger;
  /** Bound on simultaneous connections; more wait in the kernel's backlog. */
  readonly maxConnections?: number;
}

const STATUS_BY_CODE: Partial<Record<ErrorCode, number>> = {
  BR_AUTH_FAILED: 401,
  BR_PROTOCOL: 400,
  BR_DISK_ID_INVALID: 400,
  BR_USAGE: 400,
  BR_DISK_UNKNOWN: 404,
  BR_SEQ_GAP: 409,
  BR_SEQ_CONFLICT: 409,
  BR_SEQ_UNKNOWN: 409,
  BR_RESYNC_SESSION_BUSY: 409,
  BR_RESYNC_SESSION_EXPIRED: 410,
  BR_UPLOAD_TOO_LARGE: 413,
  BR_UPLOAD_INCOMPLETE: 400,
  BR_UPLOAD_HASH_MISMATCH: 422,
  BR_DISK_CRITICAL: 423,
  BR_SPOOL_FULL: 507,
  BR_DISK_FULL: 507,
};

/** The HTTP status for a coded error: specific where the protocol needs it, else by recoverability. */
export function statusForError(err: BlockrelayError): number {
  const specific = STATUS_BY_CODE[err.code];
  if (specific !== undefined) return specific;
  if (err.code.startsWith('BR_HRL_')) return 422;
  return err.recoverable ? 503 : 500;
}

/** Constant-time comparison of the presented secret with the configured one. */
export function secretMatches(presented: string | undefined, secret: string): boolean {
  const a = crypto.createHash('sha256').update(presented ?? '').digest();
  const b = crypto.createHash('sha256').update(secret).digest();
  return crypto.timingSafeEqual(a, b) && presented !== undefined;
}

function compile(pattern: string): { regex: RegExp; names: string[] } {
  const names: string[] = [];
  const body = pattern
    .split('/')
    .map((part) => {
      if (!part.startsWith(':')) return part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      names.push(part.slice(1));
      return '([^/]+)';
    })
    .join('/');
  return { regex: new RegExp(`^${body}$`), names };
}

export function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' });
  res.end(text);
}

export function sendError(res: http.ServerResponse, err: BlockrelayError): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  sendJson(res, statusForError(err), { error: { code: err.code, message: err.message, details: err.details } });
}

/** How long closing waits for requests in flight before cutting their connections. */
export const HTTP_CLOSE_GRACE_MS = 10_000;

export class HttpApi {
  private readonly server: http.Server;
  private closing = false;
  private readonly compiled: Array<Route & { regex: RegExp; names: string[] }>;

  constructor(private readonly options: HttpApiOptions) {
    this.compiled = options.routes.map((r) => ({ ...r, ...compile(r.pattern) }));
    const handler = (req: http.IncomingMessage, res: http.ServerResponse): void => {
      void this.handle(req, res);
    };
    this.server = options.tls
      ? https.createServer(
          {
            cert: fs.readFileSync(options.tls.certFile),
            key: fs.readFileSync(options.tls.keyFile),
            ...(options.tls.caFile ? { ca: fs.readFileSync(options.tls.caFile) } : {}),
          },
          handler,
        )
      : http.createServer(handler);
    this.server.maxConnections = options.maxConnections ?? 256;
    this.server.requestTimeout = 0;
    this.server.headersTimeout = 30_000;
    this.server.keepAliveTimeout = 30_000;
  }

  /** Listens on HOST:PORT (port 0 picks a free one); resolves with the bound address. */
  listen(host: string, port: number): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host.replace(/^\[|\]$/g, ''), () => {
        this.server.off('error', reject);
        resolve(this.server.address() as AddressInfo);
      });
    });
  }

  get url(): string {
    const addr = this.server.address() as AddressInfo;
    const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
    return `${this.options.tls ? 'https' : 'http'}://${host}:${addr.port}`;
  }

  /**
   * Stops accepting and waits for requests in flight, within `graceMs`.
   * Keep-alive connections are ended as they go idle (a status page polling
   * every two seconds would otherwise hold the server open forever) and
   * answered with `connection: close` meanwhile; after the grace, whatever
   * is left is cut (an upload cut this way is simply resent).
   */
  close(graceMs: number = HTTP_CLOSE_GRACE_MS): Promise<void> {
    this.closing = true;
    return new Promise((resolve) => {
      const sweep = setInterval(() => this.server.closeIdleConnections(), 100);
      const force = setTimeout(() => this.server.closeAllConnections(), graceMs);
      this.server.close(() => {
        clearInterval(sweep);
        clearTimeout(force);
        resolve();
      });
      this.server.closeIdleConnections();
    });
  }

  /** Drops every connection at once (tests of abrupt failure). */
  destroyConnections(): void {
    this.server.closeAllConnections();
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    if (this.closing) res.setHeader('connection', 'close');
    try {
      const route = this.match(req.method ?? 'GET', url.pathname);
      if (route === undefined) throw new BlockrelayError('BR_PROTOCOL', `no route for ${req.method} ${url.pathname}`);
      if (!route.route.public && this.options.secret !== undefined) {
        const header = req.headers.authorization;
        const presented = header?.startsWith('Bearer ') ? header.slice(7) : undefined;
        if (!secretMatches(presented, this.options.secret)) {
          req.resume();
          throw new BlockrelayError('BR_AUTH_FAILED', 'missing or wrong shared secret');
        }
      }
      await route.route.handler({ req, res, params: route.params, url });
    } catch (err) {
      const coded = isBlockrelayError(err) ? err : new BlockrelayError('BR_INTERNAL', (err as Error)?.message ?? String(err), { cause: err });
      if (!coded.recoverable || coded.code === 'BR_INTERNAL') this.options.logger.warn({ code: coded.code, path: url.pathname, err: coded }, coded.message);
      // Drain what is left of a refused upload so the connection can be reused.
      if (!req.complete) req.resume();
      sendError(res, coded);
    }
  }

  private match(method: string, pathname: string): { route: Route; params: Record<string, string> } | undefined {
    let pathMatched = false;
    for (const r of this.compiled) {
      const m = r.regex.exec(pathname);
      if (m === null) continue;
      pathMatched = true;
      if (r.method !== method) continue;
      const params: Record<string, string> = {};
      r.names.forEach((name, i) => {
        try {
          params[name] = decodeURIComponent(m[i + 1]!);
        } catch {
          throw new BlockrelayError('BR_PROTOCOL', `malformed path segment in ${pathname}`);
        }
      });
      return { route: r, params };
    }
    if (pathMatched) throw new BlockrelayError('BR_PROTOCOL', `method ${method} not allowed on ${pathname}`);
    return undefined;
  }
}
