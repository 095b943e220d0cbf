import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ChangeTracker, type ResyncReport } from '../../src/tracking/change-tracker';
import { HrlLogFile } from '../../src/tracking/hrl-reader';
import type { HrlWriterFile } from '../../src/tracking/hrl-writer';
import { applyTornWrite } from '../helpers/power-loss';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const DISK = 4 * 1024 * 1024;
const BLOCK = 4096;
const BLOCKS = DISK / BLOCK;

function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

/**
 * A log file that writes through to the real file, records each write and
 * how many were issued before its last completed fdatasync (what a power
 * loss keeps for sure), and lets a test stop or fail chosen fdatasyncs.
 */
class GatedFile implements HrlWriterFile {
  static opened: GatedFile[] = [];
  /** The file the tracker appended to last (the active log). */
  static lastWritten: GatedFile | undefined;
  /** Decides a datasync: undefined goes on at once, a promise is awaited first (a rejection fails the sync). */
  static gate: ((f: GatedFile) => Promise<void> | undefined) | undefined;

  /**
   * Stops the next datasync of a file `pick` accepts until `end()` (with an
   * error: the sync fails with it); others go on. `reached` resolves with the
   * stopped file. One file only: the gate is cleared when it stops one.
   */
  static stopNextSync(pick: (f: GatedFile) => boolean): { reached: Promise<GatedFile>; end: (err?: Error) => void } {
    let end!: (err?: Error) => void;
    const stopped = new Promise<void>((resolve, reject) => {
      end = (err) => (err === undefined ? resolve() : reject(err));
    });
    let reach!: (f: GatedFile) => void;
    const reached = new Promise<GatedFile>((r) => (reach = r));
    GatedFile.gate = (f) => {
      if (!pick(f)) return undefined;
      GatedFile.gate = undefined;
      reach(f);
      return stopped;
    };
    return { reached, end };
  }
  readonly ops: { position: number; data: Buffer }[] = [];
  syncedOps = 0;
  private constructor(readonly openedAs: string, readonly inode: number, private readonly fh: fsp.FileHandle) {}

  static async open(p: string): Promise<HrlWriterFile> {
    const fh = await fsp.open(p, 'wx+');
    const f = new GatedFile(p, (await fh.stat()).ino, fh);
    GatedFile.opened.push(f);
    return f;
  }

  async write(buffer: Buffer, offset: number, length: number, position: number): Promise<unknown> {
    this.ops.push({ position, data: Buffer.from(buffer.subarray(offset, offset + length)) });
    GatedFile.lastWritten = this;
    return this.fh.write(buffer, offset, length, position);
  }

  async writev(buffers: Buffer[], position: number): Promise<unknown> {
    this.ops.push({ position, data: Buffer.concat(buffers) });
    GatedFile.lastWritten = this;
    return this.fh.writev(buffers, position);
  }

  async datasync(): Promise<void> {
    const issued = this.ops.length;
    const wait = GatedFile.gate?.(this);
    if (wait !== undefined) await wait;
    await this.fh.datasync();
    this.syncedOps = Math.max(this.syncedOps, issued);
  }

  close(): Promise<void> {
    return this.fh.close();
  }

  /** The file as a power loss may leave it: synced writes kept, later ones lost, kept or torn at 512 bytes. */
  powerLossImage(rnd: () => number): Buffer {
    let image = Buffer.alloc(0);
    const apply = (position: number, data: Buffer): void => {
      if (position + data.length > image.length) image = Buffer.concat([image, Buffer.alloc(position + data.length - image.length)]);
      data.copy(image, position);
    };
    this.ops.forEach((op, i) => {
      if (i < this.syncedOps) apply(op.position, op.data);
      else if (rnd() < 0.35) apply(op.position, op.data);
      else if (rnd() < 0.5) applyTornWrite(apply, op.position, op.data, 512, rnd);
    });
    return image;
  }
}

afterEach(() => {
  GatedFile.opened = [];
  GatedFile.lastWritten = undefined;
  GatedFile.gate = undefined;
});

/** One block's write: its data names the write. */
interface BlockWrite { block: number; data: Buffer; seq: number }

function blockData(seq: number, block: number): Buffer {
  const b = Buffer.alloc(BLOCK, (seq * 13 + 7) & 0xff);
  b.writeUInt32LE(seq, 0);
  b.writeUInt32LE(block, 4);
  return b;
}

class Workload {
  readonly writes: BlockWrite[] = [];
  private seq = 0;
  constructor(private readonly t: ChangeTracker, private readonly rnd: () => number) {}

  /**
   * `n` writes one after another, a third of them exact overwrites of an
   * earlier block (coalesced in the open log). Only completed writes are
   * listed (`out` fills as they complete).
   */
  async write(n: number, out: BlockWrite[] = []): Promise<BlockWrite[]> {
    for (let i = 0; i < n; i++) {
      const again = this.writes.length > 0 && this.rnd() < 0.33 ? this.writes[Math.floor(this.rnd() * this.writes.length)]!.block : undefined;
      const block = again ?? Math.floor(this.rnd() * BLOCKS);
      const w = { block, data: blockData(++this.seq, block), seq: this.seq };
      await this.t.recordWrite(block * BLOCK, w.data);
      this.writes.push(w);
      out.push(w);
    }
    return out;
  }
}

/** Applies the recovered tracker's logs in order: the replica, and which blocks the logs wrote. */
async function replicaOf(t: ChangeTracker): Promise<{ image: Buffer; written: Set<number> }> {
  const image = Buffer.alloc(DISK);
  const written = new Set<number>();
  for (const l of t.sealedLogs()) {
    const log = await HrlLogFile.open(l.path);
    try {
      const v = await log.verify();
      for await (const e of log.entries(v)) {
        (await log.readPayload(e, 0, e.dataLength)).copy(image, e.byteOffset);
        for (let b = Math.floor(e.byteOffset / BLOCK); b * BLOCK < e.byteOffset + e.dataLength; b++) written.add(b);
      }
    } finally {
      await log.close();
    }
  }
  return { image, written };
}

/**
 * Each write in `must` is found as that write or a later write of its block
 * left it in the replica of the recovered logs, or its block is in a resync
 * extent. Returns how many were found in a log.
 */
function expectKept(t: ChangeTracker, replica: { image: Buffer; written: Set<number> }, all: BlockWrite[], must: BlockWrite[], label: string): number {
  const resync = [...t.resyncExtents()];
  const inResync = (block: number): boolean => resync.some((e) => e.offset < (block + 1) * BLOCK && block * BLOCK < e.offset + e.length);
  let inLog = 0;
  for (const w of must) {
    const got = replica.image.subarray(w.block * BLOCK, (w.block + 1) * BLOCK);
    const asLeft = replica.written.has(w.block) && all.some((v) => v.block === w.block && v.seq >= w.seq && got.equals(v.data));
    if (asLeft) inLog++;
    else if (!inResync(w.block)) throw new Error(`${label}: write ${w.seq} of block ${w.block} is in no recovered log and in no resync extent`);
  }
  return inLog;
}

function openTracker(dir: string, extra: { onResyncRequired?: (r: ResyncReport) => void } = {}): Promise<ChangeTracker> {
  return ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0, overflowRatio: 2, openLogFile: GatedFile.open, spareOnInjectedFiles: true, ...extra });
}

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

/**
 * Writes during a stopped seal: those that complete while it is stopped
 * passed the cut into the new log; one that does not fit the log's buffers
 * waits for the cut's lock (and the rest behind it). Returns the passed
 * writes and the promise of the rest.
 */
async function writeWhileStopped(work: Workload, n: number): Promise<{ passed: BlockWrite[]; rest: Promise<unknown> }> {
  const done: BlockWrite[] = [];
  const rest = work.write(n, done);
  for (let i = 0; i < 20; i++) await turn();
  return { passed: [...done], rest };
}

/** Waits until a file opened after the first `since` (the spare made by the last cut) has synced its anchor. */
async function spareMade(since: number): Promise<void> {
  for (let i = 0; i < 2000 && !(GatedFile.opened.length > since && GatedFile.opened.at(-1)!.syncedOps > 0); i++) await new Promise((r) => setTimeout(r, 2));
  expect(GatedFile.opened.length).toBeGreaterThan(since);
}

/**
 * Brings `t` into a cut whose old log's seal stops at its first fdatasync:
 * the switch is done (the spare took the active log's place), writes go
 * into the new log. `end` decides how the stopped sync ends.
 */
async function stopInSeal(t: ChangeTracker): Promise<{ cut: Promise<unknown>; old: GatedFile; spare: GatedFile; end: (err?: Error) => void }> {
  // The cut waits for the spare (the file opened last) before it holds the
  // writes; the first other file to sync after that is the old log, sealing.
  const spare = GatedFile.opened.at(-1)!;
  expect(spare.openedAs.endsWith('.hrl.spare')).toBe(true);
  const { reached, end } = GatedFile.stopNextSync((f) => f !== spare);
  const cut = ChangeTracker.cut([t]);
  cut.catch(() => undefined);
  const old = await reached;
  return { cut, old, spare, end };
}

describe('ChangeTracker cut through the spare, on injected files', () => {
  it('takes a spare made through the injected opener at a cut', async () => {
    const dir = tempDir();
    const t = await openTracker(dir);
    await t.recordWrite(0, blockData(1, 0));
    await t.rotate();
    await t.recordWrite(BLOCK, blockData(2, 1));
    await t.rotate();
    // Each cut took a spare: the logs written to were opened as `.hrl.spare`.
    const spares = GatedFile.opened.filter((f) => f.openedAs.endsWith('.hrl.spare'));
    expect(spares.length).toBeGreaterThanOrEqual(2);
    expect(spares.filter((f) => f.ops.length > 2).length).toBeGreaterThanOrEqual(1);
    await t.close();
  });

  it('loses no write when the process dies or power fails between the switch and the old log being published', async () => {
    const rnd = prng(777);
    const dir = tempDir();
    const live = path.join(dir, 'live');
    const t = await openTracker(live);
    const work = new Workload(t, rnd);
    await work.write(20);
    await t.flush();
    const since = GatedFile.opened.length;
    await t.rotate();
    await spareMade(since);
    const flushed = await work.write(30);
    await t.flush();
    const unflushed = await work.write(15);
    const { cut, old, spare, end } = await stopInSeal(t);
    // Inside the cut: these pass it into the new log while the old one seals.
    const { passed, rest } = await writeWhileStopped(work, 12);
    expect(passed.length, 'writes passed the cut').toBeGreaterThan(0);
    const newLog = spare;
    expect(old.openedAs.endsWith('.hrl.spare'), 'the old log was itself a spare taken at the cut before').toBe(true);
    expect(old).not.toBe(newLog);

    const names = fs.readdirSync(live);
    const byInode = new Map<number, GatedFile>();
    for (const f of GatedFile.opened) byInode.set(f.inode, f);
    const files = names.map((n) => ({ n, bytes: fs.readFileSync(path.join(live, n)), file: byInode.get(fs.statSync(path.join(live, n)).ino) }));
    end();
    await cut;
    await rest;
    await t.close();

    let inLog = 0;
    for (let sample = 0; sample < 24; sample++) {
      const crashDir = path.join(dir, `crash-${sample}`);
      fs.mkdirSync(crashDir);
      // SIGKILL: every file as the page cache has it. Power loss: the logs
      // keep what a sync covered, the rest maybe, torn; the spare's rename
      // (no directory sync yet) may be lost too.
      const power = sample % 3 !== 0;
      const renameLost = power && sample % 3 === 2;
      for (const { n, bytes, file } of files) {
        let name = n;
        if (renameLost && file === newLog) name = path.basename(newLog.openedAs);
        fs.writeFileSync(path.join(crashDir, name), power && file !== undefined ? file.powerLossImage(rnd) : bytes);
      }
      const r = await ChangeTracker.open({ dir: crashDir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0 });
      try {
        const replica = await replicaOf(r);
        // Only writes that had completed at the crash (a later one of the same block may not be there).
        const all = work.writes.filter((w) => w.seq <= passed.at(-1)!.seq);
        // Every write a FLUSH acknowledged is kept (SIGKILL or power loss).
        const must = all.filter((w) => w.seq <= flushed.at(-1)!.seq);
        inLog += expectKept(r, replica, all, must, `sample ${sample} (${power ? 'power loss' : 'SIGKILL'}${renameLost ? ', rename lost' : ''})`);
        // The writes that passed the cut were still in the new log's buffers
        // (not yet written to its file): like any unflushed write, a crash
        // may lose them (the tap's write intents cover their blocks).
        if (!power) {
          // The seal wrote the old log's last block before it stopped: the old
          // log, unsealed and unlisted, is recovered whole.
          expect(expectKept(r, replica, all, unflushed, `sample ${sample}`)).toBe(unflushed.length);
        }
        // The recovered logs form one chain.
        const logs = r.sealedLogs();
        for (let i = 1; i < logs.length; i++) expect(logs[i]!.previousUniqueId).toBe(logs[i - 1]!.uniqueId);
      } finally {
        await r.close({ seal: false });
      }
    }
    expect(inLog).toBeGreaterThan(0);
  });

  it('keeps the old and the new log\'s writes as resync extents when the seal fails with writes already in the new log, and reports the error code', async () => {
    const rnd = prng(991);
    const dir = tempDir();
    const reports: ResyncReport[] = [];
    const t = await openTracker(dir, { onResyncRequired: (r) => reports.push(r) });
    const work = new Workload(t, rnd);
    await work.write(20);
    await t.flush();
    const since = GatedFile.opened.length;
    await t.rotate();
    await spareMade(since);
    await work.write(25);
    const { cut, end } = await stopInSeal(t);
    const { passed, rest } = await writeWhileStopped(work, 10);
    expect(passed.length, 'writes passed the cut').toBeGreaterThan(0);
    end(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', errno: -5, syscall: 'fdatasync' }));
    // The cut itself ends: the failure folds the logs, it does not leave the cut half done.
    expect(await cut).toEqual([undefined]);
    await rest;

    const status = t.status();
    expect(status).toMatchObject({ mode: 'dirty-only', resyncRequired: true, lastResyncReason: 'log-io-error', sealedLogs: 0 });
    expect(t.sealedLogs()).toEqual([]);
    const report = reports.at(-1)!;
    expect(report.reason).toBe('log-io-error');
    expect(report.cause?.code).toBe('BR_IO');
    expect(report.cause?.message).toMatch(/EIO/);
    // Neither log nor a spare is left on disk: everything they held is in the resync map.
    expect(fs.readdirSync(dir).filter((n) => /\.hrl(\.open|\.spare)?$/.test(n))).toEqual([]);
    const none = { image: Buffer.alloc(DISK), written: new Set<number>() };
    expectKept(t, none, work.writes, work.writes.filter((w) => w.seq > 20), 'after the failed seal');
    // Later writes are tracked in the maps, and all of it survives a restart.
    const after = await work.write(5);
    await t.flush();
    await t.close();
    const again = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0 });
    try {
      expect(again.status().mode).toBe('dirty-only');
      const resynced = new Set(after.map((w) => w.block));
      const dirty = [...again.dirtyExtents()];
      for (const w of after) expect(dirty.some((e) => e.offset <= w.block * BLOCK && w.block * BLOCK < e.offset + e.length), `block ${w.block}`).toBe(true);
      expectKept(again, none, work.writes, work.writes.filter((w) => w.seq > 20 && !resynced.has(w.block)), 'after a restart');
    } finally {
      await again.close({ seal: false });
    }
  });
});

describe('ChangeTracker cut right after another', () => {
  it('does not hold the writes while the next log is still being made: the cut waits for it first', async () => {
    const dir = tempDir();
    const t = await openTracker(dir);
    await t.recordWrite(0, blockData(1, 0));
    await t.nextLogReady();
    // The spare the next cut makes stops in its anchor's sync until released.
    const before = GatedFile.opened.length;
    const { reached: inCreate, end: release } = GatedFile.stopNextSync((f) => GatedFile.opened.indexOf(f) >= before && f.openedAs.endsWith('.hrl.spare'));
    await t.rotate();
    await inCreate;
    // A cut at once (one that followed a long seal): the spare is not ready.
    let cutDone = false;
    const cut = ChangeTracker.cut([t]).then((s) => {
      cutDone = true;
      return s;
    });
    let wrote = false;
    const write = t.recordWrite(BLOCK, blockData(2, 1)).then(() => {
      wrote = true;
    });
    for (let i = 0; i < 20; i++) await turn();
    expect(wrote, 'a write completes while the next log is being made').toBe(true);
    expect(cutDone).toBe(false);
    release();
    const [sealed] = await cut;
    await write;
    // The write went to the log the cut then sealed; the spare was taken (no log made in line).
    expect(sealed!.entryCount).toBe(1);
    expect(GatedFile.opened.filter((f) => !f.openedAs.endsWith('.hrl.spare')).length).toBe(1);
    await t.close();
  });
});
