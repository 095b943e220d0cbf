import * as http from 'node:http';

/**
 * A recording, fault-injecting HTTP proxy in front of a real Azurite: every
 * request is forwarded unchanged (shared-key signatures cover the path and
 * headers, not the host), and recorded so tests can see how blockrelay
 * talks to the service (Put Page sizes, concurrency). Injected faults answer
 * chosen requests the way the storage service does when it throttles or
 * fails (status, x-ms-error-code, XML error body) without forwarding them.
 */
export interface RecordedRequest {
  readonly method: string;
  /** The `comp` query parameter (`page`, `lease`, `pagelist`...), or ''. */
  readonly comp: string;
  /** `update` or `clear` for Put Page. */
  readonly pageWrite: string | undefined;
  readonly range: string | undefined;
  readonly contentLengthBytes: number;
}

export interface Fault {
  /** Which requests to fail. */
  readonly match: (request: RecordedRequest) => boolean;
  readonly status: number;
  readonly errorCode: string;
  /** How many matching requests to fail before passing them on again. */
  times: number;
}

export class AzuriteProxy {
  readonly requests: RecordedRequest[] = [];
  /** Most Put Page (update) requests seen in flight at once. */
  maxConcurrentPutPages = 0;
  private activePutPages = 0;
  private readonly faults: Fault[] = [];

  private constructor(private readonly server: http.Server, readonly port: number) {}

  /** `http://127.0.0.1:PORT/devstoreaccount1` through the proxy. */
  get blobEndpoint(): string {
    return `http://127.0.0.1:${this.port}/devstoreaccount1`;
  }

  static async start(azuritePort: number): Promise<AzuriteProxy> {
    let proxy: AzuriteProxy | undefined;
    const server = http.createServer((req, res) => proxy!.handle(req, res, azuritePort));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const address = server.address();
    proxy = new AzuriteProxy(server, typeof address === 'object' && address !== null ? address.port : 0);
    return proxy;
  }

  injectFault(fault: Fault): void {
    this.faults.push(fault);
  }

  clear(): void {
    this.requests.length = 0;
    this.faults.length = 0;
    this.maxConcurrentPutPages = 0;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse, azuritePort: number): void {
    const url = new URL(req.url ?? '/', 'http://proxy');
    const recorded: RecordedRequest = {
      method: req.method ?? 'GET',
      comp: url.searchParams.get('comp') ?? '',
      pageWrite: header(req, 'x-ms-page-write'),
      range: header(req, 'x-ms-range') ?? header(req, 'range'),
      contentLengthBytes: Number(header(req, 'content-length') ?? 0),
    };
    this.requests.push(recorded);
    const fault = this.faults.find((f) => f.times > 0 && f.match(recorded));
    if (fault !== undefined) {
      fault.times--;
      req.resume();
      req.on('end', () => {
        const body = `<?xml version="1.0" encoding="utf-8"?><Error><Code>${fault.errorCode}</Code><Message>injected by the test proxy</Message></Error>`;
        res.writeHead(fault.status, { 'content-type': 'application/xml', 'x-ms-error-code': fault.errorCode, 'content-length': Buffer.byteLength(body) });
        res.end(req.method === 'HEAD' ? undefined : body);
      });
      return;
    }
    const isPut = recorded.comp === 'page' && recorded.pageWrite === 'update';
    if (isPut) {
      this.activePutPages++;
      this.maxConcurrentPutPages = Math.max(this.maxConcurrentPutPages, this.activePutPages);
    }
    let done = false;
    const finish = (): void => {
      if (done) return;
      done = true;
      if (isPut) this.activePutPages--;
    };
    const upstream = http.request({ host: '127.0.0.1', port: azuritePort, method: req.method, path: req.url, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers);
      up.pipe(res);
      up.on('end', finish);
    });
    upstream.on('error', (err) => {
      finish();
      res.destroy(err);
    });
    res.on('close', finish);
    req.pipe(upstream);
  }
}

function header(req: http.IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}
