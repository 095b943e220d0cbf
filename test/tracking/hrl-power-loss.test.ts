import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { HrlLogFile } from '../../src/tracking/hrl-reader';
import { recoverHrlLog } from '../../src/tracking/hrl-recovery';
import { HrlWriter, type HrlWriterFile } from '../../src/tracking/hrl-writer';
import { useTempDirs } from '../helpers/tmp';
import { applyTornWrite, CrashImage } from '../helpers/power-loss';

const tempDir = useTempDirs();
const SECTOR = 512;
const PAGE = 4096;

/** Records every write and sync instead of touching a disk. */
class RecordingFile implements HrlWriterFile {
  readonly ops: { position: number; data: Buffer }[] = [];
  /** ops.length at each datasync. */
  readonly syncs: number[] = [];

  async write(buffer: Buffer, offset: number, length: number, position: number): Promise<unknown> {
    this.ops.push({ position, data: Buffer.from(buffer.subarray(offset, offset + length)) });
    return undefined;
  }

  async writev(buffers: Buffer[], position: number): Promise<unknown> {
    this.ops.push({ position, data: Buffer.concat(buffers) });
    return undefined;
  }

  async datasync(): Promise<void> {
    this.syncs.push(this.ops.length);
  }

  async close(): Promise<void> {}
}

function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

/**
 * What a power loss after `crashAt` operations may leave: every operation
 * before the last completed sync, plus any subset of the later ones, each
 * possibly torn: any subset of the 512-byte sectors (or, for page-cache
 * writeback, 4096-byte pages) it touches reached the disk, counted at
 * absolute file positions, so a small write across a boundary can tear too.
 */
function crashImage(file: RecordingFile, crashAt: number, rnd: () => number): Buffer {
  const synced = Math.max(0, ...file.syncs.filter((s) => s <= crashAt));
  const unit = rnd() < 0.5 ? SECTOR : PAGE;
  const image = new CrashImage();
  const apply = image.apply;
  for (let i = 0; i < crashAt; i++) {
    const op = file.ops[i]!;
    if (i < synced) apply(op.position, op.data);
    else if (rnd() < 0.6) {
      if (rnd() >= 0.4) {
        apply(op.position, op.data);
        continue;
      }
      applyTornWrite(apply, op.position, op.data, unit, rnd);
    }
  }
  return image.bytes;
}

async function entriesOf(file: string): Promise<string[]> {
  const log = await HrlLogFile.open(file);
  try {
    const v = await log.verify();
    const out: string[] = [];
    for await (const e of log.entries(v)) out.push(`${e.byteOffset}:${(await log.readPayload(e, 0, e.dataLength)).toString('hex')}`);
    return out;
  } finally {
    await log.close();
  }
}

describe('HrlWriter under simulated power loss', () => {
  it('recovers every write flushed before the loss and nothing that was not written, for any subset of torn unsynced writes', async () => {
    const dir = tempDir();
    const recording = new RecordingFile();
    const w = await HrlWriter.create(path.join(dir, 'recorded.hrl'), { metadataSizeBytes: 256, stagingBytes: 2048, openFile: async () => recording });
    const appended: string[] = [];
    /** [ops.length at the flush's datasync, appends made durable by it] */
    const flushes: [number, number][] = [];
    const rndW = prng(99);
    for (let i = 0; i < 80; i++) {
      const data = Buffer.alloc(100 + Math.floor(rndW() * 1500), (i * 13 + 1) & 0xff);
      data.writeUInt32LE(i, 0);
      await w.append(i * 4096, data);
      appended.push(`${i * 4096}:${data.toString('hex')}`);
      if (rndW() < 0.2) {
        await w.flush();
        flushes.push([recording.syncs[recording.syncs.length - 1]!, appended.length]);
      }
    }
    expect(flushes.length).toBeGreaterThan(5);

    const rnd = prng(7);
    let images = 0;
    for (let round = 0; round < 400; round++) {
      const crashAt = 1 + Math.floor(rnd() * recording.ops.length);
      const image = crashImage(recording, crashAt, rnd);
      const guaranteed = Math.max(0, ...flushes.filter(([syncAt]) => syncAt <= crashAt).map(([, n]) => n));
      const file = path.join(dir, `crash-${round}.hrl`);
      fs.writeFileSync(file, image);
      if (image.length < 4096) continue; // the header itself never reached the disk: nothing was flushed
      const rec = await recoverHrlLog(file);
      const got = await entriesOf(file);
      expect(rec.entryCount).toBe(got.length);
      // Everything flushed is there, and what is there is exactly a prefix of what was appended.
      expect(got.length, `crash after op ${crashAt}`).toBeGreaterThanOrEqual(guaranteed);
      expect(got).toEqual(appended.slice(0, got.length));
      fs.rmSync(file);
      images++;
    }
    expect(images).toBeGreaterThan(300);
  });

  it('keeps every flushed write as the final state of its bytes or in a torn entry when exact overwrites are rewritten in place, and cuts nothing below the last completed flush', async () => {
    const dir = tempDir();
    const recording = new RecordingFile();
    const w = await HrlWriter.create(path.join(dir, 'recorded.hrl'), { metadataSizeBytes: 256, stagingBytes: 2048, coalesceOverwrites: true, openFile: async () => recording });
    const appended: { offset: number; data: Buffer }[] = [];
    /** [ops.length at the flush's datasync, appends made durable by it, the durable end it reached] */
    const flushes: [number, number, number][] = [];
    const rndW = prng(2024);
    for (let i = 0; i < 120; i++) {
      // Half the writes hit the exact extent of an earlier one.
      const again = appended.length > 0 && rndW() < 0.5 ? appended[Math.floor(rndW() * appended.length)]! : undefined;
      const data = Buffer.alloc(again?.data.length ?? 100 + Math.floor(rndW() * 1500), (i * 13 + 1) & 0xff);
      data.writeUInt32LE(i, 0);
      const offset = again?.offset ?? i * 4096;
      await w.append(offset, data);
      appended.push({ offset, data });
      if (rndW() < 0.2) {
        await w.flush();
        flushes.push([recording.syncs[recording.syncs.length - 1]!, appended.length, w.durableEndBytes]);
      }
    }
    expect(flushes.length).toBeGreaterThan(10);
    expect(w.rewriteCount).toBeGreaterThan(20);
    // Rewrites reached the file as positional writes (a 32-byte entry each), not only in memory.
    expect(recording.ops.filter((o) => o.data.length === 32).length).toBeGreaterThan(10);

    const rnd = prng(77);
    let images = 0;
    let tornSeen = 0;
    for (let round = 0; round < 400; round++) {
      const crashAt = 1 + Math.floor(rnd() * recording.ops.length);
      const image = crashImage(recording, crashAt, rnd);
      if (image.length < 4096) continue;
      const done = flushes.filter(([syncAt]) => syncAt <= crashAt).pop();
      const [guaranteed, bound] = done === undefined ? [0, 0] : [done[1], done[2]];
      const file = path.join(dir, `crash-${round}.hrl`);
      fs.writeFileSync(file, image);
      // The bound a caller keeps beside the log: the end its last completed flush made durable.
      const rec = await recoverHrlLog(file, { rewritableBelowBytes: bound });
      expect(rec.durableEndBytes, `crash after op ${crashAt}`).toBeGreaterThanOrEqual(bound);
      tornSeen += rec.tornEntries.length;
      const torn = new Set(rec.tornEntries.map((t) => t.entryFileOffset));
      const state = Buffer.alloc(120 * 4096);
      const written = new Uint8Array(state.length);
      const inTorn = new Uint8Array(state.length);
      const log = await HrlLogFile.open(file);
      try {
        const v = await log.verify();
        for await (const e of log.entries(v)) {
          const data = await log.readPayload(e, 0, e.dataLength);
          if (torn.has(e.entryFileOffset)) inTorn.fill(1, e.byteOffset, e.byteOffset + e.dataLength);
          // Nothing that was not written: an entry that is not torn holds one of the writes of its extent.
          else expect(appended.some((a) => a.offset === e.byteOffset && a.data.equals(data)), `round ${round}: entry at ${e.byteOffset}`).toBe(true);
          data.copy(state, e.byteOffset);
          written.fill(1, e.byteOffset, e.byteOffset + e.dataLength);
        }
      } finally {
        await log.close();
      }
      for (let i = 0; i < guaranteed; i++) {
        const { offset, data } = appended[i]!;
        for (let at = offset; at < offset + data.length; at++) {
          if (inTorn[at] === 1) continue;
          let ok = false;
          for (let j = i; !ok && j < appended.length; j++) {
            const a = appended[j]!;
            ok = a.offset <= at && at < a.offset + a.data.length && written[at] === 1 && state[at] === a.data[at - a.offset];
          }
          if (!ok) throw new Error(`round ${round}, crash after op ${crashAt}: byte ${at} of flushed write ${i} is neither its nor a later write's, and in no torn entry`);
        }
      }
      fs.rmSync(file);
      images++;
    }
    expect(images).toBeGreaterThan(300);
    expect(tornSeen).toBeGreaterThan(0);
  });

  it('seals a scratch file with one sync after its header, and a log in place with the payloads synced before the header', async () => {
    const dir = tempDir();
    const sealWith = async (scratchUntilSealed: boolean): Promise<RecordingFile> => {
      const recording = new RecordingFile();
      const w = await HrlWriter.create(path.join(dir, `${scratchUntilSealed ? 'scratch' : 'placed'}.hrl`), { metadataSizeBytes: 256, stagingBytes: 2048, coalesceOverwrites: false, scratchUntilSealed, openFile: async () => recording });
      for (let i = 0; i < 40; i++) await w.append(i * 4096, Buffer.alloc(1024 + i * 64, i + 1));
      await w.seal();
      return recording;
    };
    const scratch = await sealWith(true);
    // One sync, after every write: the header (written at 0 by the seal, last) is in it.
    expect(scratch.syncs).toEqual([scratch.ops.length]);
    expect(scratch.ops[scratch.ops.length - 1]!.position).toBe(0);
    // What that sync made durable is the whole sealed log: the image a rename then publishes.
    const image = crashImage(scratch, scratch.ops.length, prng(7));
    const file = path.join(dir, 'scratch-image.hrl');
    fs.writeFileSync(file, image);
    const entries = await entriesOf(file);
    expect(entries).toHaveLength(40);
    expect(entries[39]).toBe(`${39 * 4096}:${Buffer.alloc(1024 + 39 * 64, 40).toString('hex')}`);
    const placed = await sealWith(false);
    // In place, the header must not be durable before what it claims: a sync right before it, one after.
    const headerAt = placed.ops.length - 1;
    expect(placed.ops[headerAt]!.position).toBe(0);
    expect(placed.syncs.slice(-2)).toEqual([headerAt, headerAt + 1]);
  });

  it('syncs on flush only when something was written since the last sync', async () => {
    const recording = new RecordingFile();
    const w = await HrlWriter.create(path.join(tempDir(), 'idle.hrl'), { openFile: async () => recording });
    const afterCreate = recording.syncs.length;
    await w.flush();
    expect(recording.syncs.length).toBe(afterCreate);
    await w.append(0, Buffer.alloc(512, 1));
    await w.flush();
    await w.flush();
    expect(recording.syncs.length).toBe(afterCreate + 1);
  });
});
