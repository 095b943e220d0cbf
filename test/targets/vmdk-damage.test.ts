import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { openDisk } from '../../src/targets/disk-spec';
import { parseDescriptor } from '../../src/targets/vmdk/vmdk-descriptor';
import { HDR } from '../../src/targets/vmdk/vmdk-format';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { seededRandom } from './conformance';

const tempDir = useTempDirs();
const MiB = 1024 * 1024;

/** A small sparse VMDK with three grains of data; returns its path and bytes. */
async function makeImage(dir: string, name = 'd.vmdk'): Promise<{ file: string; bytes: Buffer }> {
  const file = path.join(dir, name);
  const t = await openDisk(`vmdk:${file}`, { create: { sizeBytes: MiB } });
  await t.write(0, Buffer.alloc(4096, 1));
  await t.write(512 * 1024, Buffer.alloc(64 * 1024, 2));
  await t.write(MiB - 512, Buffer.alloc(512, 3));
  await t.close();
  return { file, bytes: fs.readFileSync(file) };
}

function gtSector(bytes: Buffer): number {
  const gd = Number(bytes.readBigUInt64LE(HDR.gdOffset));
  return bytes.readUInt32LE(gd * 512);
}

/** Opens for writing and reads everything; returns the coded error, asserting the file was not written. */
async function expectRefused(spec: string, file: string, code = 'BR_TARGET_CORRUPT'): Promise<BlockrelayError> {
  const before = fs.readFileSync(file);
  let caught: unknown;
  try {
    const t = await openDisk(spec);
    try {
      await t.read(0, t.sizeBytes);
    } finally {
      await t.close();
    }
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(BlockrelayError);
  expect((caught as BlockrelayError).code).toBe(code);
  expect(fs.readFileSync(file).equals(before), 'a refused image is never written').toBe(true);
  return caught as BlockrelayError;
}

describe('damaged VMDK inputs', () => {
  it('refuses a bad magic with BR_TARGET_CORRUPT at byte offset 0', async () => {
    const { file, bytes } = await makeImage(tempDir());
    bytes[0] = 0x58;
    fs.writeFileSync(file, bytes);
    const err = await expectRefused(`vmdk:${file}`, file);
    expect(err.message).toMatch(/bad magic/);
    expect(err.details.byteOffset).toBe(0);
  });

  it('refuses a grain table entry pointing past the end of the file, naming the entry offset', async () => {
    const { file, bytes } = await makeImage(tempDir());
    const gt = gtSector(bytes);
    bytes.writeUInt32LE(bytes.length / 512 + 1000, gt * 512 + 8 * 4);
    fs.writeFileSync(file, bytes);
    const err = await expectRefused(`vmdk:${file}`, file);
    expect(err.details.byteOffset).toBe(gt * 512 + 8 * 4);
    expect(err.message).toMatch(/past the end/);
  });

  it('refuses a grain table entry pointing into the metadata', async () => {
    const { file, bytes } = await makeImage(tempDir());
    bytes.writeUInt32LE(2, gtSector(bytes) * 512 + 4);
    fs.writeFileSync(file, bytes);
    await expectRefused(`vmdk:${file}`, file);
  });

  it('refuses a grain directory entry pointing past the end of the file', async () => {
    const { file, bytes } = await makeImage(tempDir());
    bytes.writeUInt32LE(0x7fffffff, Number(bytes.readBigUInt64LE(HDR.gdOffset)) * 512);
    fs.writeFileSync(file, bytes);
    await expectRefused(`vmdk:${file}`, file);
  });

  it('refuses directory and table entries that would make a flush overwrite the header, descriptor or directories', async () => {
    const dir = tempDir();
    const a = await makeImage(dir, 'a.vmdk');
    a.bytes.writeUInt32LE(1, Number(a.bytes.readBigUInt64LE(HDR.gdOffset)) * 512); // GT 0 "at" the descriptor
    fs.writeFileSync(a.file, a.bytes);
    expect((await expectRefused(`vmdk:${a.file}`, a.file)).message).toMatch(/header, descriptor or a directory|disagree/);
    const b = await makeImage(dir, 'b.vmdk');
    b.bytes.writeBigUInt64LE(0n, HDR.overHead);
    b.bytes.writeUInt32LE(1, gtSector(b.bytes) * 512 + 4 * 4); // a grain at sector 1
    fs.writeFileSync(b.file, b.bytes);
    expect((await expectRefused(`vmdk:${b.file}`, b.file)).message).toMatch(/into the metadata/);
    const c = await makeImage(dir, 'c.vmdk');
    c.bytes.writeUInt32LE(0, Number(c.bytes.readBigUInt64LE(HDR.rgdOffset)) * 512); // RGD lost GT 0, GD still has it
    fs.writeFileSync(c.file, c.bytes);
    expect((await expectRefused(`vmdk:${c.file}`, c.file)).message).toMatch(/disagree/);
  });

  it('refuses a file truncated inside the metadata and one truncated inside a grain', async () => {
    const dir = tempDir();
    const { file, bytes } = await makeImage(dir);
    fs.writeFileSync(file, bytes.subarray(0, 20 * 1024));
    expect((await expectRefused(`vmdk:${file}`, file)).message).toMatch(/truncated|outside/);
    fs.writeFileSync(file, bytes.subarray(0, bytes.length - 1000));
    await expectRefused(`vmdk:${file}`, file);
    fs.writeFileSync(file, bytes.subarray(0, 100));
    await expectRefused(`vmdk:${file}`, file);
  });

  it('refuses a damaged embedded descriptor and damaged newline-detection bytes', async () => {
    const dir = tempDir();
    const { file, bytes } = await makeImage(dir);
    const desc = bytes.indexOf('CID=');
    bytes.write('CID=zz', desc, 'latin1');
    fs.writeFileSync(file, bytes);
    const err = await expectRefused(`vmdk:${file}`, file);
    expect(err.message).toMatch(/CID/);
    const good = (await makeImage(dir, 'e.vmdk'));
    good.bytes[HDR.doubleEndLineChar1] = 0x0a;
    fs.writeFileSync(good.file, good.bytes);
    await expectRefused(`vmdk:${good.file}`, good.file);
  });

  it('refuses an unclean image whose grain table is damaged without clearing its unclean flag', async () => {
    const { file, bytes } = await makeImage(tempDir());
    bytes[HDR.uncleanShutdown] = 1;
    bytes.writeUInt32LE(0xfffffff0, gtSector(bytes) * 512);
    fs.writeFileSync(file, bytes);
    await expectRefused(`vmdk:${file}`, file);
    expect(fs.readFileSync(file)[HDR.uncleanShutdown]).toBe(1);
  });

  it('refuses a flat VMDK whose data file is truncated, and a garbage descriptor', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'f.vmdk');
    const t = await openDisk(`vmdk-flat:${file}`, { create: { sizeBytes: MiB } });
    await t.close();
    fs.truncateSync(path.join(dir, 'f-flat.vmdk'), MiB - 512);
    await expectRefused(`vmdk:${file}`, file);
    fs.writeFileSync(file, '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 2048 FLAT\n');
    const err = await expectRefused(`vmdk:${file}`, file);
    expect(err.message).toMatch(/names no file/);
  });

  it('refuses compressed grains without markers and unknown createTypes as unsupported', async () => {
    const dir = tempDir();
    const { file, bytes } = await makeImage(dir);
    bytes.writeUInt32LE(bytes.readUInt32LE(HDR.flags) | (1 << 16), HDR.flags);
    bytes.writeUInt16LE(1, HDR.compressAlgorithm);
    fs.writeFileSync(file, bytes);
    await expectRefused(`vmdk:${file}`, file, 'BR_TARGET_UNSUPPORTED');
    const desc = path.join(dir, 'split.vmdk');
    fs.writeFileSync(desc, '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="vmfsSparse"\nRW 2048 VMFSSPARSE "split-delta.vmdk"\n');
    await expectRefused(`vmdk:${desc}`, desc, 'BR_TARGET_UNSUPPORTED');
  });

  it.skipIf(!requireTool('qemu-img'))('refuses damaged compressed grains and footers of streamOptimized images', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'r.img');
    fs.writeFileSync(raw, Buffer.concat([Buffer.alloc(64 * 1024, 0x41), Buffer.alloc(MiB - 64 * 1024)]));
    const vmdk = path.join(dir, 's.vmdk');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, vmdk]);
    const good = fs.readFileSync(vmdk);
    const gtSectorOfStream = good.readUInt32LE(Number(good.readBigUInt64LE(HDR.gdOffset)) * 512);
    const grainAt = good.readUInt32LE(gtSectorOfStream * 512) * 512;
    const readAllRo = async (): Promise<BlockrelayError> => {
      let caught: unknown;
      try {
        const t = await openDisk(`vmdk:${vmdk}`, { readOnly: true });
        try {
          await t.read(0, t.sizeBytes);
        } finally {
          await t.close();
        }
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(BlockrelayError);
      return caught as BlockrelayError;
    };
    const wrongLba = Buffer.from(good);
    wrongLba.writeBigUInt64LE(128n, grainAt);
    fs.writeFileSync(vmdk, wrongLba);
    expect(await readAllRo()).toMatchObject({ code: 'BR_TARGET_CORRUPT', details: { byteOffset: grainAt } });
    const badDeflate = Buffer.from(good);
    badDeflate.fill(0x5a, grainAt + 12, grainAt + 40);
    fs.writeFileSync(vmdk, badDeflate);
    expect(await readAllRo()).toMatchObject({ code: 'BR_TARGET_CORRUPT', details: { byteOffset: grainAt + 12 } });
    const noFooter = Buffer.from(good);
    noFooter.writeBigUInt64LE(0xffffffffffffffffn, HDR.gdOffset);
    fs.writeFileSync(vmdk, noFooter);
    expect((await readAllRo()).message).toMatch(/footer marker is missing/);
  });

  it('survives seeded random corruption of header, descriptor and tables: only coded errors, never a crash or a write', async () => {
    const dir = tempDir();
    const { bytes } = await makeImage(dir, 'seed.vmdk');
    fs.rmSync(path.join(dir, 'seed.vmdk'));
    const file = path.join(dir, 'fuzz.vmdk');
    const gd = Number(bytes.readBigUInt64LE(HDR.gdOffset));
    const rgd = Number(bytes.readBigUInt64LE(HDR.rgdOffset));
    const regions: Array<[number, number]> = [
      [0, 512], // header
      [512, 1024], // descriptor
      [rgd * 512, 512 * 6], // RGD + its GT
      [gd * 512, 512 * 6], // GD + its GT
    ];
    const rand = seededRandom(0xf022);
    const deadline = Date.now() + 15_000;
    const codes = new Map<string, number>();
    let iterations = 0;
    for (; iterations < 2000 && Date.now() < deadline; iterations++) {
      const mutated = Buffer.from(bytes);
      const flips = 1 + Math.floor(rand() * 4);
      for (let k = 0; k < flips; k++) {
        const [start, len] = regions[Math.floor(rand() * regions.length)]!;
        const at = start + Math.floor(rand() * len);
        const r = rand();
        if (r < 0.5) mutated[at] = (rand() * 256) | 0;
        else if (r < 0.8) mutated.writeUInt32LE((rand() * 4294967296) >>> 0, Math.min(at - (at % 4), mutated.length - 4));
        else mutated[at] ^= 1 << Math.floor(rand() * 8);
      }
      const truncated = rand() < 0.1 ? mutated.subarray(0, Math.floor(rand() * mutated.length)) : mutated;
      fs.writeFileSync(file, truncated);
      let outcome = 'ok';
      try {
        const t = await openDisk(`vmdk:${file}`, { readOnly: true });
        try {
          // A mutated capacity can claim up to 2 TiB: read only the start so an iteration stays bounded.
          const span = Math.min(t.sizeBytes, 2 * MiB);
          for (let at = 0; at < span; at += 256 * 1024) await t.read(at, Math.min(256 * 1024, span - at));
          for await (const e of t.extents(0, span)) expect(e.length).toBeGreaterThan(0);
        } finally {
          await t.close();
        }
      } catch (err) {
        if (!(err instanceof BlockrelayError)) throw new Error(`iteration ${iterations}: uncoded failure ${(err as Error)?.stack}`);
        outcome = err.code;
      }
      codes.set(outcome, (codes.get(outcome) ?? 0) + 1);
      expect(fs.readFileSync(file).equals(truncated), 'read-only open never writes').toBe(true);
    }
    expect(iterations).toBeGreaterThan(200);
    expect(codes.get('BR_TARGET_CORRUPT') ?? 0).toBeGreaterThan(0);
  });

  it('parses thousands of mutated descriptors with coded errors only', () => {
    const base = Buffer.from('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n# Extent description\nRW 2048 FLAT "x-flat.vmdk" 0\n\n#DDB\nddb.uuid = "60 00 c2 9b 69 2f c9 76-74 c4 07 9e 10 87 3b f9"\n', 'latin1');
    const rand = seededRandom(77);
    const alphabet = Buffer.from('=" \n\r#0123456789abcdefRWFLATSPARSEZERO.\0\xff', 'latin1');
    let ok = 0;
    for (let i = 0; i < 5000; i++) {
      const m = Buffer.from(base);
      const n = 1 + Math.floor(rand() * 6);
      for (let k = 0; k < n; k++) m[Math.floor(rand() * m.length)] = alphabet[Math.floor(rand() * alphabet.length)]!;
      try {
        const d = parseDescriptor(m, 'fuzz.vmdk');
        expect(d.extents.length).toBeGreaterThan(0);
        ok++;
      } catch (err) {
        expect(err).toBeInstanceOf(BlockrelayError);
        expect((err as BlockrelayError).code).toBe('BR_TARGET_CORRUPT');
      }
    }
    expect(ok).toBeGreaterThan(0);
  });
});
