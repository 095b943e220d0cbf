import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { syncDirectory, writeFileDurably } from '../platform/durable-file';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import type { Logger } from '../daemon/logger';
import type { DiskTarget, Extent } from '../targets/disk-target';
import { HrlLogFile, verifyHrlLog } from '../tracking/hrl-reader';
import { recoverHrlLog, scanUnsealedHrlLog } from '../tracking/hrl-recovery';
import { HrlWriter } from '../tracking/hrl-writer';
import { hrlLogOps } from '../transport/hrl-log-ops';
import type { SpoolEntry } from '../transport/log-spool';
import type { ApplyHooks } from '../transport/master-target';
import type { ResyncJournalProvider, ResyncSessionJournal } from '../transport/resync-route';
import { seqName } from '../transport/transport-protocol';
import { isSnapshotTarget } from './blob-snapshots';
import { RetentionHooks } from './retention-hooks';
import type { DiskHistory } from './retention-pruner';
import { appendTargetContent, coalesceExtents, createSegmentWriter, UNDO_READ_CHUNK_BYTES } from './undo-journal';
import { parseSlotMarker, RESYNC_MARKER_PATTERN, resyncMarkerName, type SlotMarker } from './retention-format';

/**
 * Retention across a networked resync session (docs/formats/undo-journal.md,
 * "Resync sessions").
 *
 * A session overwrites target blocks between two logs: after applied log A
 * and before log A+1. Its writes are journaled under sequence A+1, the slot
 * of the next log, so every reader of the journal keeps treating sequences
 * as consecutive and rolling back to any point <= A undoes them:
 *
 * 1. Session start: a `resync` point A+1 (never selectable) is recorded as
 *    applied, so the newest sequence readers undo from is A+1; until the
 *    session's pre-images are complete `A+1.undo.hrl` is missing and a
 *    rebuild fails loudly (BR_RETENTION_JOURNAL_MISSING) instead of reading
 *    a target the session is changing. A marker `resync-<A+1>.json` says
 *    `open`.
 * 2. Each write: the old content of every range not yet journaled in this
 *    slot is appended to `resync-<A+1>.session.hrl` and made durable
 *    (fdatasync) before the target is written.
 * 3. Session end: `A+1.undo.hrl` becomes the slot's earlier pre-images (a
 *    previous session in the same slot) followed by this session's, and
 *    the marker says `sealed`.
 * 4. When log A+1 itself arrives, before the retention hooks see it, its
 *    ranges not yet in the slot are read from the target and added, so
 *    `A+1.undo.hrl` restores exactly the content of point A. The retention
 *    hooks then find point A+1 recorded and its pre-image present.
 *
 * Ranges in one slot file are disjoint, and each holds the oldest content
 * since point A. A crash while a session is open leaves its marker `open`
 * and its session file unsealed; since every pre-image was flushed before
 * its write, the next start recovers the file's durable blocks (the torn
 * tail holds only ranges never written) and finishes the slot as step 3
 * does. Only when the file cannot be read back is the whole history of the
 * disk dropped, explicitly (BR_RESYNC_HISTORY_DROPPED in the hop's log),
 * never left to rebuild wrong. Page blobs keep their points as snapshots, which a
 * session does not change: nothing is journaled for them.
 */
export function resyncJournalFor(hooks: ApplyHooks | undefined): ResyncJournalProvider | undefined {
  if (!(hooks instanceof RetentionHooks)) return undefined;
  // One provider per hooks: it caches the slot markers it writes, so a
  // second instance over the same history would write markers the first
  // never sees (and skip a slot merge).
  let journal = JOURNALS.get(hooks);
  if (journal === undefined) {
    journal = new RetentionResyncJournal(hooks);
    JOURNALS.set(hooks, journal);
  }
  return journal;
}

const JOURNALS = new WeakMap<RetentionHooks, RetentionResyncJournal>();

/** Sorted disjoint extents, with subtraction and union. */
function subtract(range: Extent, covered: readonly Extent[]): Extent[] {
  const out: Extent[] = [];
  let at = range.offset;
  const end = range.offset + range.length;
  for (const c of covered) {
    if (c.offset + c.length <= at) continue;
    if (c.offset >= end) break;
    if (c.offset > at) out.push({ offset: at, length: c.offset - at });
    at = Math.max(at, c.offset + c.length);
    if (at >= end) break;
  }
  if (at < end) out.push({ offset: at, length: end - at });
  return out;
}

/** Ranges of a sealed undo file, in entry order. */
async function rangesOfFile(file: string): Promise<Extent[]> {
  if (!fs.existsSync(file)) return [];
  return hrlLogOps.ranges(file);
}

/** Copies every entry of a sealed log into `writer`. */
async function copyEntries(file: string, writer: HrlWriter): Promise<void> {
  const log = await HrlLogFile.open(file);
  try {
    const verified = await log.verify({ checkPayloads: true });
    for await (const e of log.entries(verified)) {
      for (let done = 0; done < e.dataLength; ) {
        const n = Math.min(UNDO_READ_CHUNK_BYTES, e.dataLength - done);
        await writer.append(e.byteOffset + done, await log.readPayload(e, done, n));
        done += n;
      }
    }
  } finally {
    await log.close();
  }
}


class RetentionResyncJournal implements ResyncJournalProvider {
  /** Slot markers per disk: read from the journal directory once, then kept here (only this class writes them). */
  private readonly known = new Map<string, Map<number, SlotMarker>>();

  /** The hop's logger (the hooks' own may be absent or silent): a dropped history is always told. */
  private logger: Logger | undefined;

  constructor(private readonly hooks: RetentionHooks) {}

  attachLogger(logger: Logger): void {
    this.logger = logger;
  }

  private markerFile(h: DiskHistory, seq: number): string {
    return path.join(h.journal.dir, resyncMarkerName(seq));
  }

  private sessionFile(h: DiskHistory, seq: number): string {
    return path.join(h.journal.dir, `resync-${seqName(seq)}.session.hrl`);
  }

  private async markers(h: DiskHistory): Promise<SlotMarker[]> {
    let known = this.known.get(h.diskId);
    if (known === undefined) {
      known = new Map((await this.scanMarkers(h)).map((m) => [m.seq, m]));
      this.known.set(h.diskId, known);
    }
    return [...known.values()];
  }

  private async scanMarkers(h: DiskHistory): Promise<SlotMarker[]> {
    if (!fs.existsSync(h.journal.dir)) return [];
    const out: SlotMarker[] = [];
    for (const name of await fsp.readdir(h.journal.dir)) {
      const named = RESYNC_MARKER_PATTERN.exec(name);
      if (named === null) continue;
      const text = await fsp.readFile(path.join(h.journal.dir, name), 'utf8').catch(() => undefined);
      out.push(parseSlotMarker(text, Number(named[1])));
    }
    return out;
  }

  private async writeMarker(h: DiskHistory, marker: SlotMarker): Promise<void> {
    await this.markers(h);
    await writeFileDurably(this.markerFile(h, marker.seq), JSON.stringify(marker));
    this.known.get(h.diskId)!.set(marker.seq, marker);
  }

  private async removeSlotFiles(h: DiskHistory, seq: number): Promise<void> {
    for (const suffix of ['.earlier', '.merged']) await fsp.rm(`${this.sessionFile(h, seq)}${suffix}`, { force: true });
    await fsp.rm(this.sessionFile(h, seq), { force: true });
    await fsp.rm(this.markerFile(h, seq), { force: true });
    await syncDirectory(h.journal.dir);
    this.known.get(h.diskId)?.delete(seq);
  }

  /**
   * A session did not finish (the hop stopped with it open): its writes'
   * pre-images may be incomplete, so no older point can be trusted. Every
   * point goes, explicitly, and the next log starts a new history.
   */
  async invalidate(h: DiskHistory, seq: number, why: string): Promise<void> {
    const lost = h.points.length;
    await h.dropOldestUnderPressure(h.points.length);
    await h.journal.remove(seq);
    await this.removeSlotFiles(h, seq);
    await h.bumpHistoryEpoch();
    h.journalBytes = await h.journal.allocatedBytes();
    const err = new BlockrelayError('BR_RESYNC_HISTORY_DROPPED', `dropped all ${lost} recovery point(s) of ${h.diskId}: ${why}; history starts again with the next log`, { details: { disk: h.diskId } });
    (this.logger ?? this.hooks.options.logger)?.warn({ disk: h.diskId, code: err.code }, err.message);
  }

  /**
   * Settles what an earlier session left. A session the hop stopped with
   * open (killed, crashed) is finished from its session file: every
   * pre-image was made durable (flushed) before its range was overwritten,
   * so the file's durable blocks hold the pre-image of every write that can
   * have reached the target, and the torn tail only ranges never written.
   * Only when that file cannot be read is the history dropped.
   */
  private async settle(h: DiskHistory, target: DiskTarget): Promise<SlotMarker | undefined> {
    let sealed: SlotMarker | undefined;
    for (const m of await this.markers(h)) {
      if (m.state !== 'open') sealed = m;
      else if (await this.salvage(h, m, target)) sealed = { ...m, state: 'sealed' };
      else await this.invalidate(h, m.seq, `resync session ${m.sessionId} was interrupted and its pre-images cannot be read back`);
    }
    return sealed;
  }

  /** Finishes an interrupted session's slot from the durable part of its session file; false if that cannot be done. */
  private async salvage(h: DiskHistory, m: SlotMarker, target: DiskTarget): Promise<boolean> {
    const file = this.sessionFile(h, m.seq);
    try {
      // No session file: the hop died while opening the session, before any pre-image, hence before any write.
      if (fs.existsSync(file)) {
        // An anchor block that did not survive would be "recovered" empty: that is no proof of no writes.
        const scan = await scanUnsealedHrlLog(file);
        if (scan.blocks.length === 0) return false;
        await recoverHrlLog(file);
      }
      await this.finishSession(h, m.seq, m.sessionId, target);
    } catch (err) {
      (this.logger ?? this.hooks.options.logger)?.warn({ disk: h.diskId, err }, `could not finish the interrupted resync session of slot ${m.seq} from its journal`);
      return false;
    }
    (this.logger ?? this.hooks.options.logger)?.warn({ disk: h.diskId, slot: m.seq, session: m.sessionId }, `resync session ${m.sessionId} of disk ${h.diskId} was interrupted; its journaled pre-images were recovered, so the older recovery points stay`);
    return true;
  }

  async openSession(diskId: string, target: DiskTarget, appliedSeq: number | null, sessionId: string): Promise<ResyncSessionJournal | undefined> {
    if (isSnapshotTarget(target)) return undefined;
    const h = await this.hooks.history(diskId);
    const slot = (appliedSeq ?? 0) + 1;
    const sealed = await this.settle(h, target);
    if (sealed !== undefined && sealed.seq !== slot) {
      // A log applied since that session but the marker stayed: its merge already happened or cannot.
      await this.removeSlotFiles(h, sealed.seq);
    }
    if (h.pending !== undefined) {
      // A log was recorded but not applied (a restart in between): its pre-image belongs before ours.
      await this.invalidate(h, slot, `log ${h.pending.seq} was recorded but not applied when a resync session started`);
    }
    // No history to keep: the session's writes need no pre-images.
    if (h.points.length === 0) return undefined;
    // A sealed session's leftovers (a crash after its marker was sealed): the
    // slot file holds all of it, and finishSession must not find them.
    const leftovers = [this.sessionFile(h, slot), `${this.sessionFile(h, slot)}.earlier`].filter((f) => fs.existsSync(f));
    if (leftovers.length > 0) {
      for (const f of leftovers) await fsp.rm(f, { force: true });
      await syncDirectory(h.journal.dir);
    }
    await this.writeMarker(h, { version: 1, seq: slot, state: 'open', sessionId });
    if (!h.points.some((p) => p.seq === slot)) {
      await h.append([{ v: 1, t: 'point', seq: slot, timeMs: this.hooks.clock.now(), kind: 'crash', cutId: `resync-${sessionId}`, resync: true, applied: true }]);
    }
    const slotFile = h.journal.file(slot);
    // Ranges an earlier session in this slot journaled hold older content: keep theirs.
    const covered = coalesceExtents(await rangesOfFile(slotFile));
    // Readers must not use the slot while this session changes the target.
    if (fs.existsSync(slotFile)) {
      await fsp.rename(slotFile, `${this.sessionFile(h, slot)}.earlier`);
      await syncDirectory(h.journal.dir);
    }
    const file = this.sessionFile(h, slot);
    await fsp.rm(file, { force: true });
    const writer = await createSegmentWriter(file);
    return new SlotSession(this, h, slot, sessionId, writer, covered);
  }

  /** Makes `parts` (sealed logs, then target ranges) the slot's pre-image, replacing it atomically. */
  async writeSlot(h: DiskHistory, seq: number, files: readonly string[], target: DiskTarget, ranges: readonly Extent[]): Promise<void> {
    const final = h.journal.file(seq);
    const tmp = `${final}.resync.tmp`;
    await fsp.rm(tmp, { force: true });
    const writer = await createSegmentWriter(tmp);
    try {
      for (const f of files) if (fs.existsSync(f)) await copyEntries(f, writer);
      await appendTargetContent(writer, ranges, target);
      await writer.seal();
      await verifyHrlLog(tmp, { diskSizeBytes: target.sizeBytes });
      await fsp.rename(tmp, final);
      await syncDirectory(h.journal.dir);
    } catch (err) {
      await writer.close();
      await fsp.rm(tmp, { force: true });
      throw wrapError(err, 'BR_IO', `writing the resync pre-image of slot ${seq} of ${h.diskId}`);
    }
    // The slot replaced a file counted under another name (or none): count the journal again rather than guess the difference.
    h.journalBytes = await h.journal.allocatedBytes();
  }

  async finishSession(h: DiskHistory, seq: number, sessionId: string, target: DiskTarget): Promise<void> {
    const earlier = `${this.sessionFile(h, seq)}.earlier`;
    // Without `.earlier` and without a session file, a slot file that exists
    // was never moved aside: the session died while opening, after its marker
    // said open and before the rename, and the file holds an earlier
    // session's pre-images, which stay. (A session file exists from just
    // after the rename until the marker is sealed, and openSession clears a
    // sealed session's leftovers before marking the slot open; so a slot file
    // beside a session file is this step's own result, redone from its parts.)
    const before = fs.existsSync(earlier) || fs.existsSync(this.sessionFile(h, seq)) ? earlier : h.journal.file(seq);
    await this.writeSlot(h, seq, [before, this.sessionFile(h, seq)], target, []);
    await this.writeMarker(h, { version: 1, seq, state: 'sealed', sessionId });
    await fsp.rm(earlier, { force: true });
    await fsp.rm(this.sessionFile(h, seq), { force: true });
    await syncDirectory(h.journal.dir);
  }

  /** Before log `seq` applies: a sealed session slot gains the log's own pre-images. */
  async beforeApply(diskId: string, entry: SpoolEntry, target: DiskTarget): Promise<void> {
    if (isSnapshotTarget(target)) return;
    // The common case, every log: no session left anything for this disk.
    if (this.known.get(diskId)?.size === 0) return;
    const h = await this.hooks.history(diskId);
    const sealed = await this.settle(h, target);
    if (sealed === undefined) return;
    if (sealed.seq !== entry.envelope.seq) {
      if (sealed.seq < entry.envelope.seq) await this.removeSlotFiles(h, sealed.seq);
      return;
    }
    const slotFile = h.journal.file(sealed.seq);
    const merged = `${this.sessionFile(h, sealed.seq)}.merged`;
    // A crash in the middle of the merge below: the slot's own file is intact under its other name. The rename back
    // is made durable at once rather than left to a later directory fsync (writeSlot's, removeSlotFiles').
    if (!fs.existsSync(slotFile) && fs.existsSync(merged)) {
      await fsp.rename(merged, slotFile);
      await syncDirectory(h.journal.dir);
    }
    if (!fs.existsSync(slotFile)) {
      await this.invalidate(h, sealed.seq, `the pre-image of resync slot ${sealed.seq} is missing`);
      return;
    }
    const covered = coalesceExtents(await rangesOfFile(slotFile));
    const missing = coalesceExtents(await hrlLogOps.ranges(entry.file)).flatMap((r) => subtract(r, covered));
    if (missing.length > 0) {
      await fsp.rename(slotFile, merged);
      try {
        await this.writeSlot(h, sealed.seq, [merged], target, missing);
      } catch (err) {
        if (!fs.existsSync(slotFile)) {
          await fsp.rename(merged, slotFile);
          await syncDirectory(h.journal.dir);
        }
        throw err;
      }
      await fsp.rm(merged, { force: true });
    }
    await this.removeSlotFiles(h, sealed.seq);
  }
}

class SlotSession implements ResyncSessionJournal {
  private journaled: Extent[];

  constructor(
    private readonly owner: RetentionResyncJournal,
    private readonly h: DiskHistory,
    private readonly seq: number,
    private readonly sessionId: string,
    private readonly writer: HrlWriter,
    covered: Extent[],
  ) {
    this.journaled = covered;
  }

  /** Set once the volume could not hold the session's pre-images and the history was dropped. */
  private dropped = false;

  async preserve(target: DiskTarget, offset: number, length: number): Promise<void> {
    if (this.dropped) return;
    const fresh = subtract({ offset, length }, this.journaled);
    if (fresh.length === 0) return;
    try {
      await appendTargetContent(this.writer, fresh, target);
      // Durable before the caller overwrites the range.
      await this.writer.flush();
    } catch (err) {
      if ((err as BlockrelayError).code !== 'BR_DISK_FULL') throw err;
      // The retention volume cannot hold the pre-images. Failing the write
      // would fail the resync attempt and, at the next one, drop the history
      // anyway with a misleading reason; applying never stops for lack of
      // retention space, so the history goes now, saying why, and the
      // session's writes go on without pre-images.
      this.dropped = true;
      await this.writer.close().catch(() => undefined);
      await this.owner.invalidate(this.h, this.seq, `the retention volume is full (BR_RETENTION_VOLUME_FULL): it cannot hold the pre-images of resync session ${this.sessionId}`);
      return;
    }
    this.journaled = coalesceExtents([...this.journaled, ...fresh]);
  }

  async finish(target: DiskTarget): Promise<void> {
    if (this.dropped) return;
    await this.writer.seal();
    await this.owner.finishSession(this.h, this.seq, this.sessionId, target);
  }
}
