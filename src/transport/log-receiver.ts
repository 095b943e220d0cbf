import type { Logger } from '../daemon/logger';
import type { Metrics } from '../daemon/metrics';
import { systemClock, type Clock, type TimerHandle } from '../platform/clock';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import { checkBoundedHolds } from './disk-drain';
import { sendJson, type Route } from './http-api';
import type { LogMemory } from './held-log';
import type { LogSpool, SpoolEntry, StagedLog } from './log-spool';
import type { SequenceLedger } from './sequence-ledger';
import { HEADER, parseEnvelope, PROTOCOL_VERSION, validateDiskId, type LogEnvelope } from './transport-protocol';

/**
 * The receiving half of the transport protocol, shared by the process server
 * and the master target: `PUT /v1/disks/:disk/logs/:seq` and
 * `GET /v1/disks/:disk`. A log is answered 201 only once it is verified,
 * durable in the spool and recorded in the ledger; a resend of a log already
 * held is answered 200 without storing it twice.
 */
export interface LogReceiverOptions {
  readonly spool: LogSpool;
  readonly ledger: SequenceLedger;
  /** Full verification of the stored log before it is accepted (e.g. [MS-HRL]). */
  readonly verify: (file: string, envelope: LogEnvelope) => Promise<void>;
  /** Refuses disks this hop does not serve (BR_DISK_UNKNOWN). */
  readonly acceptsDisk: (diskId: string) => boolean;
  /** Refuses disks stopped in Critical (BR_DISK_CRITICAL). */
  readonly isCritical?: (diskId: string) => boolean;
  readonly onAccepted: (entry: SpoolEntry) => void;
  /**
   * Apply on receipt (master target): called with a verified log that is
   * next in sequence, before anything is answered, while the disk's spool
   * holds nothing for it. Resolves true once the log is applied and recorded
   * (the answer is then 201 and nothing is spooled), false when the disk
   * cannot take it now; throws when applying failed. Either way but true,
   * the log is spooled durably and handled as usual.
   */
  readonly applyOnReceive?: (entry: SpoolEntry) => Promise<boolean>;
  /**
   * A log to be applied on receipt is held in memory from this budget when
   * it fits (held-log.ts): verified and applied from there, and written to a
   * file only if it is spooled after all.
   */
  readonly memory?: LogMemory;
  /** Paces the interim answers sent while a log is applied on receipt (default: the system clock). */
  readonly clock?: Clock;
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly hop: string;
}

export class LogReceiver {
  private readonly inflight = new Map<string, InFlight>();
  private readonly inflightCount = new Map<string, number>();

  constructor(private readonly options: LogReceiverOptions) {}

  /**
   * Makes the ledger agree with the spool: logs are accepted into the
   * spool without saving the ledger (SequenceLedger.accepted), so after a
   * restart the spool says which logs were accepted last.
   */
  reconcile(): void {
    for (const diskId of this.options.spool.disks()) {
      this.options.ledger.recallSpooled(diskId, this.options.spool.list(diskId).map((e) => e.envelope));
    }
  }

  /**
   * Applies a staged log on receipt; false when it was not applied (it is
   * spooled then). Meanwhile an interim `102 Processing` goes out every
   * APPLY_ON_RECEIVE_KEEPALIVE_MS: the sender gives up on a request that
   * shows no progress for a minute (`forward.timeoutSeconds`), and a large
   * log on a slow target can take longer to apply than that.
   */
  private async applyNow(staged: StagedLog, res: import('node:http').ServerResponse): Promise<boolean> {
    const { envelope } = staged;
    const clock = this.options.clock ?? systemClock;
    let timer: TimerHandle | undefined;
    const keepAlive = (): void => {
      timer = clock.setTimer(() => {
        if (!res.headersSent && !res.destroyed) res.writeProcessing();
        keepAlive();
      }, APPLY_ON_RECEIVE_KEEPALIVE_MS);
    };
    keepAlive();
    try {
      return await this.options.applyOnReceive!({ envelope, file: staged.file, sizeBytes: envelope.logLength });
    } catch (err) {
      // The spool's path retries it under the policy (and finishes it if it was applied in part).
      this.options.logger.warn({ disk: envelope.diskId, seq: envelope.seq, code: (err as BlockrelayError).code }, `applying log ${envelope.seq} on receipt failed; it is spooled and retried: ${(err as Error).message}`);
      return false;
    } finally {
      timer?.cancel();
    }
  }

  routes(): Route[] {
    return [
      { method: 'PUT', pattern: `/${PROTOCOL_VERSION}/disks/:disk/logs/:seq`, handler: (ctx) => this.receive(ctx.req, ctx.res, ctx.params.disk!, ctx.params.seq!) },
      {
        method: 'GET',
        pattern: `/${PROTOCOL_VERSION}/disks/:disk`,
        handler: async (ctx) => {
          const diskId = validateDiskId(ctx.params.disk!);
          if (!this.options.acceptsDisk(diskId)) throw new BlockrelayError('BR_DISK_UNKNOWN', `disk ${diskId} is not served here`);
          const ledger = this.options.ledger.get(diskId);
          sendJson(ctx.res, 200, { diskId, nextSeq: ledger.nextSeq, appliedSeq: ledger.appliedSeq, pendingBytes: this.options.spool.pendingBytes(diskId) });
        },
      },
    ];
  }

  /**
   * Uploads of one disk are pipelined: the next log in sequence may stream
   * in, be hashed, fsynced and verified while the one before it is still
   * being made durable, but logs become visible and are recorded in the
   * ledger strictly in order, each only after the one before it was. If a
   * log fails, the logs staged behind it are discarded (the sender resends
   * them after it). At most RECEIVER_MAX_IN_FLIGHT uploads per disk are
   * taken up; more are refused as busy (BR_PEER_BUSY, recoverable).
   */
  private async receive(req: import('node:http').IncomingMessage, res: import('node:http').ServerResponse, diskParam: string, seqParam: string): Promise<void> {
    const diskId = validateDiskId(diskParam);
    if (!this.options.acceptsDisk(diskId)) throw new BlockrelayError('BR_DISK_UNKNOWN', `disk ${diskId} is not served here`);
    if (this.options.isCritical?.(diskId)) throw new BlockrelayError('BR_DISK_CRITICAL', `disk ${diskId} is stopped in state Critical; resume it first`);
    const envelope = parseEnvelope(diskId, seqParam, req.headers);
    const encoding = req.headers[HEADER.encoding];
    if (encoding !== undefined && encoding !== 'lz4') throw new BlockrelayError('BR_PROTOCOL', `unknown ${HEADER.encoding} '${String(encoding)}'`);
    const { seq } = envelope;
    const resync = envelope.resync === true;

    // Admission. A resend of a log still in flight here waits for it to
    // settle, then is judged against the ledger (a duplicate once accepted).
    let chain = this.inflight.get(diskId);
    while (chain !== undefined && seq < chain.tailSeq && seq >= (this.options.ledger.get(diskId).nextSeq ?? 0)) {
      await chain.settled;
      chain = this.inflight.get(diskId);
    }
    const ledger = this.options.ledger.get(diskId);
    if (chain === undefined || seq < (ledger.nextSeq ?? 0)) {
      const admission = this.options.ledger.admit(diskId, seq, envelope.xxhash64, resync, envelope.follows);
      if (admission.kind === 'duplicate') {
        req.resume();
        await new Promise<void>((resolve) => {
          if (req.complete) resolve();
          else req.on('end', resolve).on('close', resolve);
        });
        sendJson(res, 200, { diskId, seq, duplicate: true, ...(admission.folded === true ? { folded: true } : {}) });
        return;
      }
    } else if (seq > chain.tailSeq && (!resync || (envelope.follows !== undefined && envelope.follows >= chain.tailSeq))) {
      // Ahead of the uploads in flight; a resync log too when the log it follows is not among them.
      throw new BlockrelayError('BR_SEQ_GAP', `disk ${diskId}: log ${seq} arrived, expected ${chain.tailSeq}`, { details: { expectedSeq: chain.tailSeq } });
    } else if ((this.inflightCount.get(diskId) ?? 0) >= RECEIVER_MAX_IN_FLIGHT) {
      throw new BlockrelayError('BR_PEER_BUSY', `disk ${diskId}: ${RECEIVER_MAX_IN_FLIGHT} uploads are in flight; resend log ${seq} later`);
    }

    // Taken up: the next log in sequence may follow this one.
    const before = chain?.settled ?? Promise.resolve(true);
    let settle!: (accepted: boolean) => void;
    const mine: InFlight = { tailSeq: seq + 1, settled: new Promise<boolean>((resolve) => { settle = resolve; }) };
    this.inflight.set(diskId, mine);
    this.inflightCount.set(diskId, (this.inflightCount.get(diskId) ?? 0) + 1);
    let accepted = false;
    try {
      // Applied on receipt, a log is never spooled: it is not fsynced while staged (commit() does it if it is spooled after all).
      const direct = this.options.applyOnReceive !== undefined && envelope.logLength <= APPLY_ON_RECEIVE_MAX_LOG_BYTES && this.options.spool.list(diskId).length === 0;
      const staged = await this.options.spool.stage(envelope, req, { lz4: encoding === 'lz4', verify: this.options.verify, durable: !direct, ...(direct && this.options.memory !== undefined ? { memory: this.options.memory } : {}) }).catch((err: unknown) => {
        // Refused for want of room: a resync session's held logs yield it (the log finds room when sent again).
        if (isBlockrelayError(err) && err.code === 'BR_SPOOL_FULL') checkBoundedHolds(this.options.spool, undefined, envelope.logLength);
        throw err;
      });
      if (!(await before)) {
        await staged.discard();
        throw new BlockrelayError('BR_PEER_BUSY', `disk ${diskId}: the log before ${seq} was not accepted; resend from it`);
      }
      let entry: SpoolEntry;
      try {
        // Everything before this log is settled: the ledger alone decides now.
        const admission = this.options.ledger.admit(diskId, seq, envelope.xxhash64, resync, envelope.follows);
        if (admission.kind === 'duplicate') {
          await staged.discard();
          sendJson(res, 200, { diskId, seq, duplicate: true, ...(admission.folded === true ? { folded: true } : {}) });
          accepted = true;
          return;
        }
        if (direct && (await this.applyNow(staged, res))) {
          await staged.discard();
          accepted = true;
          this.options.logger.debug({ disk: diskId, seq, bytes: envelope.logLength }, 'log applied on receipt');
          sendJson(res, 201, { diskId, seq, durable: true, applied: true });
          return;
        }
        entry = await staged.commit();
      } catch (err) {
        await staged.discard();
        throw err;
      }
      this.options.ledger.accepted(diskId, seq, envelope.xxhash64);
      accepted = true;
      this.options.metrics.pendingBytes.set({ disk: diskId, hop: this.options.hop }, this.options.spool.pendingBytes(diskId));
      this.options.logger.debug({ disk: diskId, seq, bytes: envelope.logLength }, 'log accepted');
      sendJson(res, 201, { diskId, seq, durable: true });
      this.options.onAccepted(entry);
    } finally {
      settle(accepted);
      this.inflightCount.set(diskId, this.inflightCount.get(diskId)! - 1);
      if (this.inflight.get(diskId) === mine) this.inflight.delete(diskId);
    }
  }
}

/**
 * Larger logs are spooled before they are applied: the sender waits for the
 * answer to a log applied on receipt, the whole apply long.
 */
export const APPLY_ON_RECEIVE_MAX_LOG_BYTES = 1024 * 1024 * 1024;

/** Interim answers (102) while a log is applied on receipt come this often, well inside the sender's minute without progress. */
export const APPLY_ON_RECEIVE_KEEPALIVE_MS = 15_000;

/** Uploads one disk may have in flight on a receiver: one being made durable, one streaming behind it, one queued. */
export const RECEIVER_MAX_IN_FLIGHT = 3;

/** The newest upload in flight for a disk. */
interface InFlight {
  /** The sequence number the next log in order would carry. */
  readonly tailSeq: number;
  /** Resolves true once this log is accepted (durable, recorded), false if it failed. */
  readonly settled: Promise<boolean>;
}
