import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Logger } from '../daemon/logger';
import type { Clock } from '../platform/clock';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import type { RetryPolicy } from '../retry/retry-policy';
import { sendJson, type Route } from '../transport/http-api';
import type { PeerOptions } from '../transport/log-client';
import { validateDiskId } from '../transport/transport-protocol';
import type { ResyncProgress } from './resync-engine';
import { networkedResync, pendingEndPath, type NetworkedResyncResult } from './networked-resync';

/** What the source's control API needs to run networked resyncs of its disks. */
export interface SourceResyncsOptions {
  /** The protected disks: id → disk spec read by the resync (opened read-only). */
  readonly diskSpecs: ReadonlyMap<string, string>;
  /** The process server the source ships to. */
  readonly peer: PeerOptions;
  /** Where each disk's progress is saved (`<dir>/<disk>.resync`), so a restart resumes. */
  readonly stateDir: string;
  /**
   * Seals the disk's active log (and lets shipping send it); resolves with
   * its sequence, the anchor S. Undefined (dirty-map-only mode): the hop
   * anchors at what it received.
   */
  readonly cut: (diskId: string) => Promise<number | undefined>;
  readonly clock: Clock;
  readonly logger: Logger;
  readonly retryPolicy?: RetryPolicy;
  /** Bounds how fast a resync reads a protected disk, so it does not starve the disk's users. */
  readonly readRateBytesPerSec?: number;
}

export type SourceResyncState =
  | { readonly state: 'idle' }
  | { readonly state: 'running'; readonly startedAtMs: number; readonly progress?: ResyncProgress; readonly attempts: number; readonly lastError?: string }
  | { readonly state: 'done'; readonly finishedAtMs: number; readonly result: NetworkedResyncResult }
  | { readonly state: 'failed'; readonly finishedAtMs: number; readonly code: string; readonly message: string };

/**
 * Runs an operator's full networked resync of a protected disk while the
 * source keeps tracking and shipping (docs/transport.md, "Networked
 * resync"): `POST /v1/disks/{disk}/resync` on the source's control API
 * starts one (202; 409 BR_RESYNC_SESSION_BUSY if one runs for that disk),
 * `GET` on the same path reports its state, `DELETE` stops it (progress is
 * saved and a later start resumes).
 */
export class SourceResyncs {
  private readonly states = new Map<string, SourceResyncState>();
  private readonly running = new Map<string, { controller: AbortController; done: Promise<void> }>();
  private stopped = false;

  constructor(private readonly options: SourceResyncsOptions) {}

  statePath(diskId: string): string {
    return path.join(this.options.stateDir, `${validateDiskId(diskId)}.resync`);
  }

  state(diskId: string): SourceResyncState {
    return this.states.get(diskId) ?? { state: 'idle' };
  }

  /** Starts a resync of `diskId` in the background; resolves once it is under way. */
  start(diskId: string): SourceResyncState {
    // The control API stays open while the source stops: a resync started
    // then would run on, unstopped, and its retry timers would keep the
    // process alive after the stop.
    if (this.stopped) throw new BlockrelayError('BR_SOURCE_STOPPING', `the source is stopping; start the resync of disk ${diskId} after it starts again (it resumes interrupted resyncs by itself)`, { details: { diskId } });
    const spec = this.options.diskSpecs.get(validateDiskId(diskId));
    if (spec === undefined) throw new BlockrelayError('BR_DISK_UNKNOWN', `disk ${diskId} is not protected here`);
    if (this.running.has(diskId)) throw new BlockrelayError('BR_RESYNC_SESSION_BUSY', `a resync of disk ${diskId} is already running`, { details: { diskId } });
    fs.mkdirSync(this.options.stateDir, { recursive: true });
    const controller = new AbortController();
    const startedAtMs = this.options.clock.now();
    let attempts = 1;
    let lastError: string | undefined;
    this.states.set(diskId, { state: 'running', startedAtMs, attempts });
    const done = networkedResync(spec, {
      peer: this.options.peer,
      diskId,
      statePath: this.statePath(diskId),
      cut: () => this.options.cut(diskId),
      clock: this.options.clock,
      ...(this.options.retryPolicy ? { retryPolicy: this.options.retryPolicy } : {}),
      ...(this.options.readRateBytesPerSec === undefined ? {} : { readRateBytesPerSec: this.options.readRateBytesPerSec }),
      signal: controller.signal,
      onProgress: (progress) => this.states.set(diskId, { state: 'running', startedAtMs, progress, attempts, ...(lastError === undefined ? {} : { lastError }) }),
      onRetry: (e) => {
        attempts = e.attempt + 1;
        lastError = `${e.error.code}: ${e.error.message}`;
        this.options.logger.warn({ disk: diskId, code: e.error.code, retryAtMs: e.nextAttemptAtMs }, `resync of disk ${diskId} attempt ${e.attempt} failed: ${e.error.message}`);
      },
    }).then(
      (result) => {
        this.states.set(diskId, { state: 'done', finishedAtMs: this.options.clock.now(), result });
        this.options.logger.info({ disk: diskId, bytesSent: result.bytesSent, blocksSent: result.blocksSent, attempts: result.attempts }, `resync of disk ${diskId} finished`);
      },
      (err: unknown) => {
        const code = isBlockrelayError(err) ? err.code : 'BR_INTERNAL';
        const message = err instanceof Error ? err.message : String(err);
        this.states.set(diskId, { state: 'failed', finishedAtMs: this.options.clock.now(), code, message });
        this.options.logger.error({ disk: diskId, code }, `resync of disk ${diskId} failed: ${message}`);
      },
    ).finally(() => this.running.delete(diskId));
    this.running.set(diskId, { controller, done });
    return this.state(diskId);
  }

  /**
   * The protected disks whose resync was interrupted (the source stopped or
   * was killed mid-way): saved progress, or a finished resync whose end the
   * hop has not confirmed, lies in the state directory.
   */
  interrupted(): string[] {
    return [...this.options.diskSpecs.keys()].filter((diskId) => {
      const state = this.statePath(diskId);
      return fs.existsSync(state) || fs.existsSync(pendingEndPath(state));
    });
  }

  /**
   * Starts again every interrupted resync (call once the source serves and
   * ships): each resumes from its saved progress, or only confirms its end.
   * Returns the disks started.
   */
  resumeInterrupted(): string[] {
    const started: string[] = [];
    for (const diskId of this.interrupted()) {
      if (this.running.has(diskId)) continue;
      this.options.logger.info({ disk: diskId }, `resuming the interrupted resync of disk ${diskId} from its saved progress`);
      this.start(diskId);
      started.push(diskId);
    }
    return started;
  }

  /** Resolves when the disk's resync (if any) has finished. */
  async whenDone(diskId: string): Promise<SourceResyncState> {
    await this.running.get(diskId)?.done;
    return this.state(diskId);
  }

  /** Stops every running resync (the source is stopping); progress is saved. */
  async stop(): Promise<void> {
    this.stopped = true;
    for (const r of this.running.values()) r.controller.abort();
    await Promise.all([...this.running.values()].map((r) => r.done));
  }

  routes(): Route[] {
    const pattern = '/v1/disks/:disk/resync';
    return [
      {
        method: 'POST',
        pattern,
        handler: async (ctx) => {
          const diskId = validateDiskId(ctx.params.disk!);
          ctx.req.resume();
          sendJson(ctx.res, 202, { diskId, ...this.start(diskId) });
        },
      },
      {
        method: 'GET',
        pattern,
        handler: async (ctx) => {
          const diskId = validateDiskId(ctx.params.disk!);
          if (!this.options.diskSpecs.has(diskId)) throw new BlockrelayError('BR_DISK_UNKNOWN', `disk ${diskId} is not protected here`);
          sendJson(ctx.res, 200, { diskId, ...this.state(diskId) });
        },
      },
      {
        method: 'DELETE',
        pattern,
        handler: async (ctx) => {
          const diskId = validateDiskId(ctx.params.disk!);
          const r = this.running.get(diskId);
          r?.controller.abort();
          await r?.done;
          sendJson(ctx.res, 200, { diskId, ...this.state(diskId) });
        },
      },
    ];
  }
}
