import { afterEach, describe, expect, it } from 'vitest';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import type { AllocationExtent, DiskTarget } from '../../src/targets/disk-target';
import { prng as seededRandom } from '../helpers/prng';

/**
 * The one conformance suite every DiskTarget runs (raw, VMDK sparse and flat,
 * VHD, page blob, NBD). Call it at the top level of a test file:
 *
 * ```ts
 * runConformanceSuite('vmdk sparse', {
 *   create: (sizeBytes) => openDisk(`vmdk:${dir()}/d.vmdk`, { create: { sizeBytes } }),
 *   reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
 * });
 * ```
 *
 * `create` makes a fresh, empty disk of `sizeBytes` (a multiple of 1 MiB);
 * `reopen` opens the disk that `closed` named again after it was closed. The
 * suite closes every target it is handed.
 *
 * What it holds every target to (the DiskTarget contract):
 * - a new disk reads as zeroes; random writes, zero ranges and discards read
 *   back as an in-memory model says, before and after flush, close and reopen;
 * - requests past the end, negative or fractional, are refused with
 *   BR_TARGET_OUT_OF_RANGE, and requests off `capabilities.alignmentBytes`
 *   (reads included) with BR_TARGET_UNALIGNED, changing nothing;
 * - extents() covers the asked range in order without gaps or overlaps and
 *   every zero extent reads as zeroes;
 * - close() is idempotent and any later request is refused with a coded error;
 * - a read-only open refuses write, writeZeroes and discard with
 *   BR_TARGET_READ_ONLY and still reads.
 */
export interface ConformanceFactory {
  create(sizeBytes: number): Promise<DiskTarget>;
  reopen(closed: DiskTarget, options: { readOnly: boolean }): Promise<DiskTarget>;
}

export interface ConformanceOptions {
  /** Disk size for the suite; default 8 MiB. */
  sizeBytes?: number;
  /** Random operations in the model test; default 300. */
  operations?: number;
  /** Largest single random write; default 1 MiB. */
  maxWriteBytes?: number;
  seed?: number;
}

export { seededRandom };

function randomBytes(rand: () => number, length: number): Buffer {
  const out = Buffer.alloc(length);
  let i = 0;
  for (; i + 4 <= length; i += 4) out.writeUInt32LE((rand() * 4294967296) >>> 0, i);
  for (; i < length; i++) out[i] = (rand() * 256) >>> 0;
  return out;
}

async function expectCode(promise: Promise<unknown> | (() => unknown), code: string): Promise<void> {
  let caught: unknown;
  try {
    await (typeof promise === 'function' ? promise() : promise);
  } catch (err) {
    caught = err;
  }
  expect(caught, `expected a ${code} error`).toBeInstanceOf(BlockrelayError);
  expect((caught as BlockrelayError).code).toBe(code);
}

async function collect(it: AsyncIterable<AllocationExtent>): Promise<AllocationExtent[]> {
  const out: AllocationExtent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

/** Reads the whole disk in bounded pieces and compares it with the model. */
async function expectMatchesModel(target: DiskTarget, model: Buffer): Promise<void> {
  const pieceBytes = 4 * 1024 * 1024;
  for (let at = 0; at < model.length; at += pieceBytes) {
    const n = Math.min(pieceBytes, model.length - at);
    const got = await target.read(at, n);
    if (!got.equals(model.subarray(at, at + n))) {
      let first = 0;
      while (got[first] === model[at + first]) first++;
      expect.fail(`disk differs from the model at byte ${at + first}`);
    }
  }
}

async function checkExtents(target: DiskTarget, offset: number, length: number): Promise<void> {
  const extents = await collect(target.extents(offset, length));
  let at = offset;
  for (const e of extents) {
    expect(e.offset, 'extents are contiguous and in order').toBe(at);
    expect(e.length).toBeGreaterThan(0);
    if (e.zero) {
      const data = await target.read(e.offset, e.length);
      expect(data.equals(Buffer.alloc(e.length)), `zero extent at ${e.offset} reads as zeroes`).toBe(true);
    }
    at += e.length;
  }
  expect(at, 'extents cover the range').toBe(offset + length);
}

export function runConformanceSuite(name: string, factory: ConformanceFactory, options: ConformanceOptions = {}): void {
  const sizeBytes = options.sizeBytes ?? 8 * 1024 * 1024;
  const operations = options.operations ?? 300;
  const maxWriteBytes = options.maxWriteBytes ?? 1024 * 1024;
  const seed = options.seed ?? 0x5eed;

  describe(`DiskTarget conformance: ${name}`, () => {
    const opened: DiskTarget[] = [];
    const track = (t: DiskTarget): DiskTarget => {
      opened.push(t);
      return t;
    };
    afterEach(async () => {
      for (const t of opened.splice(0)) await t.close();
    });

    it('creates a disk of the asked size that reads as zeroes', async () => {
      const t = track(await factory.create(sizeBytes));
      expect(t.sizeBytes).toBe(sizeBytes);
      expect(t.capabilities.readOnly).toBe(false);
      const align = t.capabilities.alignmentBytes;
      expect(Number.isInteger(Math.log2(align)), 'alignment is a power of two').toBe(true);
      await expectMatchesModel(t, Buffer.alloc(sizeBytes));
      await checkExtents(t, 0, sizeBytes);
    });

    it('reads back random writes, zero ranges and discards as the model says, before and after reopen', async () => {
      const rand = seededRandom(seed);
      const model = Buffer.alloc(sizeBytes);
      let t = track(await factory.create(sizeBytes));
      const align = t.capabilities.alignmentBytes;
      const unit = Math.max(align, 512);
      const pick = (maxBytes: number): { offset: number; length: number } => {
        const length = unit * (1 + Math.floor(rand() * (maxBytes / unit)));
        const offset = align * Math.floor(rand() * ((sizeBytes - length) / align + 1));
        return { offset, length: Math.min(length, sizeBytes - offset) };
      };
      for (let i = 0; i < operations; i++) {
        const r = rand();
        if (r < 0.7) {
          const { offset, length } = pick(maxWriteBytes);
          const data = randomBytes(rand, length);
          await t.write(offset, data);
          data.copy(model, offset);
        } else if (r < 0.85) {
          const { offset, length } = pick(maxWriteBytes * 2);
          await t.writeZeroes(offset, length);
          model.fill(0, offset, offset + length);
        } else if (r < 0.95) {
          const { offset, length } = pick(maxWriteBytes * 2);
          await t.discard(offset, length);
          model.fill(0, offset, offset + length);
        } else {
          const { offset, length } = pick(maxWriteBytes);
          const got = await t.read(offset, length);
          expect(got.equals(model.subarray(offset, offset + length)), `read at ${offset} length ${length} after op ${i}`).toBe(true);
        }
        if (i === Math.floor(operations / 2)) await t.flush();
      }
      await expectMatchesModel(t, model);
      await checkExtents(t, 0, sizeBytes);
      await t.flush();
      await t.close();
      t = track(await factory.reopen(t, { readOnly: false }));
      expect(t.sizeBytes).toBe(sizeBytes);
      await expectMatchesModel(t, model);
      // Writes after a reopen land on a disk that already holds data.
      const data = randomBytes(rand, unit * 3);
      await t.write(unit * 5, data);
      data.copy(model, unit * 5);
      await t.close();
      t = track(await factory.reopen(t, { readOnly: true }));
      await expectMatchesModel(t, model);
    });

    it('keeps writes at the very first and last bytes of the disk', async () => {
      let t = track(await factory.create(sizeBytes));
      const unit = Math.max(t.capabilities.alignmentBytes, 512);
      await t.write(0, Buffer.alloc(unit, 0xa1));
      await t.write(sizeBytes - unit, Buffer.alloc(unit, 0xb2));
      await t.close();
      t = track(await factory.reopen(t, { readOnly: true }));
      expect((await t.read(0, unit)).equals(Buffer.alloc(unit, 0xa1))).toBe(true);
      expect((await t.read(sizeBytes - unit, unit)).equals(Buffer.alloc(unit, 0xb2))).toBe(true);
      expect((await t.read(unit, unit)).equals(Buffer.alloc(unit))).toBe(true);
    });

    it('reports extents that cover any range in order and whose zero extents read as zeroes', async () => {
      const t = track(await factory.create(sizeBytes));
      const unit = Math.max(t.capabilities.alignmentBytes, 512);
      await t.write(unit * 128, Buffer.alloc(unit * 4, 7));
      await t.write(sizeBytes / 2, Buffer.alloc(unit * 300, 9));
      await t.writeZeroes(sizeBytes / 2 + unit * 10, unit * 20);
      await checkExtents(t, 0, sizeBytes);
      await checkExtents(t, unit * 127, unit * 7);
      await checkExtents(t, sizeBytes / 2 - unit, unit * 50);
      expect(await collect(t.extents(unit, 0))).toEqual([]);
    });

    it('refuses out-of-range and unaligned requests with coded errors and changes nothing', async () => {
      const t = track(await factory.create(sizeBytes));
      const align = t.capabilities.alignmentBytes;
      const unit = Math.max(align, 512);
      await t.write(0, Buffer.alloc(unit, 0x33));
      const block = Buffer.alloc(unit, 0xee);
      await expectCode(t.read(sizeBytes - unit, unit * 2), 'BR_TARGET_OUT_OF_RANGE');
      await expectCode(t.read(sizeBytes, unit), 'BR_TARGET_OUT_OF_RANGE');
      await expectCode(t.read(-unit, unit), 'BR_TARGET_OUT_OF_RANGE');
      await expectCode(t.write(sizeBytes - unit, Buffer.alloc(unit * 2)), 'BR_TARGET_OUT_OF_RANGE');
      await expectCode(t.write(sizeBytes, block), 'BR_TARGET_OUT_OF_RANGE');
      await expectCode(t.write(-unit, block), 'BR_TARGET_OUT_OF_RANGE');
      await expectCode(t.write(0.5, block), 'BR_TARGET_OUT_OF_RANGE');
      await expectCode(t.writeZeroes(sizeBytes - unit, unit * 2), 'BR_TARGET_OUT_OF_RANGE');
      await expectCode(t.discard(0, sizeBytes + unit), 'BR_TARGET_OUT_OF_RANGE');
      await expectCode(collect(t.extents(0, sizeBytes + unit)), 'BR_TARGET_OUT_OF_RANGE');
      if (align > 1) {
        await expectCode(t.write(1, block), 'BR_TARGET_UNALIGNED');
        await expectCode(t.write(0, Buffer.alloc(align + 1)), 'BR_TARGET_UNALIGNED');
        await expectCode(t.writeZeroes(align / 2, align), 'BR_TARGET_UNALIGNED');
        await expectCode(t.discard(0, align - 1), 'BR_TARGET_UNALIGNED');
        await expectCode(t.read(1, align), 'BR_TARGET_UNALIGNED');
      }
      const model = Buffer.alloc(sizeBytes);
      model.fill(0x33, 0, unit);
      await expectMatchesModel(t, model);
    });

    it('closes idempotently and refuses requests after close', async () => {
      const t = await factory.create(sizeBytes);
      await t.close();
      await t.close();
      let caught: unknown;
      try {
        await t.read(0, 512);
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(BlockrelayError);
      expect((caught as BlockrelayError).code).toMatch(/^BR_/);
    });

    it('refuses writes when opened read-only and still reads', async () => {
      let t = track(await factory.create(sizeBytes));
      const unit = Math.max(t.capabilities.alignmentBytes, 512);
      await t.write(unit, Buffer.alloc(unit, 0x5a));
      await t.close();
      t = track(await factory.reopen(t, { readOnly: true }));
      expect(t.capabilities.readOnly).toBe(true);
      await expectCode(t.write(0, Buffer.alloc(unit, 1)), 'BR_TARGET_READ_ONLY');
      await expectCode(t.writeZeroes(0, unit), 'BR_TARGET_READ_ONLY');
      await expectCode(t.discard(0, unit), 'BR_TARGET_READ_ONLY');
      expect((await t.read(unit, unit)).equals(Buffer.alloc(unit, 0x5a))).toBe(true);
      expect((await t.read(0, unit)).equals(Buffer.alloc(unit))).toBe(true);
    });
  });
}
