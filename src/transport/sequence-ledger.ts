import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { KeyedLock } from '../platform/keyed-lock';
import { BlockrelayError } from '../retry/blockrelay-error';
import { writeFileDurably } from '../platform/durable-file';
import { validateDiskId } from './transport-protocol';

/**
 * Per-disk sequence state of a receiving hop, persisted in
 * `STATE/disks/<disk>.json` (docs/formats/spool.md):
 * - `nextSeq`: the next log this hop accepts (null until the first log).
 * - `appliedSeq`: the newest log applied to the target (master target and
 *   Azure-side process server only).
 * - `recent`: hashes of the newest accepted logs, so a resend of one of them
 *   is recognised as a duplicate and a different log under a used number as
 *   a conflict.
 */
export interface DiskLedger {
  readonly version: 1;
  nextSeq: number | null;
  appliedSeq: number | null;
  recent: Array<[number, string]>;
}

/** How many accepted logs' hashes each disk remembers. */
export const LEDGER_RECENT_MAX = 256;

export type Admission =
  | { readonly kind: 'accept' }
  | { readonly kind: 'duplicate' };

export class SequenceLedger {
  private readonly cache = new Map<string, DiskLedger>();
  /** Saves of one disk's ledger run one after another, so the newest state is the one left on disk. */
  private readonly saving = new KeyedLock();
  /** Disks whose ledger changed in memory since it was last saved. */
  private readonly unsaved = new Set<string>();

  constructor(readonly stateDir: string) {}

  private file(diskId: string): string {
    return path.join(this.stateDir, 'disks', `${validateDiskId(diskId)}.json`);
  }

  /** The disk's ledger, read from disk once and then kept in memory. */
  get(diskId: string): DiskLedger {
    const cached = this.cache.get(diskId);
    if (cached !== undefined) return cached;
    const file = this.file(diskId);
    let ledger: DiskLedger = { version: 1, nextSeq: null, appliedSeq: null, recent: [] };
    if (fs.existsSync(file)) {
      try {
        const parsed = JSON.parse(fs.readFileSync(file, 'utf8')) as DiskLedger;
        if (parsed.version !== 1 || !Array.isArray(parsed.recent)) throw new Error('unknown layout');
        ledger = parsed;
      } catch (err) {
        throw new BlockrelayError('BR_APPLY_STATE_CORRUPT', `sequence ledger ${file} is unreadable: ${(err as Error).message}`, { cause: err });
      }
    }
    this.cache.set(diskId, ledger);
    return ledger;
  }

  knownDisks(): string[] {
    const dir = path.join(this.stateDir, 'disks');
    if (!fs.existsSync(dir)) return [];
    return fs.readdirSync(dir).filter((n) => n.endsWith('.json')).map((n) => n.slice(0, -5));
  }

  /**
   * Decides what to do with log `seq` whose body hashes to `xxhash64`:
   * accept it (its turn), call it a duplicate (already accepted, same log),
   * or refuse it as a gap (ahead of its turn) or a conflict (a different log
   * under a number already used).
   *
   * A resync log may come ahead of its turn: the source folded the logs
   * between (after an overflow) and the resync log carries their extents.
   */
  admit(diskId: string, seq: number, xxhash64: string, resync = false): Admission {
    const ledger = this.get(diskId);
    if (ledger.nextSeq === null || seq === ledger.nextSeq) return { kind: 'accept' };
    if (seq > ledger.nextSeq && resync) return { kind: 'accept' };
    if (seq > ledger.nextSeq) {
      throw new BlockrelayError('BR_SEQ_GAP', `disk ${diskId}: log ${seq} arrived, expected ${ledger.nextSeq}`, { details: { expectedSeq: ledger.nextSeq } });
    }
    const seen = ledger.recent.find(([s]) => s === seq);
    if (seen !== undefined && seen[1] !== xxhash64) {
      throw new BlockrelayError('BR_SEQ_CONFLICT', `disk ${diskId}: log ${seq} was already accepted with hash ${seen[1]}, this one hashes to ${xxhash64}`, { details: { expectedSeq: ledger.nextSeq } });
    }
    return { kind: 'duplicate' };
  }

  /**
   * Records log `seq` as accepted, in memory: the spool holding the log
   * durably is the record until the log leaves it, and `reconcile` (the
   * receiver's start) rebuilds `nextSeq` and `recent` from the spool. The
   * ledger must be saved (`persist`) before a log leaves the spool (it is
   * forwarded), and is saved whenever a log is applied.
   */
  accepted(diskId: string, seq: number, xxhash64: string): void {
    const ledger = this.get(diskId);
    ledger.nextSeq = seq + 1;
    ledger.recent.push([seq, xxhash64]);
    if (ledger.recent.length > LEDGER_RECENT_MAX) ledger.recent.splice(0, ledger.recent.length - LEDGER_RECENT_MAX);
    this.unsaved.add(diskId);
  }

  /** Saves the disk's ledger if it changed since its last save. */
  async persist(diskId: string): Promise<void> {
    if (this.unsaved.has(diskId)) await this.save(diskId);
  }

  /**
   * Records log `seq` as applied to the target (after the target was
   * flushed). A log applied on receipt was never recorded as accepted: this
   * one save records both, its hash included (so a resend is a duplicate).
   */
  async applied(diskId: string, seq: number, xxhash64?: string): Promise<void> {
    const ledger = this.get(diskId);
    ledger.appliedSeq = seq;
    if (ledger.nextSeq === null || ledger.nextSeq <= seq) ledger.nextSeq = seq + 1;
    if (xxhash64 !== undefined && !ledger.recent.some(([s]) => s === seq)) {
      ledger.recent.push([seq, xxhash64]);
      if (ledger.recent.length > LEDGER_RECENT_MAX) ledger.recent.splice(0, ledger.recent.length - LEDGER_RECENT_MAX);
    }
    await this.save(diskId);
  }

  private async save(diskId: string): Promise<void> {
    const file = this.file(diskId);
    this.unsaved.delete(diskId);
    await this.saving.run(diskId, async () => {
      await fsp.mkdir(path.dirname(file), { recursive: true });
      await writeFileDurably(file, JSON.stringify(this.get(diskId)));
    });
  }
}
