import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BlockrelayError } from '../retry/blockrelay-error';
import { processAlive } from '../platform/process-liveness';
import { HrlLogFile } from '../tracking/hrl-reader';

/** Pre-image segments a point view keeps open at once (the rest are reopened on demand). */
export const VIEW_SEGMENTS_MAX_OPEN = 64;

/**
 * The pre-image segments one point view reads, with a bounded number of
 * open descriptors.
 *
 * A view needs every segment from its point to the newest, and must keep
 * reading them after a prune deletes them (the point may be pruned while
 * a failover or export runs). An open descriptor guarantees that but costs
 * one per segment: 1 s cuts over a day are 86 400 segments, far past any
 * open-file limit. So each segment is hard-linked into a directory of the
 * view's own (`DIR/<disk>/views/<pid>-<random>/`), on the same volume: the
 * link keeps the inode alive exactly as a descriptor did, and a segment
 * can be closed and reopened through its link at will. The segment is
 * opened through the link it was verified through, so the bytes the view
 * reads are always the inode it verified, even if the journal's name later
 * names another file (a resync slot rewritten).
 *
 * Where a link cannot be made (the volume refuses hard links or a new
 * directory), the segment is opened by its journal name and kept open
 * until the view closes, which is the old behaviour: correct, unbounded.
 * The directory goes when the view closes; one left by a process that
 * died is removed by the next view opened on that disk.
 */
export class ViewSegments {
  private readonly handles: Array<SegmentHandle | undefined> = [];
  private openCount = 0;
  private useClock = 0;
  private dirReady: Promise<string | undefined> | undefined;

  constructor(
    /** `DIR/<disk>/views`. */
    private readonly viewsRoot: string,
    private readonly maxOpen = VIEW_SEGMENTS_MAX_OPEN,
  ) {}

  /** Segments currently open (for tests and diagnostics). */
  get openSegments(): number {
    return this.openCount;
  }

  /**
   * Opens journal file `journalFile` for a new segment, through a link of
   * the view's own where possible. Returns the open log and the handle
   * index; the log stays open until `release` lets it be evicted.
   * A journal file gone meanwhile fails with ENOENT (as `open` would).
   */
  async open(journalFile: string): Promise<{ index: number; log: HrlLogFile; inode: number }> {
    // The index is taken before any await: opens run concurrently (a view verifies a few segments at once).
    const index = this.handles.length;
    this.handles.push(undefined);
    const dir = await this.dir();
    let link: string | undefined;
    if (dir !== undefined) {
      const candidate = path.join(dir, `${index}.hrl`);
      try {
        await fsp.link(journalFile, candidate);
        link = candidate;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw err;
        // The volume refuses links (EPERM, EMLINK, ENOSPC for the entry): fall back to a pinned descriptor.
      }
    }
    const file = link ?? journalFile;
    let log: HrlLogFile;
    try {
      log = await this.openFile(file);
    } catch (err) {
      if (link !== undefined) await fsp.unlink(link).catch(() => undefined);
      throw err;
    }
    const inode = fs.statSync(file).ino;
    this.handles[index] = { link, log, users: 1, lastUse: ++this.useClock };
    this.openCount++;
    return { index, log, inode };
  }

  /** Lets segment `index`'s descriptor be closed when the bound needs it. */
  async release(index: number): Promise<void> {
    const h = this.handles[index];
    if (h === undefined) return;
    h.users--;
    await this.evict();
  }

  /** Closes segment `index` for good and removes its link (nothing will read it). */
  async drop(index: number): Promise<void> {
    const h = this.handles[index];
    if (h === undefined) return;
    this.handles[index] = undefined;
    if (h.log !== undefined) {
      this.openCount--;
      await h.log.close();
    }
    if (h.link !== undefined) await fsp.unlink(h.link).catch(() => undefined);
  }

  /** Runs `fn` with segment `index` open (reopened through its link if it was closed). */
  async with<T>(index: number, fn: (log: HrlLogFile) => Promise<T>): Promise<T> {
    const h = this.handles[index];
    if (h === undefined) throw new BlockrelayError('BR_INTERNAL', `view segment ${index} was dropped`);
    h.users++;
    h.lastUse = ++this.useClock;
    try {
      if (h.log === undefined) {
        // A concurrent reader may be reopening it too: share that open.
        h.opening ??= this.openFile(h.link!).then((log) => {
          h.log = log;
          this.openCount++;
          return log;
        }).finally(() => {
          h.opening = undefined;
        });
        await h.opening;
      }
      return await fn(h.log!);
    } finally {
      h.users--;
      await this.evict();
    }
  }

  /** Closes everything and removes the view's directory. */
  async close(): Promise<void> {
    for (let i = 0; i < this.handles.length; i++) {
      const h = this.handles[i];
      if (h?.log !== undefined) await h.log.close();
    }
    this.handles.length = 0;
    this.openCount = 0;
    const dir = await this.dirReady?.catch(() => undefined);
    if (dir !== undefined) await fsp.rm(dir, { recursive: true, force: true }).catch(() => undefined);
  }

  /**
   * Opens a segment file; when the process is out of descriptors, closes
   * every idle linked segment and tries once more (the bound is a target,
   * and a low open-file limit must cost reopens, not the view).
   */
  private async openFile(file: string): Promise<HrlLogFile> {
    try {
      return await HrlLogFile.open(file);
    } catch (err) {
      const errno = (err as { cause?: { code?: string } }).cause?.code ?? (err as { code?: string }).code;
      if (errno !== 'EMFILE' || this.openCount === 0) throw err;
      await this.evict(0);
      return await HrlLogFile.open(file);
    }
  }

  /** Closes the least recently used idle, linked segments until at most `limit` are open. */
  private async evict(limit = this.maxOpen): Promise<void> {
    if (this.openCount <= limit) return;
    const idle = this.handles
      .filter((h): h is SegmentHandle => h !== undefined && h.log !== undefined && h.link !== undefined && h.users === 0 && h.opening === undefined)
      .sort((a, b) => a.lastUse - b.lastUse);
    for (const h of idle) {
      if (this.openCount <= limit) break;
      // Another eviction, or a reader, may have taken it since the list was made (closes await).
      if (h.log === undefined || h.users > 0 || h.opening !== undefined) continue;
      const log = h.log;
      h.log = undefined;
      this.openCount--;
      await log.close();
    }
  }

  /** The view's own link directory, made on first use; undefined when the volume will not have one. */
  private dir(): Promise<string | undefined> {
    this.dirReady ??= (async () => {
      try {
        await fsp.mkdir(this.viewsRoot, { recursive: true });
        await removeDeadViews(this.viewsRoot);
        const dir = path.join(this.viewsRoot, `${process.pid}-${randomBytes(6).toString('hex')}`);
        await fsp.mkdir(dir);
        return dir;
      } catch {
        return undefined;
      }
    })();
    return this.dirReady;
  }
}

interface SegmentHandle {
  /** The view's hard link to the segment; undefined when pinned open by its journal name. */
  readonly link: string | undefined;
  log: HrlLogFile | undefined;
  opening?: Promise<HrlLogFile>;
  /** Readers using it now; an open segment with users is never closed. */
  users: number;
  lastUse: number;
}

/** Removes view directories whose process is gone (a view left by a crash holds its segments' space). */
async function removeDeadViews(viewsRoot: string): Promise<void> {
  for (const name of await fsp.readdir(viewsRoot)) {
    const m = /^(\d+)-[0-9a-f]+$/.exec(name);
    if (m === null || processAlive(Number(m[1]))) continue;
    await fsp.rm(path.join(viewsRoot, name), { recursive: true, force: true }).catch(() => undefined);
  }
}
