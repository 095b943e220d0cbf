import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { HrlLogFile } from '../../src/tracking/hrl-reader';
import type { HrlWriterFile } from '../../src/tracking/hrl-writer';
import { TrackerMapsWriter } from '../../src/tracking/tracker-files';
import { useTempDirs } from '../helpers/tmp';
import { applyTornWrite, CrashImage } from '../helpers/power-loss';

const tempDir = useTempDirs();
const DISK = 1024 * 1024;
const SECTOR = 512;
const PAGE = 4096;
const CALLS = 80;
const SAMPLES = 150;

function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

/** Writes through to the real file and records every write and sync, to build power-loss images later. */
class RecordingLog implements HrlWriterFile {
  static readonly ops: { position: number; data: Buffer }[] = [];
  static readonly syncs: number[] = [];
  private constructor(private readonly fh: fsp.FileHandle) {}

  static async open(p: string): Promise<HrlWriterFile> {
    return new RecordingLog(await fsp.open(p, 'wx+'));
  }

  async write(buffer: Buffer, offset: number, length: number, position: number): Promise<unknown> {
    RecordingLog.ops.push({ position, data: Buffer.from(buffer.subarray(offset, offset + length)) });
    return this.fh.write(buffer, offset, length, position);
  }

  async writev(buffers: Buffer[], position: number): Promise<unknown> {
    RecordingLog.ops.push({ position, data: Buffer.concat(buffers) });
    return this.fh.writev(buffers, position);
  }

  async datasync(): Promise<void> {
    await this.fh.datasync();
    RecordingLog.syncs.push(RecordingLog.ops.length);
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

/**
 * The log as a power loss after `crashAt` operations may leave it: a write
 * after the last sync is lost, whole, or torn into any subset of the
 * 512-byte sectors (or 4096-byte pages) it touches, at absolute positions.
 */
function crashImage(crashAt: number, rnd: () => number): Buffer {
  const synced = Math.max(0, ...RecordingLog.syncs.filter((s) => s <= crashAt));
  const unit = rnd() < 0.5 ? SECTOR : PAGE;
  const image = new CrashImage();
  const apply = image.apply;
  for (let i = 0; i < crashAt; i++) {
    const op = RecordingLog.ops[i]!;
    if (i < synced) {
      apply(op.position, op.data);
      continue;
    }
    if (rnd() < 0.4) continue;
    if (rnd() >= 0.4) {
      apply(op.position, op.data);
      continue;
    }
    applyTornWrite(apply, op.position, op.data, unit, rnd);
  }
  return image.bytes;
}

const STATE_FILES = ['disk0.maps.0', 'disk0.maps.1', 'disk0.tracker.json'];

function snapshot(dir: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const n of STATE_FILES) if (fs.existsSync(path.join(dir, n))) out.set(n, fs.readFileSync(path.join(dir, n)));
  return out;
}

/** The disk as the recovered logs write it, applied in order, and which bytes they write. */
async function recoveredState(tracker: ChangeTracker): Promise<{ image: Buffer; written: Uint8Array }> {
  const image = Buffer.alloc(DISK);
  const written = new Uint8Array(DISK);
  for (const l of tracker.sealedLogs()) {
    const log = await HrlLogFile.open(l.path);
    try {
      const v = await log.verify();
      for await (const e of log.entries(v)) {
        (await log.readPayload(e, 0, e.dataLength)).copy(image, e.byteOffset);
        written.fill(1, e.byteOffset, e.byteOffset + e.dataLength);
      }
    } finally {
      await log.close();
    }
  }
  return { image, written };
}

/**
 * Write number `c` of a harness: with chance `repeatChance` the exact extent
 * of an earlier write (the writer then rewrites its entry in place), else a
 * new one; some lengths are not a multiple of 32, so later metadata blocks
 * (and their entries) sit at unaligned file positions. Its bytes name `c`.
 */
function randomWrite(rnd: () => number, writes: ReadonlyArray<{ offset: number; length: number }>, c: number, repeatChance: number): { offset: number; length: number; data: Buffer } {
  const again = writes.length > 0 && rnd() < repeatChance ? writes[Math.floor(rnd() * writes.length)]! : undefined;
  const length = again?.length ?? (rnd() < 0.2 ? 100 + Math.floor(rnd() * 900) : SECTOR * (1 + Math.floor(rnd() * 6)));
  const offset = again?.offset ?? Math.floor(rnd() * (DISK / SECTOR - 8)) * SECTOR;
  const data = Buffer.alloc(length, (c * 7 + 1) & 0xff);
  data.writeUInt32LE(c, 0);
  return { offset, length, data };
}

/**
 * Each byte of the first `covered` writes reads, in the recovered logs, as
 * that write or a later one left it (a later write may or may not have
 * survived), unless it is in a resync extent; throws naming the byte.
 */
async function expectCoveredWritesKept(recovered: ChangeTracker, writes: ReadonlyArray<{ offset: number; length: number; data: Buffer }>, covered: number, where: string): Promise<void> {
  const { image, written } = await recoveredState(recovered);
  const resync = [...recovered.resyncExtents()];
  const inResync = (at: number): boolean => resync.some((e) => e.offset <= at && at < e.offset + e.length);
  for (let w = 0; w < covered; w++) {
    const { offset, length } = writes[w]!;
    for (let at = offset; at < offset + length; at++) {
      let ok = written[at] === 1 && image[at] === writes[w]!.data[at - offset];
      for (let v = w + 1; !ok && v < writes.length; v++) {
        const later = writes[v]!;
        if (later.offset <= at && at < later.offset + later.length && written[at] === 1 && image[at] === later.data[at - later.offset]) ok = true;
      }
      if (!ok && !inResync(at)) throw new Error(`${where}: byte ${at} of write ${w} [${offset}, +${length}) is neither that write's nor a later one's in the recovered logs, and in no resync extent`);
    }
  }
}

describe('ChangeTracker under simulated power loss', () => {
  it('keeps every write recorded before the last persisted maps as the final state of its bytes or in a resync extent, with exact overwrites coalesced', async () => {
    const dir = tempDir();
    const live = path.join(dir, 'live');
    const clock = new SimulatedClock();
    const tracker = await ChangeTracker.open({ dir: live, diskId: 'disk0', diskSizeBytes: DISK, metadataSizeBytes: 256, persistIntervalMs: 0, clock, openLogFile: RecordingLog.open, coalesceMinBytes: 1 });
    const rnd = prng(4242);
    // A flush persists the maps and syncs the log at once, so a crash in its
    // log writes may find its maps on disk or the ones before: `states`
    // holds what each order leaves (a write persists nothing: one state).
    interface Call { kind: 'write' | 'flush'; opsBefore: number; opsAfter: number; writes: number; states: Map<string, Buffer>[] }
    const calls: Call[] = [];
    const writes: { offset: number; length: number; data: Buffer }[] = [];
    let before = snapshot(live);
    for (let c = 0; c < CALLS; c++) {
      const opsBefore = RecordingLog.ops.length;
      const kind = rnd() < 0.25 ? 'flush' : 'write';
      if (kind === 'write') {
        const w = randomWrite(rnd, writes, c, 0.5);
        await tracker.recordWrite(w.offset, w.data);
        writes.push(w);
      } else {
        await tracker.flush();
      }
      const after = snapshot(live);
      calls.push({ kind, opsBefore, opsAfter: RecordingLog.ops.length, writes: writes.length, states: kind === 'flush' ? [after, before] : [before] });
      before = after;
    }
    const logName = fs.readdirSync(live).find((n) => n.endsWith('.hrl.open'))!;
    expect(tracker.status()).toMatchObject({ mode: 'logging' });
    // The harness exercises rewrites in place that reached the file (positional writes of 32 bytes).
    expect(RecordingLog.ops.filter((o) => o.data.length === 32).length).toBeGreaterThan(5);

    let checked = 0;
    for (let sample = 0; sample < SAMPLES; sample++) {
      const c = Math.floor(rnd() * CALLS);
      const call = calls[c]!;
      const crashAt = call.opsBefore + Math.floor(rnd() * (call.opsAfter - call.opsBefore + 1));
      const crashDir = path.join(dir, `crash-${sample}`);
      fs.mkdirSync(crashDir);
      // Both crash orders of a flush: its maps durable (index 0) or not yet (1).
      const order = Math.floor(rnd() * call.states.length);
      for (const [n, b] of call.states[order]!) fs.writeFileSync(path.join(crashDir, n), b);
      fs.writeFileSync(path.join(crashDir, logName), crashImage(crashAt, rnd));

      const recovered = await ChangeTracker.open({ dir: crashDir, diskId: 'disk0', diskSizeBytes: DISK, metadataSizeBytes: 256, persistIntervalMs: 0, clock });
      try {
        expect(recovered.status().resyncBytes).toBeLessThan(DISK);
        // Writes recorded before the newest flush whose maps are on disk
        // (this call when it is a flush and its maps made it; an unanswered
        // flush promised nothing).
        const lastFlush = calls.slice(0, order === 0 ? c + 1 : c).map((k, i) => ({ k, i })).filter(({ k }) => k.kind === 'flush').pop();
        const covered = lastFlush === undefined ? 0 : calls[lastFlush.i]!.writes;
        await expectCoveredWritesKept(recovered, writes, covered, `sample ${sample} (call ${c}, op ${crashAt})`);
        checked++;
      } finally {
        await recovered.close({ seal: false });
      }
    }
    await tracker.close();
    expect(checked).toBe(SAMPLES);
  });
});

/** One log file's recorded history: writes and syncs, by the global operation count. */
interface LogOp { file: number; position: number; data: Buffer }
interface LogSync { file: number; coversBefore: number; doneAt: number }
/** The directory as a power loss at one moment leaves it: the small files' bytes, and which recorded log each log name is. */
interface DirState { files: Map<string, Buffer>; logs: Map<string, number> }

/**
 * Logs (active ones and the spares made ahead) across cuts: every write and
 * sync is recorded per file (a file keeps its number through renames, found
 * by inode), and before each operation the directory is snapshotted, so a
 * crash after any operation count has its names, maps, state and sidecars.
 */
class CutRecorder {
  readonly ops: LogOp[] = [];
  readonly syncs: LogSync[] = [];
  /** states[k]: the directory when k operations had been issued. */
  readonly states: DirState[] = [];
  private readonly inodes = new Map<number, number>();

  constructor(private readonly dir: string) {}

  snapshot(): DirState {
    const files = new Map<string, Buffer>();
    const logs = new Map<string, number>();
    for (const n of fs.readdirSync(this.dir)) {
      let st: fs.Stats;
      try {
        st = fs.statSync(path.join(this.dir, n));
      } catch {
        continue; // renamed or deleted meanwhile
      }
      const file = this.inodes.get(st.ino);
      if (file !== undefined) logs.set(n, file);
      else if (st.isFile()) files.set(n, fs.readFileSync(path.join(this.dir, n)));
    }
    return { files, logs };
  }

  private record(op: LogOp): void {
    this.states[this.ops.length] = this.snapshot();
    this.ops.push(op);
  }

  readonly open = async (p: string): Promise<HrlWriterFile> => {
    const fh = await fsp.open(p, 'wx+');
    const file = this.inodes.size;
    this.inodes.set((await fh.stat()).ino, file);
    return {
      write: (buffer: Buffer, offset: number, length: number, position: number) => {
        this.record({ file, position, data: Buffer.from(buffer.subarray(offset, offset + length)) });
        return fh.write(buffer, offset, length, position);
      },
      writev: (buffers: Buffer[], position: number) => {
        this.record({ file, position, data: Buffer.concat(buffers) });
        return fh.writev(buffers, position);
      },
      datasync: async () => {
        const coversBefore = this.ops.length;
        await fh.datasync();
        this.syncs.push({ file, coversBefore, doneAt: this.ops.length });
      },
      close: () => fh.close(),
    };
  };

  /** Log `file` after a power loss once `crashAt` operations were issued (see crashImage). */
  image(file: number, crashAt: number, rnd: () => number): Buffer {
    const synced = Math.max(0, ...this.syncs.filter((s) => s.file === file && s.doneAt <= crashAt).map((s) => s.coversBefore));
    const unit = rnd() < 0.5 ? SECTOR : PAGE;
    const image = new CrashImage();
    const apply = image.apply;
    for (let i = 0; i < crashAt; i++) {
      const op = this.ops[i]!;
      if (op.file !== file) continue;
      if (i < synced || rnd() >= 0.6) apply(op.position, op.data);
      else if (rnd() < 0.5) applyTornWrite(apply, op.position, op.data, unit, rnd);
    }
    return image.bytes;
  }
}

const CUT_SEEDS = [7, 1009, 31337];
const CUT_CALLS = 90;
const CUT_SAMPLES = 80;
/** Most writes issued beside one cut. */
const CUT_WRITES_MAX = 12;

describe('ChangeTracker under simulated power loss with cuts beside the writes', () => {
  it.each(CUT_SEEDS)('keeps every write recorded before the persisted maps in the logs or a resync extent, the crash inside a cut or not (seed %i)', async (seed) => {
    const dir = tempDir();
    const live = path.join(dir, 'live');
    fs.mkdirSync(live);
    const clock = new SimulatedClock();
    const rec = new CutRecorder(live);
    const rnd = prng(seed);
    const writes: { offset: number; length: number; data: Buffer }[] = [];
    // How many writes had completed when each maps slot content was encoded:
    // those are what a crash state holding that slot must keep.
    const coveredByMaps = new Map<string, number>();
    const mapsWrite = TrackerMapsWriter.prototype.write;
    const spy = vi.spyOn(TrackerMapsWriter.prototype, 'write').mockImplementation(async function (this: TrackerMapsWriter, maps, generation) {
      const covered = writes.length;
      await mapsWrite.call(this, maps, generation);
      for (const n of fs.readdirSync(live).filter((f) => f.startsWith('disk0.maps.'))) {
        const key = fs.readFileSync(path.join(live, n)).toString('base64');
        if (!coveredByMaps.has(key)) coveredByMaps.set(key, covered);
      }
    });
    let cuts = 0;
    let writesAfterSwitch = 0;
    /** Operations issued when each cut had ended: its maps name the new log's writes as pending. */
    const cutEnds: number[] = [];
    try {
      const tracker = await ChangeTracker.open({ dir: live, diskId: 'disk0', diskSizeBytes: DISK, metadataSizeBytes: 256, persistIntervalMs: 0, clock, openLogFile: rec.open, spareOnInjectedFiles: true, coalesceMinBytes: 1 });
      const oneWrite = async (c: number): Promise<void> => {
        const w = randomWrite(rnd, writes, c, 0.4);
        await tracker.recordWrite(w.offset, w.data);
        writes.push(w);
      };
      for (let c = 0; c < CUT_CALLS; c++) {
        const r = rnd();
        if (r < 0.15) await tracker.flush();
        else if (r < 0.35) {
          // The cut runs unawaited while writes go on: they pass it into the
          // next log while the old one seals (rotateHeld's switch window).
          if (tracker.status().activeLogEntries === 0) await oneWrite(c * 16 + 15);
          const entriesBefore = tracker.status().activeLogEntries;
          let done = false;
          const cutting = tracker.rotate().finally(() => { done = true; });
          // A write is only a memory append until the next flush: some go in
          // before the switch, the rest once the new log took the writes,
          // while the old one is synced and published.
          const switchAt = Math.floor(rnd() * 3);
          for (let i = 0; i < CUT_WRITES_MAX && !done; i++) {
            if (i === switchAt) {
              for (let spin = 0; spin < 10_000 && !done && tracker.status().activeLogEntries >= entriesBefore; spin++) await new Promise((r) => setImmediate(r));
            } else await new Promise((r) => setImmediate(r));
            const switched = tracker.status().activeLogEntries < entriesBefore;
            await oneWrite(c * 16 + i);
            if (!done && switched) writesAfterSwitch++;
          }
          await cutting;
          cutEnds.push(rec.ops.length);
          cuts++;
        } else await oneWrite(c * 8);
      }
      await tracker.close({ seal: false });
      rec.states[rec.ops.length] = rec.snapshot();
    } finally {
      spy.mockRestore();
    }
    expect(cuts).toBeGreaterThan(5);
    expect(writesAfterSwitch, 'writes into the new log while the old one was sealing').toBeGreaterThan(3);

    for (let sample = 0; sample < CUT_SAMPLES; sample++) {
      // Half the crashes just after a cut, before the new log's next flush
      // reaches its file (the writes passed into it are then only pending).
      const crashAt = sample % 2 === 0
        ? Math.min(rec.ops.length, cutEnds[Math.floor(rnd() * cutEnds.length)]! + Math.floor(rnd() * 3))
        : Math.floor(rnd() * (rec.ops.length + 1));
      const state = rec.states[crashAt]!;
      const crashDir = path.join(dir, `crash-${sample}`);
      fs.mkdirSync(crashDir);
      for (const [n, b] of state.files) fs.writeFileSync(path.join(crashDir, n), b);
      for (const [n, file] of state.logs) fs.writeFileSync(path.join(crashDir, n), rec.image(file, crashAt, rnd));
      const covered = Math.max(0, ...[...state.files].filter(([n]) => n.startsWith('disk0.maps.')).map(([, b]) => coveredByMaps.get(b.toString('base64')) ?? 0));

      const recovered = await ChangeTracker.open({ dir: crashDir, diskId: 'disk0', diskSizeBytes: DISK, metadataSizeBytes: 256, persistIntervalMs: 0, clock });
      try {
        await expectCoveredWritesKept(recovered, writes, covered, `seed ${seed} sample ${sample} (op ${crashAt} of ${rec.ops.length})`);
      } finally {
        await recovered.close({ seal: false });
      }
      fs.rmSync(crashDir, { recursive: true });
    }
  });
});
