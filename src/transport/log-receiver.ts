import type { Logger } from '../daemon/logger';
import type { Metrics } from '../daemon/metrics';
import { KeyedLock } from '../platform/keyed-lock';
import { BlockrelayError } from '../retry/blockrelay-error';
import { sendJson, type Route } from './http-api';
import type { LogSpool, SpoolEntry } from './log-spool';
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
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly hop: string;
}

export class LogReceiver {
  private readonly lock = new KeyedLock();

  constructor(private readonly options: LogReceiverOptions) {}

  /** Makes the ledger agree with a spool that may hold logs accepted just before a crash. */
  reconcile(): void {
    for (const diskId of this.options.spool.disks()) {
      const entries = this.options.spool.list(diskId);
      const newest = entries[entries.length - 1];
      const ledger = this.options.ledger.get(diskId);
      if (newest !== undefined && (ledger.nextSeq === null || ledger.nextSeq <= newest.envelope.seq)) {
        ledger.nextSeq = newest.envelope.seq + 1;
        if (!ledger.recent.some(([s]) => s === newest.envelope.seq)) ledger.recent.push([newest.envelope.seq, newest.envelope.xxhash64]);
      }
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

  private async receive(req: import('node:http').IncomingMessage, res: import('node:http').ServerResponse, diskParam: string, seqParam: string): Promise<void> {
    const diskId = validateDiskId(diskParam);
    if (!this.options.acceptsDisk(diskId)) throw new BlockrelayError('BR_DISK_UNKNOWN', `disk ${diskId} is not served here`);
    if (this.options.isCritical?.(diskId)) throw new BlockrelayError('BR_DISK_CRITICAL', `disk ${diskId} is stopped in state Critical; resume it first`);
    const envelope = parseEnvelope(diskId, seqParam, req.headers);
    const encoding = req.headers[HEADER.encoding];
    if (encoding !== undefined && encoding !== 'lz4') throw new BlockrelayError('BR_PROTOCOL', `unknown ${HEADER.encoding} '${String(encoding)}'`);
    await this.lock.run(diskId, async () => {
      const admission = this.options.ledger.admit(diskId, envelope.seq, envelope.xxhash64, envelope.resync === true);
      if (admission.kind === 'duplicate') {
        req.resume();
        await new Promise<void>((resolve) => {
          if (req.complete) resolve();
          else req.on('end', resolve).on('close', resolve);
        });
        sendJson(res, 200, { diskId, seq: envelope.seq, duplicate: true });
        return;
      }
      const entry = await this.options.spool.receive(envelope, req, { lz4: encoding === 'lz4', verify: this.options.verify });
      await this.options.ledger.accepted(diskId, envelope.seq, envelope.xxhash64);
      this.options.metrics.pendingBytes.set({ disk: diskId, hop: this.options.hop }, this.options.spool.pendingBytes(diskId));
      this.options.logger.debug({ disk: diskId, seq: envelope.seq, bytes: envelope.logLength }, 'log accepted');
      sendJson(res, 201, { diskId, seq: envelope.seq, durable: true });
      this.options.onAccepted(entry);
    });
  }
}
