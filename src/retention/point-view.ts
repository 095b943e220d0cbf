import * as fs from 'node:fs';
import { BlockrelayError } from '../retry/blockrelay-error';
import { openDisk } from '../targets/disk-spec';
import type { AllocationExtent, DiskTarget, DiskTargetCapabilities } from '../targets/disk-target';
import { hrlByteSum, hrlChecksumFromSum } from '../tracking/hrl-format';
import { HRL_READ_CHUNK_BYTES, type HrlLogFile, type HrlVerifiedLog } from '../tracking/hrl-reader';
import { diskRetentionPaths, readHistoryEpoch, resyncMarkerState } from './retention-format';
import type { DiskManifest } from './retention-manifest';
import type { RecoveryPoint } from './recovery-points';
import { journalDamage, UndoJournal } from './undo-journal';
import { ViewSegments } from './view-segments';

/** Largest piece of a pre-image written at once by `writeOverlayTo` (bounds memory). */
export const POINT_VIEW_OVERLAY_CHUNK_BYTES = 4 * 1024 * 1024;

/** Pre-image logs verified at once when a view opens. */
export const POINT_VIEW_PARALLEL_VERIFIES = 4;

/** Pre-image reads one view request issues at once. */
export const POINT_VIEW_PARALLEL_READS = 16;

/** A range of the disk whose content at the point lives in a pre-image log. */
export interface OverlaySegment {
  readonly start: number;
  readonly end: number;
  /** The pre-image log's index in the view's segments (view-segments.ts). */
  readonly log: number;
  /** File offset in that log of the byte at `start`. */
  readonly fileOffset: number;
  /** The pre-image entry the bytes come from (index into the view's entries). */
  readonly entry?: number;
}

/** One pre-image entry, for checking its payload on first use. */
interface OverlayEntry {
  readonly log: number;
  readonly seq: number;
  readonly payloadFileOffset: number;
  readonly dataLength: number;
  readonly dataChecksum: number;
  verified: boolean;
}

/**
 * Adds `incoming` (sorted, disjoint) to `existing` (sorted, disjoint) only
 * where `existing` has nothing: the first log to cover a byte keeps it.
 * Pre-image logs are added oldest first, so each byte ends up with the
 * pre-image of the oldest log after the point that wrote it, which is the
 * byte's content at the point. Linear in both lists.
 */
export function fillGaps(existing: readonly OverlaySegment[], incoming: readonly OverlaySegment[]): OverlaySegment[] {
  const out: OverlaySegment[] = [];
  let i = 0;
  let coveredEnd = 0;
  for (const inc of incoming) {
    while (i < existing.length && existing[i]!.end <= inc.start) {
      coveredEnd = existing[i]!.end;
      out.push(existing[i++]!);
    }
    let s = Math.max(inc.start, coveredEnd);
    while (s < inc.end) {
      const next = existing[i];
      if (next !== undefined && next.start <= s) {
        coveredEnd = next.end;
        out.push(next);
        i++;
        s = Math.max(s, next.end);
        continue;
      }
      const gapEnd = next === undefined ? inc.end : Math.min(inc.end, next.start);
      out.push({ start: s, end: gapEnd, log: inc.log, fileOffset: inc.fileOffset + (s - inc.start), ...(inc.entry !== undefined ? { entry: inc.entry } : {}) });
      s = gapEnd;
    }
  }
  while (i < existing.length) out.push(existing[i++]!);
  return out;
}

/** Index of the first segment ending after `offset`. */
function firstEndingAfter(segments: readonly OverlaySegment[], offset: number): number {
  let lo = 0;
  let hi = segments.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (segments[mid]!.end <= offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export interface PointViewOptions {
  readonly retentionDir: string;
  readonly manifest: DiskManifest;
  readonly point: RecoveryPoint;
  /** The newest applied point: every pre-image up to it must exist. */
  readonly newestSeq: number;
  /** An open target to read (else the manifest's target is opened read-only and closed with the view). */
  readonly target?: DiskTarget;
  /**
   * When pre-image payloads are checked against their checksums:
   * `open` (default: every payload before the view serves anything, so a
   * failover fails before writing) or `first-read` (structures at open,
   * each payload when a read first needs it: an instant view serves its
   * first read without reading the whole journal; damage fails that read).
   */
  readonly verifyPayloads?: 'open' | 'first-read';
  /** Pre-image logs kept open at once (default VIEW_SEGMENTS_MAX_OPEN); the rest are reopened through their links. */
  readonly maxOpenSegments?: number;
}

/**
 * The disk as it was at a recovery point, read on the fly and never copied:
 * target data overlaid with the pre-images of the logs applied after the
 * point (for each byte, the oldest such log's pre-image wins).
 *
 * It stays correct while the master target keeps applying: a log's
 * pre-image is durable before the log touches the target, so after each
 * target read the view looks for pre-images that appeared meanwhile and
 * adds them (they only fill gaps, being newer than all others). Every
 * pre-image is verified in full before it is used.
 */
export class PointView implements DiskTarget {
  readonly diskUuid = undefined;
  readonly capabilities: DiskTargetCapabilities;
  readonly spec: string;
  readonly sizeBytes: number;
  private segments: OverlaySegment[] = [];
  /** The pre-image logs, by index, with a bounded number open (R14 of review s5). */
  private readonly files: ViewSegments;
  /** Pre-image logs added to the overlay (a resync slot read again counts again). */
  private addedLogs = 0;
  private readonly entries: OverlayEntry[] = [];
  private readonly payloadsAtOpen: boolean;
  private nextSeq: number;
  /**
   * Held pre-image logs that are resync slots still marked (open or sealed):
   * such a file may be replaced, once by log `seq` adding its own ranges,
   * or by a second session in the slot. Keyed by seq; the inode the view
   * read. Unmarked segments are final and never looked at again.
   */
  private readonly slots = new Map<number, number>();
  /** The disk's history epoch when the view opened (retention-format.ts readHistoryEpoch). */
  private epoch = 0;
  private epochFile = '';
  private refreshing: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(
    private readonly target: DiskTarget,
    private readonly ownsTarget: boolean,
    private readonly journal: UndoJournal,
    readonly point: RecoveryPoint,
    readonly diskId: string,
    verifyPayloads: 'open' | 'first-read',
    viewsDir: string,
    maxOpenSegments: number | undefined,
  ) {
    this.files = new ViewSegments(viewsDir, maxOpenSegments);
    this.payloadsAtOpen = verifyPayloads === 'open';
    this.spec = `point:${diskId}@${point.id}`;
    this.sizeBytes = target.sizeBytes;
    this.capabilities = { sparse: false, discard: false, alignmentBytes: target.capabilities.alignmentBytes, readOnly: true };
    this.nextSeq = point.seq + 1;
  }

  static async open(options: PointViewOptions): Promise<PointView> {
    const journal = new UndoJournal(diskRetentionPaths(options.retentionDir, options.manifest.diskId).journalDir);
    // Check every needed pre-image exists before opening anything.
    for (let seq = options.point.seq + 1; seq <= options.newestSeq; seq++) {
      if (!journal.has(seq)) {
        throw new BlockrelayError('BR_RETENTION_JOURNAL_MISSING', `point ${options.point.id} cannot be rebuilt: undo journal segment ${journal.file(seq)} (log ${seq}) is missing`, { details: { file: journal.file(seq), seq, point: options.point.id } });
      }
    }
    const target = options.target ?? (await openDisk(options.manifest.targetSpec, { readOnly: true }));
    // A target whose size changed (a raw file cut short by a crash between the
    // two truncates of a tail zeroing) would rebuild a short disk silently.
    if (target.sizeBytes !== options.manifest.diskSizeBytes) {
      if (options.target === undefined) await target.close();
      throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `point ${options.point.id} cannot be rebuilt: target ${options.manifest.targetSpec} holds ${target.sizeBytes} bytes but disk ${options.manifest.diskId} has ${options.manifest.diskSizeBytes}`, { details: { spec: options.manifest.targetSpec, sizeBytes: target.sizeBytes, diskSizeBytes: options.manifest.diskSizeBytes } });
    }
    const paths = diskRetentionPaths(options.retentionDir, options.manifest.diskId);
    const view = new PointView(target, options.target === undefined, journal, options.point, options.manifest.diskId, options.verifyPayloads ?? 'open', paths.views, options.maxOpenSegments);
    view.epochFile = paths.historyEpoch;
    view.epoch = readHistoryEpoch(view.epochFile);
    try {
      await view.addLogsUpTo(options.newestSeq);
      await view.addNewLogs();
    } catch (err) {
      await view.close();
      throw err;
    }
    return view;
  }

  /** Pre-image logs in the overlay (those applied after the point). */
  get overlayLogs(): number {
    return this.addedLogs;
  }

  /** Pre-image logs open now (at most VIEW_SEGMENTS_MAX_OPEN while idle). */
  get openSegments(): number {
    return this.files.openSegments;
  }

  get overlaySegments(): readonly OverlaySegment[] {
    return this.segments;
  }

  private async addLog(seq: number, opened?: OpenedSegment): Promise<void> {
    opened ??= await this.openLog(seq);
    // A marked resync slot may be replaced (docs/formats/undo-journal.md):
    // the view must hold the file the journal names now, and note its inode
    // to see a later replacement. The segment is read through the link it
    // was verified through, so its inode is exactly what the view reads. A
    // file replaced between the open and this check is opened again (a slot
    // is replaced at most a few times, so this ends).
    for (let tries = 0; ; tries++) {
      const marked = resyncMarkerState(this.journal.dir, seq) !== undefined;
      const now = inodeOf(this.journal.file(seq));
      if (now === undefined || now === opened.inode || tries === 8) {
        if (marked) this.slots.set(seq, opened.inode);
        break;
      }
      await this.files.drop(opened.index);
      opened = await this.openLog(seq);
    }
    await this.overlay(seq, opened);
    this.nextSeq = Math.max(this.nextSeq, seq + 1);
  }

  /** Adds a pre-image log's ranges where the overlay has nothing yet. */
  private async overlay(seq: number, opened: OpenedSegment): Promise<void> {
    const { index, log, verified } = opened;
    const entriesBefore = this.entries.length;
    this.addedLogs++;
    const incoming: OverlaySegment[] = [];
    try {
      for await (const e of log.entries(verified)) {
        if (e.dataLength === 0) continue;
        const entry = this.entries.length;
        this.entries.push({ log: index, seq, payloadFileOffset: e.payloadFileOffset, dataLength: e.dataLength, dataChecksum: e.dataChecksum, verified: false });
        incoming.push({ start: e.byteOffset, end: e.byteOffset + e.dataLength, log: index, fileOffset: e.payloadFileOffset, entry });
      }
    } catch (err) {
      this.entries.length = entriesBefore;
      await this.files.drop(index);
      throw err;
    }
    incoming.sort((a, b) => a.start - b.start);
    // The journal writes disjoint ranges; a foreign log might not, so make them disjoint here.
    const disjoint: OverlaySegment[] = [];
    for (const seg of incoming) {
      const last = disjoint[disjoint.length - 1];
      const start = last === undefined ? seg.start : Math.max(seg.start, last.end);
      if (start < seg.end) disjoint.push({ ...seg, start, fileOffset: seg.fileOffset + (start - seg.start) });
    }
    const segmentsBefore = this.segments.length;
    this.segments = fillGaps(this.segments, disjoint);
    // fillGaps keeps every segment and adds one per gap it fills: none added
    // means older segments cover every byte of this one, and since segments
    // only ever fill gaps, nothing will be read from it: it goes at once.
    if (this.segments.length === segmentsBefore) {
      this.entries.length = entriesBefore;
      await this.files.drop(index);
      return;
    }
    try {
      // Verifying at open checks the payloads the overlay uses, each whole,
      // before the view serves anything: the same guarantee for every byte
      // served as checking the whole segment, without reading the entries
      // older segments shadow (for a point far back, most of the journal).
      if (this.payloadsAtOpen) await this.checkEntriesOf(index);
    } finally {
      await this.files.release(index);
    }
  }

  /** Checks the payload of every entry of log `index` that an overlay segment refers to. */
  private async checkEntriesOf(index: number): Promise<void> {
    const used = new Set<number>();
    for (const seg of this.segments) if (seg.log === index && seg.entry !== undefined) used.add(seg.entry);
    const pending: Promise<void>[] = [];
    for (const entry of used) {
      pending.push(this.checkEntry(entry));
      if (pending.length === POINT_VIEW_PARALLEL_READS) await Promise.all(pending.splice(0));
    }
    await Promise.all(pending);
  }

  /**
   * Follows the resync slots the view holds (docs/formats/undo-journal.md,
   * "Resync sessions"). A slot whose session is open again (a second
   * session) means the target is being changed with pre-images the view
   * cannot see yet: reads fail (BR_POINT_RESYNC_RUNNING) until it ends. A
   * slot file replaced since the view read it (the session sealed, or log
   * `seq` added its own ranges) is a superset holding the same bytes for the
   * old ranges, so it is added again where the overlay has nothing: this
   * happens before any newer log is added, because no newer log is applied
   * before that rewrite. A slot whose marker is gone is final.
   */
  private async followSlots(): Promise<void> {
    for (const [seq, inode] of [...this.slots]) {
      const state = resyncMarkerState(this.journal.dir, seq);
      if (state === 'open') throw this.resyncRunning(seq);
      const now = inodeOf(this.journal.file(seq));
      if (now !== undefined && now !== inode) {
        const opened = await this.openLog(seq);
        this.slots.set(seq, opened.inode);
        await this.overlay(seq, opened);
      }
      if (state === undefined) this.slots.delete(seq);
    }
  }

  private resyncRunning(seq: number): BlockrelayError {
    return new BlockrelayError('BR_POINT_RESYNC_RUNNING', `point ${this.point.id} cannot be read now: a resync session is changing the target in slot ${seq}; retry when it has ended`, { details: { point: this.point.id, seq } });
  }

  /**
   * Verifies the needed pre-images a few at a time (verification reads every
   * payload; overlapping the reads is most of the time to the first read),
   * then adds them to the overlay oldest first.
   */
  private async addLogsUpTo(newestSeq: number): Promise<void> {
    while (this.nextSeq <= newestSeq) {
      const batch: number[] = [];
      for (let seq = this.nextSeq; seq <= newestSeq && batch.length < POINT_VIEW_PARALLEL_VERIFIES; seq++) batch.push(seq);
      const settled = await Promise.allSettled(batch.map((seq) => this.openLog(seq)));
      const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed !== undefined) {
        for (const r of settled) if (r.status === 'fulfilled') await this.files.drop(r.value.index);
        throw failed.reason;
      }
      for (let i = 0; i < batch.length; i++) await this.addLog(batch[i]!, (settled[i] as PromiseFulfilledResult<OpenedSegment>).value);
    }
  }

  /**
   * Opens and verifies a segment, through a hard link of the view's own
   * (view-segments.ts): a pruned segment stays readable, and descriptors
   * stay bounded. EMFILE (possible only where the volume refuses links, so
   * every segment stays open) says so plainly.
   */
  private async openLog(seq: number): Promise<OpenedSegment> {
    const file = this.journal.file(seq);
    let opened: { index: number; log: HrlLogFile; inode: number };
    try {
      opened = await this.files.open(file);
    } catch (err) {
      const errno = (err as { code?: string; cause?: { code?: string } }).cause?.code ?? (err as { code?: string }).code;
      if (errno === 'ENOENT') {
        throw new BlockrelayError('BR_RETENTION_JOURNAL_MISSING', `point ${this.point.id} cannot be rebuilt: undo journal segment ${file} (log ${seq}) is missing`, { details: { file, seq, point: this.point.id } });
      }
      if (errno !== 'EMFILE') throw err;
      const open = this.files.openSegments;
      throw new BlockrelayError('BR_IO', `point ${this.point.id} needs more than the ${open} journal segments it holds open and the process may open no more files; raise the open-file limit (ulimit -n, or LimitNOFILE in the unit) above the number of segments after the point`, { cause: err, details: { point: this.point.id, seq, openSegments: open } });
    }
    try {
      // Payloads are checked per entry once the overlay shows the entry is used (overlay(), checkEntry()).
      const verified = await opened.log.verify({ diskSizeBytes: this.sizeBytes, checkPayloads: false });
      return { ...opened, verified };
    } catch (err) {
      await this.files.drop(opened.index);
      throw journalDamage(file, seq, err);
    }
  }

  /** Checks an entry's payload against its DataChecksum the first time it is used. */
  private async checkEntry(index: number | undefined): Promise<void> {
    if (index === undefined) return;
    const e = this.entries[index]!;
    if (e.verified) return;
    const file = this.journal.file(e.seq);
    const actual = await this.files.with(e.log, async (log) => {
      let sum = 0;
      for (let at = 0; at < e.dataLength; at += HRL_READ_CHUNK_BYTES) {
        const n = Math.min(HRL_READ_CHUNK_BYTES, e.dataLength - at);
        sum = (sum + hrlByteSum(await log.readExact(e.payloadFileOffset + at, n, 'pre-image'))) >>> 0;
      }
      return hrlChecksumFromSum(sum);
    });
    // DataChecksum 0 means "not computed" in [MS-HRL]; such a payload cannot be checked.
    if (e.dataChecksum !== 0 && actual !== e.dataChecksum) {
      const damage = new BlockrelayError('BR_HRL_DATA_CHECKSUM', `${file} at byte ${e.payloadFileOffset}: payload checksum 0x${actual.toString(16)} differs from DataChecksum 0x${e.dataChecksum.toString(16)}`, { details: { file, offset: e.payloadFileOffset } });
      throw journalDamage(file, e.seq, damage);
    }
    e.verified = true;
  }

  /** Adds pre-images of logs applied since the view was opened. */
  private addNewLogs(): Promise<void> {
    const run = async (): Promise<void> => {
      await this.followSlots();
      // The slot the view needs next is being written by a session: its pre-images are not in place yet.
      if (!this.journal.has(this.nextSeq) && resyncMarkerState(this.journal.dir, this.nextSeq) === 'open') throw this.resyncRunning(this.nextSeq);
      while (this.journal.has(this.nextSeq)) await this.addLog(this.nextSeq);
      // History dropped since the view opened: a log was applied with no
      // segment to undo it, so the target no longer rebuilds this point.
      if (readHistoryEpoch(this.epochFile) !== this.epoch) {
        throw new BlockrelayError('BR_RETENTION_JOURNAL_MISSING', `point ${this.point.id} cannot be read any more: the disk's history was dropped while it was open (the retention volume filled, or a resync's pre-images were lost); the hop's log says why`, { details: { point: this.point.id } });
      }
    };
    this.refreshing = this.refreshing.then(run, run);
    return this.refreshing;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (this.closed) throw new BlockrelayError('BR_TARGET_CLOSED', `${this.spec} is closed`);
    const buf = await this.target.read(offset, length);
    // After the target read: a log that started changing those bytes has its pre-image on disk by now.
    await this.addNewLogs();
    const end = offset + length;
    // Segments are disjoint, so their reads fill disjoint parts of `buf` and
    // can run together (bounded, to keep the thread pool for others).
    const reads: Promise<unknown>[] = [];
    for (let i = firstEndingAfter(this.segments, offset); i < this.segments.length; i++) {
      const seg = this.segments[i]!;
      if (seg.start >= end) break;
      const s = Math.max(seg.start, offset);
      const e = Math.min(seg.end, end);
      reads.push(this.checkEntry(seg.entry).then(() => this.files.with(seg.log, (log) => log.readExact(seg.fileOffset + (s - seg.start), e - s, 'pre-image', buf.subarray(s - offset, e - offset)))));
      if (reads.length === POINT_VIEW_PARALLEL_READS) await Promise.all(reads.splice(0));
    }
    await Promise.all(reads);
    return buf;
  }

  /**
   * Writes the overlay onto `out`, which already holds a copy of the whole
   * target taken after this view was opened: a copy of the target is a read
   * of every byte, so the pre-images that appeared meanwhile are added first,
   * exactly as `read` does. Together that is the disk at the point, written
   * with one kernel copy of the target plus the pre-image bytes only.
   */
  async writeOverlayTo(out: DiskTarget): Promise<{ bytes: number }> {
    if (this.closed) throw new BlockrelayError('BR_TARGET_CLOSED', `${this.spec} is closed`);
    await this.addNewLogs();
    let bytes = 0;
    for (const seg of this.segments) {
      await this.checkEntry(seg.entry);
      for (let at = seg.start; at < seg.end; at += POINT_VIEW_OVERLAY_CHUNK_BYTES) {
        const n = Math.min(POINT_VIEW_OVERLAY_CHUNK_BYTES, seg.end - at);
        await out.write(at, await this.files.with(seg.log, (log) => log.readExact(seg.fileOffset + (at - seg.start), n, 'pre-image')));
        bytes += n;
      }
    }
    return { bytes };
  }

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    for await (const ext of this.target.extents(offset, length)) {
      if (!ext.zero) {
        yield ext;
        continue;
      }
      // A hole in the target may hold data at the point: then the whole hole
      // is reported as data (the copy skips its all-zero blocks anyway), so
      // extents keep the target's own boundaries (grains) rather than
      // splitting into 512-byte slivers that each cost a read.
      const i = firstEndingAfter(this.segments, ext.offset);
      const overlaid = i < this.segments.length && this.segments[i]!.start < ext.offset + ext.length;
      yield overlaid ? { ...ext, zero: false } : ext;
    }
  }

  private refuse(): never {
    throw new BlockrelayError('BR_TARGET_READ_ONLY', `${this.spec} is a read-only view of a recovery point`, { details: { spec: this.spec } });
  }

  async write(): Promise<void> {
    this.refuse();
  }

  async writeZeroes(): Promise<void> {
    this.refuse();
  }

  async discard(): Promise<void> {
    this.refuse();
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.refreshing.catch(() => undefined);
    await this.files.close();
    if (this.ownsTarget) await this.target.close();
  }
}

/** A segment opened and verified for the overlay. */
interface OpenedSegment {
  readonly index: number;
  readonly log: HrlLogFile;
  readonly verified: HrlVerifiedLog;
  /** The inode verified (the view's link names it). */
  readonly inode: number;
}

/** The inode `file` names now, or undefined when it names nothing. */
function inodeOf(file: string): number | undefined {
  try {
    return fs.statSync(file).ino;
  } catch {
    return undefined;
  }
}
