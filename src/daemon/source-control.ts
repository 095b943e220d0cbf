import type { Clock } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import { HttpApi, sendJson, type Route } from '../transport/http-api';
import { AppTagger, type TagRequest, type TagResult } from './app-tagger';
import type { Logger } from './logger';
import type { Metrics } from './metrics';
import type { QuiesceHook } from './quiesce-hook';
import { observabilityRoutes } from './status-page';

/** Largest JSON body the control API reads. */
const CONTROL_BODY_MAX_BYTES = 64 * 1024;

export interface SourceControlOptions {
  /** The protected disks of this source, in the order they were given. */
  readonly diskIds: readonly string[];
  /** The replication group every disk here belongs to, if any. */
  readonly group?: string | undefined;
  /** Cuts the disks at one point carrying the app tag (and ships them when shipping). */
  readonly cut: (diskIds: string[], appTag: string) => Promise<{ cutId: string; cutTimeMs: number }>;
  /** The document `/v1/status` serves. */
  readonly status: () => unknown;
  readonly hook: QuiesceHook | undefined;
  /** Automatic app-consistent points (60 minutes by default); 0 turns them off. */
  readonly appIntervalMs: number;
  /** Shared secret of the control API (BLOCKRELAY_CONTROL_SECRET); none: open, so keep it on loopback. */
  readonly secret: string | undefined;
  readonly clock: Clock;
  readonly logger: Logger;
  readonly metrics: Metrics;
  /** More routes on the same API, e.g. SourceResyncs' `/v1/disks/:disk/resync` (src/resync/source-resyncs.ts). */
  readonly extraRoutes?: readonly Route[];
}

/**
 * The source's control plane, shared by `blockrelay source --control` and
 * the demo: the status page, `/v1/status` and `/metrics`, and
 * `POST /v1/tags` for app-consistent points (`blockrelay tag`), plus the
 * schedule of automatic app-consistent points.
 */
export class SourceControl {
  readonly tagger: AppTagger;
  private api: HttpApi | undefined;

  constructor(private readonly options: SourceControlOptions) {
    this.tagger = new AppTagger({
      clock: options.clock,
      hook: options.hook,
      intervalMs: options.appIntervalMs,
      select: (r) => this.select(r),
      cut: (disks, appTag) => options.cut(disks, appTag),
      onError: (err) => options.logger.warn({ code: err.code }, `scheduled app-consistent point failed: ${err.message}`),
    });
  }

  get url(): string {
    if (this.api === undefined) throw new Error('control API not listening');
    return this.api.url;
  }

  async listen(host: string, port: number): Promise<string> {
    this.api = new HttpApi({ secret: this.options.secret, routes: this.routes(), logger: this.options.logger });
    await this.api.listen(host, port);
    this.tagger.start();
    return this.api.url;
  }

  async close(): Promise<void> {
    this.tagger.stop();
    await this.api?.close();
  }

  tag(request: TagRequest): Promise<TagResult> {
    return this.tagger.tag(request);
  }

  private select(request: TagRequest): string[] {
    const all = [...this.options.diskIds];
    if (request.diskId !== undefined) {
      if (!all.includes(request.diskId)) throw new BlockrelayError('BR_DISK_UNKNOWN', `disk ${request.diskId} is not protected here`);
      return [request.diskId];
    }
    if (request.group !== undefined && request.group !== this.options.group) {
      throw new BlockrelayError('BR_DISK_UNKNOWN', `group ${request.group} is not protected here${this.options.group === undefined ? '' : ` (this source protects group ${this.options.group})`}`);
    }
    // A source protects one machine or group: its disks are cut together.
    return all;
  }

  private routes(): Route[] {
    return [
      ...observabilityRoutes(this.options.status, this.options.metrics),
      ...(this.options.extraRoutes ?? []),
      {
        method: 'POST',
        pattern: '/v1/tags',
        handler: async (ctx) => {
          const body = await readJsonBody(ctx.req);
          if (body.app !== true) throw new BlockrelayError('BR_PROTOCOL', 'only app-consistent tags can be requested ("app": true)');
          const result = await this.tagger.tag({
            diskId: typeof body.diskId === 'string' ? body.diskId : undefined,
            group: typeof body.group === 'string' ? body.group : undefined,
            name: typeof body.name === 'string' ? body.name : undefined,
          });
          sendJson(ctx.res, 200, result);
        },
      },
    ];
  }
}

/** Reads a small JSON object body (at most CONTROL_BODY_MAX_BYTES). */
async function readJsonBody(req: import('node:http').IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > CONTROL_BODY_MAX_BYTES) throw new BlockrelayError('BR_PROTOCOL', `request body larger than ${CONTROL_BODY_MAX_BYTES} bytes`);
    chunks.push(chunk as Buffer);
  }
  try {
    const parsed = JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}') as unknown;
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new Error('not an object');
    return parsed as Record<string, unknown>;
  } catch (err) {
    throw new BlockrelayError('BR_PROTOCOL', `request body is not a JSON object: ${(err as Error).message}`);
  }
}
