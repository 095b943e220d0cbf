import * as fs from 'node:fs';
import * as path from 'node:path';
import type { BlockrelayConfig } from '../daemon/config';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import { DiskHealth } from '../retry/health';
import { HEALTH_GAUGE_VALUE } from '../daemon/metrics';
import { BandwidthLimiter } from './bandwidth-limiter';
import { CutThroughForward } from './cut-through-forward';
import { DiskDrain, spoolQueue } from './disk-drain';
import { sendLog, type PeerOptions } from './log-client';
import type { LogOps } from './log-ops';
import type { SpoolEntry } from './log-spool';
import { RECEIVER_MAX_IN_FLIGHT } from './log-receiver';
import { ApplyingHop, type ApplyingHopOptions, type DiskApplyStatus } from './master-target';
import type { Route, RouteContext } from './http-api';
import { HEADER, parseEnvelope, PROTOCOL_VERSION, validateDiskId } from './transport-protocol';
import { UploadPipeline } from './upload-pipeline';
import type { ResyncDiskAccess } from './resync-route';

export interface ForwardOptions {
  readonly peer: PeerOptions;
  readonly bandwidthBytesPerSecond: number;
  /**
   * Forward a log while it still arrives (cutThrough), where it may. Off by
   * default: it pays where the hops have cores of their own (a log's
   * latency becomes the longer hop instead of the sum), but with the whole
   * chain on two shared cores (the demo, the e2e bench) the process
   * server's receive and forward only compete for them, and a log took
   * longer (docs/transport.md).
   */
  readonly cutThrough?: boolean;
}

interface ForwardedDisk {
  readonly diskId: string;
  readonly drain: DiskDrain;
  /** The next spooled log goes out while the one before it waits for the master target's answer. */
  readonly pipeline: UploadPipeline<SpoolEntry>;
  readonly health: DiskHealth;
  forwardedBytesTotal: number;
  /**
   * The next hop answered this hop's last upload of the disk with success.
   * Until then nothing is cut through: a next hop that holds no log of the
   * disk takes any sequence number as its first (upload-pipeline.ts).
   */
  established: boolean;
  /**
   * The newest log whose upload to the next hop began (either way) and had
   * not failed: the log after it may be cut through (the next hop takes it
   * behind that one). A cut-through of a log arriving before the log ahead
   * of it began waits (deferStart) and begins as soon as that one does.
   */
  lastStartedSeq: number | undefined;
  /** Logs forwarded while they arrived, by sequence number (at most CUT_THROUGH_MAX_LOGS). */
  readonly cutThroughs: Map<number, CutThrough>;
  /** Logs forwarded while they arrived and answered by the next hop (status, tests). */
  cutThroughLogsTotal: number;
  /**
   * Uploads of the disk to the next hop under way (from the spool and cut
   * through): a cut-through begins only while fewer than the receiver takes
   * (RECEIVER_MAX_IN_FLIGHT), which would refuse one more as busy.
   */
  uploadsInFlight: number;
}

/** A log forwarded while it arrived (cut-through-forward.ts). */
interface CutThrough {
  readonly xxhash64: string;
  readonly forward: CutThroughForward;
  /** True once the next hop holds it; false if the forward failed (the log then goes from the spool). */
  readonly outcome: Promise<boolean>;
  /** The outcome is known. */
  settled: boolean;
}

/**
 * Cut-through forwards one disk may have under way: the next hop takes up
 * to three uploads of a disk at once (log-receiver.ts), and a log forwarded
 * from the spool may be one of them.
 */
const CUT_THROUGH_MAX_LOGS = 2;

/**
 * Cut-through forwards under way on the whole process server, all disks
 * together: each may keep up to CUT_THROUGH_MAX_QUEUED_BYTES in memory, so
 * this bounds what they hold at 256 MiB however many disks it serves.
 */
const CUT_THROUGH_MAX_LOGS_PER_HOP = 4;

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
  private stopping = false;

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
    this.stopping = true;
    for (const d of this.forwarded.values()) for (const c of d.cutThroughs.values()) c.forward.abandon('the process server is stopping');
    await Promise.all([...this.forwarded.values()].flatMap((d) => [...d.cutThroughs.values()].map((c) => c.outcome)));
    await Promise.all([...this.forwarded.values()].map(async (d) => {
      await d.drain.stop();
      await d.pipeline.stop();
    }));
    await super.stop();
  }

  override diskStatus(): DiskApplyStatus[] {
    const local = super.diskStatus();
    const forwarded = [...this.forwarded.values()].map((d) => {
      this.reportInHand(d.diskId, 'forward', d.drain, d.health);
      this.metrics.health.set({ disk: d.diskId }, HEALTH_GAUGE_VALUE[d.health.state]);
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

  /** Logs of a forwarded disk that went to the master target while they arrived, answered there (cutThrough). */
  cutThroughLogsTotal(diskId: string): number {
    return this.forwarded.get(diskId)?.cutThroughLogsTotal ?? 0;
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
    const health = this.newDiskHealth(diskId);
    const disk: ForwardedDisk = {
      diskId,
      health,
      forwardedBytesTotal: 0,
      established: false,
      lastStartedSeq: undefined,
      cutThroughs: new Map(),
      cutThroughLogsTotal: 0,
      uploadsInFlight: 0,
      pipeline: new UploadPipeline<SpoolEntry>({
        key: (entry) => entry.envelope.seq,
        send: (entry, onBodySent) => this.forwardOne(disk, entry, onBodySent),
        next: async (entry) => {
          const next = this.spool.list(diskId).find((e) => e.envelope.seq > entry.envelope.seq);
          return next === undefined || disk.drain.holds(next) ? undefined : next;
        },
        goesAlone: (entry) => entry.envelope.resync === true,
        // By content, not identity: list() gives the same entry objects, but a
        // log taken again under its number (lost ledger) is a new one to send.
        sameItem: (ahead, entry) => ahead.envelope.xxhash64 === entry.envelope.xxhash64,
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
    const { seq, xxhash64 } = entry.envelope;
    // Forwards of older logs are settled (the drain goes in order): forget them.
    for (const older of disk.cutThroughs.keys()) if (older < seq) disk.cutThroughs.delete(older);
    const cut = disk.cutThroughs.get(seq);
    if (cut !== undefined) {
      disk.cutThroughs.delete(seq);
      // Still waiting for the log before it, which is settled now: it goes from the spool instead.
      if (!cut.forward.isStarted) cut.forward.abandon('the spool forwards it');
      if (cut.xxhash64 === xxhash64 && cut.forward.isStarted) {
        if (await cut.forward.bodySent) onBodySent();
        // Held by the next hop already: nothing to send (its stage events went out as it happened).
        if (await cut.outcome) return;
      }
    }
    this.reportStage('forward', 'start', entry);
    disk.uploadsInFlight++;
    try {
      await sendLog(forward.peer, entry.envelope, entry.file, {
        lz4: true,
        limiter: this.limiter,
        onStarted: () => this.forwardStarted(disk, seq),
        onBodySent,
      });
      disk.established = true;
    } catch (err) {
      disk.established = false;
      if (isBlockrelayError(err) && err.code === 'BR_SEQ_GAP') {
        // Critical, not a retry: this hop is the disk's only sender to the
        // master target, sends oldest first and deletes a log only once the
        // master target answered for it. So a master target that expects an
        // older log lost state it had confirmed (restored, rolled back), and
        // the log it wants is no longer here nor at the source (which this
        // hop acknowledged): waiting would stall the disk silently for good;
        // a resync is what brings it back. This also holds for a resync log
        // that names the log it follows: it goes alone, once everything
        // before it was answered (goesAlone above), so it is refused only
        // after the same loss. The source, by contrast, retries such a
        // refusal (log-shipper.ts): for it the log may still be on its way.
        // An upload started ahead (upload-pipeline.ts) that gets a gap
        // because the one before it failed ends here too; the pipeline
        // drops that outcome and sends the log again in turn.
        throw new BlockrelayError('BR_DISK_CRITICAL', `master target expects log ${String(err.details.expectedSeq)} of disk ${disk.diskId}, which this process server no longer holds; the disk needs a resync`, { cause: err });
      }
      throw err;
    } finally {
      disk.uploadsInFlight--;
      this.beginWaitingCutThrough(disk);
    }
    disk.forwardedBytesTotal += entry.sizeBytes;
    this.metrics.shippedBytesTotal.inc({ disk: disk.diskId, hop: 'process-server' }, entry.sizeBytes);
    this.reportStage('forward', 'done', entry);
  }

  /** The upload route passes each log it takes on to the next hop as it arrives, when it may (cutThrough). */
  protected override routes(): Route[] {
    const uploadPattern = `/${PROTOCOL_VERSION}/disks/:disk/logs/:seq`;
    return super.routes().map((route) => (route.method === 'PUT' && route.pattern === uploadPattern
      ? {
          ...route,
          handler: (ctx: RouteContext) => {
            this.cutThrough(ctx);
            return route.handler(ctx);
          },
        }
      : route));
  }

  /**
   * Starts forwarding an arriving log to the master target at once, beside
   * its receipt here (cut-through-forward.ts), so a log's latency is about
   * the longer of the two hops rather than their sum. Only where the
   * forward from the spool would send this log next anyway: the disk is
   * forwarded (not applied here), the link is not paced (a paced link
   * would hold the upload back), the master target answered this hop's last
   * upload of the disk (so it holds the disk's sequence: it refuses this
   * log as a gap, never takes it as a first log, if the one before fails),
   * the upload of the log before began (else this one waits for it), the
   * disk is not held by a resync session, retrying or stopped, and the log
   * is not a resend of one held here. Anything else, and any failure of
   * the forward, leaves the log to the spool's forwarder, which skips a log
   * the master target already answered for.
   */
  private cutThrough(ctx: RouteContext): void {
    if (this.forward === undefined || this.forward.cutThrough !== true || this.limiter !== undefined || this.stopping) return;
    try {
      const diskId = ctx.params.disk!;
      const disk = this.forwarded.get(diskId);
      if (disk === undefined || super.acceptsDisk(diskId) || ctx.req.headers[HEADER.encoding] !== undefined) return;
      const envelope = parseEnvelope(diskId, ctx.params.seq!, ctx.req.headers);
      const { seq } = envelope;
      // A resync log goes only once the log before it is answered (upload-pipeline.ts, goesAlone).
      if (envelope.resync === true) return;
      if (!disk.established || disk.cutThroughs.has(seq)) return;
      // Only the log just before may still be waiting to go on: behind a
      // backlog the log would wait anyway, its bytes held in memory for
      // nothing (and the spool's forwarder sends it as well as this would).
      if (disk.lastStartedSeq === undefined || seq - disk.lastStartedSeq > 2) return;
      if ([...disk.cutThroughs.values()].filter((c) => !c.settled).length >= CUT_THROUGH_MAX_LOGS) return;
      if ([...this.forwarded.values()].flatMap((d) => [...d.cutThroughs.values()]).filter((c) => !c.settled).length >= CUT_THROUGH_MAX_LOGS_PER_HOP) return;
      if (disk.drain.state !== 'idle' && disk.drain.state !== 'busy') return;
      const nextSeq = this.ledger.get(diskId).nextSeq;
      if ((nextSeq !== null && seq < nextSeq) || this.spool.get(diskId, seq) !== undefined) return;
      const pseudoEntry: SpoolEntry = { envelope, file: '', sizeBytes: envelope.logLength };
      if (disk.drain.holds(pseudoEntry)) return;
      // The master target takes this log behind the one before it once that
      // one's upload began there (the receiver streams up to three of a
      // disk side by side; if that one fails it discards this one too). It
      // began, or is this hop's to begin next: the log before it arrived
      // whole (the source sends a log once the body before it is out) and
      // is being made durable here, then forwarded first thing.
      const forward = new CutThroughForward({ peer: this.forward.peer, envelope, incoming: ctx.req, response: ctx.res, deferStart: true });
      this.reportStage('forward', 'start', pseudoEntry);
      const outcome = forward.result.then(
        () => {
          cut.settled = true;
          disk.established = true;
          disk.cutThroughLogsTotal++;
          disk.forwardedBytesTotal += envelope.logLength;
          this.metrics.shippedBytesTotal.inc({ disk: diskId, hop: 'process-server' }, envelope.logLength);
          this.reportStage('forward', 'done', pseudoEntry);
          return true;
        },
        (err: unknown) => {
          cut.settled = true;
          disk.established = false;
          this.logger.debug({ disk: diskId, seq, err }, `cut-through of log ${seq} failed; it goes from the spool`);
          return false;
        },
      ).finally(() => {
        if (forward.isStarted) disk.uploadsInFlight--;
        this.beginWaitingCutThrough(disk);
      });
      const cut: CutThrough = { xxhash64: envelope.xxhash64, forward, outcome, settled: false };
      disk.cutThroughs.set(seq, cut);
      this.beginCutThrough(disk, seq);
    } catch {
      // A malformed upload: the receiver refuses it with its own coded error.
    }
  }

  /** The upload of `seq` to the master target began: a cut-through of the log after it, waiting for that, may begin now. */
  private forwardStarted(disk: ForwardedDisk, seq: number): void {
    disk.lastStartedSeq = seq;
    this.beginCutThrough(disk, seq + 1);
  }

  /** Begins the cut-through of `seq` if it waits, the upload of the log before it began, and the master target takes one more upload. */
  private beginCutThrough(disk: ForwardedDisk, seq: number): void {
    const waiting = disk.cutThroughs.get(seq);
    if (waiting === undefined || waiting.forward.isStarted || waiting.forward.isAbandoned) return;
    if (disk.lastStartedSeq !== seq - 1 || disk.uploadsInFlight >= RECEIVER_MAX_IN_FLIGHT) return;
    disk.uploadsInFlight++;
    waiting.forward.start();
    this.forwardStarted(disk, seq);
  }

  /** An upload of the disk ended: a cut-through waiting for room begins. */
  private beginWaitingCutThrough(disk: ForwardedDisk): void {
    if (disk.lastStartedSeq !== undefined) this.beginCutThrough(disk, disk.lastStartedSeq + 1);
  }
}

/** `blockrelay process-server --config FILE`; `forwardExtra.cutThrough` turns the cut-through on (ForwardOptions). */
export function processServerFromConfig(config: BlockrelayConfig, logOps: LogOps, extra: Partial<ApplyingHopOptions> = {}, forwardExtra: Pick<ForwardOptions, 'cutThrough'> = {}): ProcessServer {
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
      applyStallSeconds: config.applyStallSeconds,
      logOps,
      hopName: 'process-server',
      ...extra,
    },
    new Map(config.disks.map((d) => [d.id, d.target])),
    config.forward === undefined
      ? undefined
      : { peer: { url: config.forward.url, secret: config.forward.secret, timeoutMs: config.forward.timeoutSeconds * 1000, ca: readCaFile(config.forward.caFile) }, bandwidthBytesPerSecond: config.forward.bandwidthBytesPerSecond, cutThrough: config.forward.cutThrough, ...forwardExtra },
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
