import * as fs from 'node:fs';
import * as path from 'node:path';
import type { BlockrelayConfig } from '../daemon/config';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import { DiskHealth } from '../retry/health';
import { BandwidthLimiter } from './bandwidth-limiter';
import { DiskDrain, spoolQueue } from './disk-drain';
import { sendLog, type PeerOptions } from './log-client';
import type { LogOps } from './log-ops';
import type { SpoolEntry } from './log-spool';
import { ApplyingHop, type ApplyingHopOptions, type DiskApplyStatus } from './master-target';
import { validateDiskId } from './transport-protocol';
import { UploadPipeline } from './upload-pipeline';
import type { ResyncDiskAccess } from './resync-route';

export interface ForwardOptions {
  readonly peer: PeerOptions;
  readonly bandwidthBytesPerSecond: number;
}

interface ForwardedDisk {
  readonly diskId: string;
  readonly drain: DiskDrain;
  /** The next spooled log goes out while the one before it waits for the master target's answer. */
  readonly pipeline: UploadPipeline<SpoolEntry>;
  readonly health: DiskHealth;
  forwardedBytesTotal: number;
}

/**
 * The process server: receives sealed logs from sources, verifies them
 * fully, stores them on its cache volume (fsync before the answer) and
 * forwards them per disk, in order, lz4-compressed, to a master target under
 * a per-link bandwidth limit. Disks configured with a target of their own
 * (page blobs, when deployed Azure-side) are applied here instead.
 *
 * When the spool reaches its size bound the process server answers
 * BR_SPOOL_FULL: the source keeps its logs (and overflows into a resync if
 * they grow too large) rather than anything being dropped.
 */
export class ProcessServer extends ApplyingHop {
  private readonly forwarded = new Map<string, ForwardedDisk>();
  private readonly limiter: BandwidthLimiter | undefined;

  constructor(
    options: ApplyingHopOptions,
    localTargets: ReadonlyMap<string, string>,
    private readonly forward: ForwardOptions | undefined,
  ) {
    super(options, localTargets);
    this.limiter = forward && forward.bandwidthBytesPerSecond > 0 ? new BandwidthLimiter(forward.bandwidthBytesPerSecond, this.clock) : undefined;
  }

  protected override acceptsDisk(diskId: string): boolean {
    return super.acceptsDisk(diskId) || this.forward !== undefined;
  }

  protected override onAccepted(entry: SpoolEntry): void {
    if (super.acceptsDisk(entry.envelope.diskId)) {
      super.onAccepted(entry);
      return;
    }
    const disk = this.forwarderFor(entry.envelope.diskId);
    disk.drain.wake();
    // The log before it may be out already, waiting for its answer (a master target applying on receipt answers after the apply).
    disk.pipeline.kick();
  }

  override async start(): Promise<void> {
    await super.start();
    // Logs left in the spool by a previous run are forwarded first.
    for (const diskId of this.spool.disks()) if (!super.acceptsDisk(diskId)) this.forwarderFor(diskId);
  }

  override async drain(): Promise<void> {
    await super.drain();
    await Promise.all([...this.forwarded.values()].map((d) => d.drain.whenIdle()));
  }

  override async stop(): Promise<void> {
    await Promise.all([...this.forwarded.values()].map(async (d) => {
      await d.drain.stop();
      await d.pipeline.stop();
    }));
    await super.stop();
  }

  override diskStatus(): DiskApplyStatus[] {
    const local = super.diskStatus();
    const forwarded = [...this.forwarded.values()].map((d) => {
      const ledger = this.ledger.get(d.diskId);
      return {
        diskId: d.diskId,
        target: this.forward!.peer.url,
        health: d.health.state,
        reasons: d.health.reasons.map((r) => `${r.code}: ${r.message}`),
        state: d.drain.state,
        appliedSeq: null,
        nextSeq: ledger.nextSeq,
        pendingLogs: this.spool.list(d.diskId).length,
        pendingBytes: this.spool.pendingBytes(d.diskId),
        appliedBytesTotal: d.forwardedBytesTotal,
        lastPointTimeMs: null,
        rpoSeconds: null,
        recentErrors: d.health.recentErrors.map((e) => ({ code: e.code, message: e.message, atMs: e.atMs })),
        resync: this.resyncSessions.status(d.diskId),
      } satisfies DiskApplyStatus;
    });
    return [...local, ...forwarded];
  }

  /** A forwarded disk's resync session is relayed to the master target, after this hop's spool up to the anchor is forwarded. */
  protected override resyncAccess(diskId: string): ResyncDiskAccess | undefined {
    const local = super.resyncAccess(diskId);
    if (local !== undefined || this.forward === undefined) return local;
    const disk = this.forwarderFor(diskId);
    const nextSeq = (): number | null => this.ledger.get(diskId).nextSeq;
    return {
      kind: 'relay',
      diskId,
      drain: disk.drain,
      receivedSeq: () => (nextSeq() === null ? null : nextSeq()! - 1),
      oldestSpooledSeq: () => this.spool.list(diskId)[0]?.envelope.seq,
      peer: this.forward.peer,
    };
  }

  private forwarderFor(diskId: string): ForwardedDisk {
    const existing = this.forwarded.get(diskId);
    if (existing !== undefined) return existing;
    validateDiskId(diskId);
    const health = new DiskHealth(diskId, this.options.rpoThresholdSeconds * 1000);
    const disk: ForwardedDisk = {
      diskId,
      health,
      forwardedBytesTotal: 0,
      pipeline: new UploadPipeline<SpoolEntry>({
        key: (entry) => entry.envelope.seq,
        send: (entry, onBodySent) => this.forwardOne(disk, entry, onBodySent),
        next: async (entry) => {
          const next = this.spool.list(diskId).find((e) => e.envelope.seq > entry.envelope.seq);
          return next === undefined || disk.drain.holds(next) ? undefined : next;
        },
      }),
      drain: new DiskDrain({
        diskId,
        queue: spoolQueue(this.spool, diskId, () => this.ledger.persist(diskId)),
        stage: 'forward',
        handle: (entry) => disk.pipeline.send(entry),
        clock: this.clock,
        logger: this.logger,
        metrics: this.metrics,
        health,
        ...(this.options.retryPolicy ? { retryPolicy: this.options.retryPolicy } : {}),
      }),
    };
    this.forwarded.set(diskId, disk);
    disk.drain.start();
    return disk;
  }

  private async forwardOne(disk: ForwardedDisk, entry: SpoolEntry, onBodySent: () => void): Promise<void> {
    const forward = this.forward!;
    this.reportStage('forward', 'start', entry);
    try {
      await sendLog(forward.peer, entry.envelope, entry.file, { lz4: true, limiter: this.limiter, onBodySent });
    } catch (err) {
      if (isBlockrelayError(err) && err.code === 'BR_SEQ_GAP') {
        // We send oldest first and delete only after an ack, so a master
        // target expecting an older log lost state we no longer hold.
        throw new BlockrelayError('BR_DISK_CRITICAL', `master target expects log ${String(err.details.expectedSeq)} of disk ${disk.diskId}, which this process server no longer holds; the disk needs a resync`, { cause: err });
      }
      throw err;
    }
    disk.forwardedBytesTotal += entry.sizeBytes;
    this.metrics.shippedBytesTotal.inc({ disk: disk.diskId, hop: 'process-server' }, entry.sizeBytes);
    this.reportStage('forward', 'done', entry);
  }
}

/** `blockrelay process-server --config FILE`. */
export function processServerFromConfig(config: BlockrelayConfig, logOps: LogOps, extra: Partial<ApplyingHopOptions> = {}): ProcessServer {
  if (config.forward === undefined && config.disks.length === 0) {
    throw new BlockrelayError('BR_CONFIG_INVALID', "a process server needs 'forward' (a master target) or 'disks' with targets of its own (Azure side)");
  }
  const cacheDir = config.cache?.dir ?? path.join(config.stateDir, 'cache');
  return new ProcessServer(
    {
      stateDir: config.stateDir,
      listen: config.listen,
      secret: config.secret,
      tls: config.tls,
      spoolDir: cacheDir,
      spoolMaxBytes: config.cache?.maxBytes ?? 64 * 1024 ** 3,
      rpoThresholdSeconds: config.rpoThresholdSeconds,
      logOps,
      hopName: 'process-server',
      ...extra,
    },
    new Map(config.disks.map((d) => [d.id, d.target])),
    config.forward === undefined
      ? undefined
      : { peer: { url: config.forward.url, secret: config.forward.secret, timeoutMs: config.forward.timeoutSeconds * 1000, ca: readCaFile(config.forward.caFile) }, bandwidthBytesPerSecond: config.forward.bandwidthBytesPerSecond },
  );
}

/** Reads the forward's CA file at start, so a missing file is refused before serving. */
function readCaFile(file: string | undefined): Buffer | undefined {
  if (file === undefined) return undefined;
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new BlockrelayError('BR_CONFIG_INVALID', `config key 'forward.caFile': cannot read ${file}: ${(err as Error).message}`, { cause: err, details: { key: 'forward.caFile' } });
  }
}
