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
 * - `skipped`: inclusive ranges of sequence numbers a resync log was
 *   admitted past (logs the source folded into its resync data): such a log
 *   arriving late is a duplicate whose writes the resync carries.
 * - `knownFrom`: the lowest sequence from which `recent` and `skipped`
 *   account for every number below `nextSeq`; a log below it is older than
 *   this ledger remembers.
 * - `startSeq`: the first log this ledger ever took (null: none yet, or a
 *   version 1 ledger that did not keep it). Nothing below it was accepted
 *   here, so a log below it is never a duplicate.
 */
export interface DiskLedger {
  readonly version: 2;
  nextSeq: number | null;
  appliedSeq: number | null;
  recent: Array<[number, string]>;
  skipped: Array<[number, number]>;
  knownFrom: number | null;
  startSeq: number | null;
}

/** How many accepted logs' hashes each disk remembers. */
export const LEDGER_RECENT_MAX = 256;

/** How many skipped (folded) ranges each disk remembers; older ones raise `knownFrom` past them. */
export const LEDGER_SKIPPED_MAX = 64;

export type Admission =
  | { readonly kind: 'accept' }
  /** Already accepted here; `folded` when the number lies in a range a resync log skipped. */
  | { readonly kind: 'duplicate'; readonly folded?: true };

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
    let ledger: DiskLedger = { version: 2, nextSeq: null, appliedSeq: null, recent: [], skipped: [], knownFrom: null, startSeq: null };
    if (fs.existsSync(file)) {
      let text: string;
      try {
        text = fs.readFileSync(file, 'utf8');
      } catch (err) {
        throw new BlockrelayError('BR_IO', `cannot read sequence ledger ${file}: ${(err as Error).message}`, { cause: err, details: { file } });
      }
      ledger = parseLedger(text, file);
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
   * accept it (its turn), call it a duplicate (already accepted, same log,
   * or folded), or refuse it as a gap (ahead of its turn), a conflict (a
   * different log under a number already used) or unknown (below its turn
   * but neither accepted nor skipped here).
   *
   * A resync log may come ahead of its turn: the source folded the logs
   * between (after an overflow) and the resync log carries their extents.
   * It names the log it follows (`follows`), and is admitted past the gap
   * only once everything up to that one is (`nextSeq > follows`); before
   * that it is a gap like any other, which the sender retries. A resync log
   * without `follows` (an older sender or spool file) is admitted past any
   * gap, as before this field existed: only the sender's ordering
   * (UploadPipeline.goesAlone) then keeps it behind its predecessor.
   */
  admit(diskId: string, seq: number, xxhash64: string, resync = false, follows?: number): Admission {
    const ledger = this.get(diskId);
    if (ledger.nextSeq === null || seq === ledger.nextSeq) return { kind: 'accept' };
    if (seq > ledger.nextSeq) {
      if (resync && (follows === undefined || follows < ledger.nextSeq)) return { kind: 'accept' };
      const why = resync ? ` (resync log following ${String(follows)})` : '';
      throw new BlockrelayError('BR_SEQ_GAP', `disk ${diskId}: log ${seq} arrived${why}, expected ${ledger.nextSeq}`, { details: { expectedSeq: ledger.nextSeq } });
    }
    const seen = ledger.recent.find(([s]) => s === seq);
    if (seen !== undefined && seen[1] !== xxhash64) {
      throw new BlockrelayError('BR_SEQ_CONFLICT', `disk ${diskId}: log ${seq} was already accepted with hash ${seen[1]}, this one hashes to ${xxhash64}`, { details: { expectedSeq: ledger.nextSeq } });
    }
    if (seen !== undefined) return { kind: 'duplicate' };
    if (ledger.skipped.some(([from, to]) => seq >= from && seq <= to)) return { kind: 'duplicate', folded: true };
    if (ledger.startSeq !== null && seq < ledger.startSeq) {
      // The disk's first log here was taken as its start; one before it overtook it on the way and cannot be applied after it.
      throw new BlockrelayError('BR_SEQ_UNKNOWN', `disk ${diskId}: log ${seq} comes before log ${ledger.startSeq}, the first this receiver took for the disk`, { details: { expectedSeq: ledger.nextSeq, seq, startSeq: ledger.startSeq } });
    }
    if (ledger.knownFrom === null || seq < ledger.knownFrom) return { kind: 'duplicate' };
    throw new BlockrelayError('BR_SEQ_UNKNOWN', `disk ${diskId}: log ${seq} is below the next expected ${ledger.nextSeq} but was neither accepted nor skipped by a resync log here`, { details: { expectedSeq: ledger.nextSeq, seq } });
  }

  /**
   * Records log `seq` as accepted, in memory: the spool holding the log
   * durably is the record until the log leaves it, and `reconcile` (the
   * receiver's start) rebuilds `nextSeq`, `recent` and `skipped` from the
   * spool. The ledger must be saved (`persist`) before a log leaves the
   * spool (it is forwarded), and is saved whenever a log is applied.
   */
  accepted(diskId: string, seq: number, xxhash64: string): void {
    const ledger = this.get(diskId);
    advance(ledger, seq);
    remember(ledger, seq, xxhash64);
    this.unsaved.add(diskId);
  }

  /**
   * Brings the ledger up to the logs a spool holds (in sequence order),
   * after a restart: logs are accepted into the spool without saving the
   * ledger. Those above `nextSeq` are taken as accepted again, in order, so
   * a spooled resync log's skipped range is recorded again; every one's
   * hash joins `recent`.
   */
  recallSpooled(diskId: string, spooled: ReadonlyArray<{ readonly seq: number; readonly xxhash64: string }>): void {
    const ledger = this.get(diskId);
    for (const { seq, xxhash64 } of [...spooled].sort((a, b) => a.seq - b.seq)) {
      if (ledger.recent.some(([s]) => s === seq)) continue;
      if (ledger.nextSeq === null || seq >= ledger.nextSeq) advance(ledger, seq);
      remember(ledger, seq, xxhash64);
      this.unsaved.add(diskId);
    }
    ledger.recent.sort((a, b) => a[0] - b[0]);
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
    if (ledger.nextSeq === null || ledger.nextSeq <= seq) advance(ledger, seq);
    if (xxhash64 !== undefined && !ledger.recent.some(([s]) => s === seq)) remember(ledger, seq, xxhash64);
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

/** Moves `nextSeq` past `seq`, recording the numbers it skips (a resync log admitted past a gap). */
function advance(ledger: DiskLedger, seq: number): void {
  if (ledger.nextSeq !== null && seq > ledger.nextSeq) ledger.skipped.push([ledger.nextSeq, seq - 1]);
  if (ledger.knownFrom === null) ledger.knownFrom = seq;
  if (ledger.nextSeq === null) ledger.startSeq = seq;
  ledger.nextSeq = seq + 1;
  if (ledger.skipped.length > LEDGER_SKIPPED_MAX) {
    const dropped = ledger.skipped.splice(0, ledger.skipped.length - LEDGER_SKIPPED_MAX);
    ledger.knownFrom = Math.max(ledger.knownFrom, dropped[dropped.length - 1]![1] + 1);
  }
}

/** Keeps `seq`'s hash among the newest; what falls out of the window raises `knownFrom`. */
function remember(ledger: DiskLedger, seq: number, xxhash64: string): void {
  ledger.recent.push([seq, xxhash64]);
  if (ledger.recent.length > LEDGER_RECENT_MAX) {
    const dropped = ledger.recent.splice(0, ledger.recent.length - LEDGER_RECENT_MAX);
    const past = Math.max(...dropped.map(([s]) => s)) + 1;
    ledger.knownFrom = Math.max(ledger.knownFrom ?? past, past);
  }
  const from = ledger.knownFrom ?? 0;
  if (ledger.skipped.length > 0 && ledger.skipped[0]![1] < from) ledger.skipped = ledger.skipped.filter(([, to]) => to >= from);
}

/**
 * Reads a ledger file. Version 1 (before `skipped`) reads as version 2 that
 * remembers nothing below its `nextSeq`: older numbers are judged as before
 * (a duplicate), since the ranges its resync logs skipped were not kept.
 */
export function parseLedger(text: string, file: string): DiskLedger {
  const bad = (why: string, cause?: unknown): never => {
    throw new BlockrelayError('BR_APPLY_STATE_CORRUPT', `sequence ledger ${file} is unreadable: ${why}`, { ...(cause === undefined ? {} : { cause }), details: { file } });
  };
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    return bad((err as Error).message, err);
  }
  const o = raw as Record<string, unknown>;
  const seqOrNull = (v: unknown): v is number | null => v === null || (Number.isSafeInteger(v) && (v as number) >= 0);
  if (typeof raw !== 'object' || raw === null) return bad('not an object');
  if (o.version !== 1 && o.version !== 2) return bad(`unknown version ${String(o.version)}`);
  if (!seqOrNull(o.nextSeq) || !seqOrNull(o.appliedSeq)) return bad('nextSeq and appliedSeq must be sequence numbers or null');
  if (!Array.isArray(o.recent) || !o.recent.every((e) => Array.isArray(e) && Number.isSafeInteger(e[0]) && typeof e[1] === 'string')) return bad('recent must list [seq, hash] pairs');
  const recent = o.recent as Array<[number, string]>;
  if (o.version === 1) return { version: 2, nextSeq: o.nextSeq, appliedSeq: o.appliedSeq, recent, skipped: [], knownFrom: o.nextSeq, startSeq: null };
  if (!Array.isArray(o.skipped) || !o.skipped.every((e) => Array.isArray(e) && Number.isSafeInteger(e[0]) && Number.isSafeInteger(e[1]) && e[0] <= e[1])) return bad('skipped must list [from, to] ranges');
  // startSeq came a little after version 2 itself: absent reads as unknown (null), as in a version 1 file.
  const startSeq = o.startSeq === undefined ? null : o.startSeq;
  if (!seqOrNull(o.knownFrom) || !seqOrNull(startSeq)) return bad('knownFrom and startSeq must be sequence numbers or null');
  return { version: 2, nextSeq: o.nextSeq, appliedSeq: o.appliedSeq, recent, skipped: o.skipped as Array<[number, number]>, knownFrom: o.knownFrom, startSeq };
}
