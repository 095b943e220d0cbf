import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { HrlLogFile } from '../../src/tracking/hrl-reader';
import type { HrlWriterFile } from '../../src/tracking/hrl-writer';
import { useTempDirs } from '../helpers/tmp';
import { applyTornWrite } from '../helpers/power-loss';

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
  let image = Buffer.alloc(0);
  const apply = (position: number, data: Buffer): void => {
    if (position + data.length > image.length) image = Buffer.concat([image, Buffer.alloc(position + data.length - image.length)]);
    data.copy(image, position);
  };
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
  return image;
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
        // Often the exact extent of an earlier write: the writer rewrites its entry in place.
        const again = writes.length > 0 && rnd() < 0.5 ? writes[Math.floor(rnd() * writes.length)]! : undefined;
        // Some lengths are not a multiple of 32, so later metadata blocks (and
        // their entries) sit at unaligned file positions.
        const length = again?.length ?? (rnd() < 0.2 ? 100 + Math.floor(rnd() * 900) : SECTOR * (1 + Math.floor(rnd() * 6)));
        const offset = again?.offset ?? Math.floor(rnd() * (DISK / SECTOR - 8)) * SECTOR;
        const data = Buffer.alloc(length, (c * 7 + 1) & 0xff);
        data.writeUInt32LE(c, 0);
        await tracker.recordWrite(offset, data);
        writes.push({ offset, length, data });
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
        const { image, written } = await recoveredState(recovered);
        const resync = [...recovered.resyncExtents()];
        const inResync = (at: number): boolean => resync.some((e) => e.offset <= at && at < e.offset + e.length);
        // Writes recorded before the newest flush whose maps are on disk
        // (this call when it is a flush and its maps made it; an unanswered
        // flush promised nothing).
        const lastFlush = calls.slice(0, order === 0 ? c + 1 : c).map((k, i) => ({ k, i })).filter(({ k }) => k.kind === 'flush').pop();
        const covered = lastFlush === undefined ? 0 : calls[lastFlush.i]!.writes;
        // Each byte of such a write reads, in the recovered logs, as that
        // write or a later one left it (a later write may or may not have
        // survived), unless it is in a resync extent.
        for (let w = 0; w < covered; w++) {
          const { offset, length } = writes[w]!;
          for (let at = offset; at < offset + length; at++) {
            let ok = written[at] === 1 && image[at] === writes[w]!.data[at - offset];
            for (let v = w + 1; !ok && v < writes.length; v++) {
              const later = writes[v]!;
              if (later.offset <= at && at < later.offset + later.length && written[at] === 1 && image[at] === later.data[at - later.offset]) ok = true;
            }
            if (!ok && !inResync(at)) throw new Error(`sample ${sample} (call ${c}, op ${crashAt}): byte ${at} of write ${w} [${offset}, +${length}) is neither that write's nor a later one's in the recovered logs, and in no resync extent`);
          }
        }
        checked++;
      } finally {
        await recovered.close({ seal: false });
      }
    }
    await tracker.close();
    expect(checked).toBe(SAMPLES);
  });
});
