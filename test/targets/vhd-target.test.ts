import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { openDisk } from '../../src/targets/disk-spec';
import { VHD_FOOTER_OFFSETS, decodeVhdFooter, encodeVhdFooter, newFixedVhdFooter } from '../../src/targets/vhd/vhd-footer';
import { VhdTarget } from '../../src/targets/vhd/vhd-target';
import { runCli } from '../helpers/cli';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { runConformanceSuite } from './conformance';

const tempDir = useTempDirs();
const MiB = 1024 * 1024;

runConformanceSuite('fixed VHD file', {
  create: (sizeBytes) => openDisk(`vhd:${path.join(tempDir(), 'disk.vhd')}`, { create: { sizeBytes } }),
  reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
});

function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** A raw image with random data in some places and holes elsewhere. */
function makeRawSource(file: string, sizeBytes: number): Buffer {
  const data = Buffer.alloc(sizeBytes);
  for (let at = 0; at < sizeBytes; at += 1 * MiB) {
    if ((at / MiB) % 3 !== 1) randomBytes(256 * 1024).copy(data, at + 4096);
  }
  fs.writeFileSync(file, data);
  return data;
}

async function writeThrough(target: VhdTarget, data: Buffer): Promise<void> {
  for (let at = 0; at < data.length; at += MiB) {
    const piece = data.subarray(at, at + MiB);
    if (piece.some((b) => b !== 0)) await target.write(at, piece);
  }
}

function qemu(args: string[]): string {
  return execFileSync(args[0]!, args.slice(1), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

async function expectCode(promise: Promise<unknown>, code: string): Promise<Record<string, unknown>> {
  const err = await promise.then(
    () => expect.fail(`expected ${code}`),
    (e: unknown) => e,
  );
  expect(err).toMatchObject({ code });
  return (err as { details: Record<string, unknown> }).details;
}

describe('fixed VHD with qemu', () => {
  it.runIf(requireTool('qemu-img'))('is identical to its raw source for qemu-img compare, with the exact virtual size', async () => {
    const dir = tempDir();
    const rawFile = path.join(dir, 'src.raw');
    const vhdFile = path.join(dir, 'disk.vhd');
    const sizeBytes = 10 * MiB + 3 * 512; // not a CHS-exact size: qemu must trust current size
    const data = makeRawSource(rawFile, sizeBytes);
    const t = await VhdTarget.open(vhdFile, { create: { sizeBytes } });
    await writeThrough(t, data);
    await t.close();
    expect(fs.statSync(vhdFile).size).toBe(sizeBytes + 512);
    const info = JSON.parse(qemu(['qemu-img', 'info', '-f', 'vpc', '--output=json', vhdFile])) as { 'virtual-size': number; format: string };
    expect(info.format).toBe('vpc');
    expect(info['virtual-size']).toBe(sizeBytes);
    const cmp = spawnSync('qemu-img', ['compare', '-f', 'vpc', '-F', 'raw', vhdFile, rawFile], { encoding: 'utf8' });
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
    expect(cmp.status).toBe(0);
  });

  it.runIf(requireTool('qemu-io'))('reads what qemu-io writes into our VHD and qemu-io reads what we write', async () => {
    const vhdFile = path.join(tempDir(), 'disk.vhd');
    let t = await VhdTarget.open(vhdFile, { create: { sizeBytes: 4 * MiB } });
    await t.write(MiB, Buffer.alloc(64 * 1024, 0x5c));
    await t.close();
    qemu(['qemu-io', '-f', 'vpc', '-c', 'read -P 0x5c 1M 64k', '-c', 'read -P 0 0 1M', '-c', 'write -P 0xa7 2M 128k', vhdFile]);
    t = await VhdTarget.open(vhdFile, { readOnly: true });
    expect((await t.read(2 * MiB, 128 * 1024)).equals(Buffer.alloc(128 * 1024, 0xa7))).toBe(true);
    expect((await t.read(MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024, 0x5c))).toBe(true);
    await t.close();
    // qemu-io must not have touched the footer.
    const footer = decodeVhdFooter(fs.readFileSync(vhdFile).subarray(4 * MiB), 4 * MiB, vhdFile);
    expect(footer.currentSizeBytes).toBe(4 * MiB);
  });

  it.runIf(requireTool('qemu-img'))('reads a fixed VHD made by qemu-img convert identically to its source', async () => {
    const dir = tempDir();
    const rawFile = path.join(dir, 'src.raw');
    const data = makeRawSource(rawFile, 12 * MiB);
    for (const [name, options] of [['forced.vhd', 'subformat=fixed,force_size=on'], ['chs.vhd', 'subformat=fixed']] as const) {
      const vhdFile = path.join(dir, name);
      qemu(['qemu-img', 'convert', '-f', 'raw', '-O', 'vpc', '-o', options, rawFile, vhdFile]);
      const before = sha256(vhdFile);
      const t = await VhdTarget.open(vhdFile, { readOnly: true });
      // Without force_size qemu rounds the size up to a whole CHS geometry; the
      // extra sectors read as zeroes.
      expect(t.sizeBytes).toBeGreaterThanOrEqual(data.length);
      const got = await t.read(0, t.sizeBytes);
      expect(got.subarray(0, data.length).equals(data)).toBe(true);
      expect(got.subarray(data.length).every((b) => b === 0)).toBe(true);
      await t.close();
      expect(sha256(vhdFile)).toBe(before);
    }
  });

  it.runIf(requireTool('qemu-img'))('refuses a dynamic VHD made by qemu-img with BR_VHD_NOT_FIXED', async () => {
    const vhdFile = path.join(tempDir(), 'dyn.vhd');
    qemu(['qemu-img', 'create', '-f', 'vpc', '-o', 'subformat=dynamic', vhdFile, '8M']);
    const details = await expectCode(VhdTarget.open(vhdFile), 'BR_VHD_NOT_FIXED');
    expect(details.offset).toBe(fs.statSync(vhdFile).size - 512 + VHD_FOOTER_OFFSETS.diskType);
  });
});

describe('fixed VHD damage and creation rules', () => {
  async function makeVhd(sizeBytes = 2 * MiB): Promise<string> {
    const file = path.join(tempDir(), 'disk.vhd');
    const t = await VhdTarget.open(file, { create: { sizeBytes } });
    await t.write(0, Buffer.alloc(4096, 0x11));
    await t.close();
    return file;
  }

  it('refuses a bad footer checksum, naming the offset, and writes nothing', async () => {
    const file = await makeVhd();
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.from([0x7f]), 0, 1, 2 * MiB + VHD_FOOTER_OFFSETS.currentSize + 3);
    fs.closeSync(fd);
    const before = sha256(file);
    const details = await expectCode(VhdTarget.open(file), 'BR_VHD_FOOTER_CORRUPT');
    expect(details.offset).toBe(2 * MiB + VHD_FOOTER_OFFSETS.checksum);
    await expect(VhdTarget.open(file)).rejects.toThrow(`byte offset ${2 * MiB + 64}`);
    expect(sha256(file)).toBe(before);
  });

  it('refuses a bad cookie and a truncated file with BR_VHD_FOOTER_CORRUPT', async () => {
    const file = await makeVhd();
    const bytes = fs.readFileSync(file);
    fs.writeFileSync(file, bytes.subarray(0, bytes.length - 100));
    const details = await expectCode(VhdTarget.open(file), 'BR_VHD_FOOTER_CORRUPT');
    expect(details.offset).toBe(bytes.length - 100 - 512);
    fs.writeFileSync(file, bytes.subarray(0, 300));
    await expectCode(VhdTarget.open(file), 'BR_VHD_FOOTER_CORRUPT');
  });

  it('refuses a footer whose size disagrees with the file with BR_VHD_SIZE_MISMATCH', async () => {
    const file = path.join(tempDir(), 'short.vhd');
    // A valid footer claiming 4 MiB after only 2 MiB of data: a truncated image.
    const footer = encodeVhdFooter(newFixedVhdFooter(4 * MiB, { nowMs: Date.now() }));
    fs.writeFileSync(file, Buffer.concat([Buffer.alloc(2 * MiB), footer]));
    const details = await expectCode(VhdTarget.open(file), 'BR_VHD_SIZE_MISMATCH');
    expect(details.offset).toBe(2 * MiB + VHD_FOOTER_OFFSETS.currentSize);
  });

  it('refuses to create over a file that is not this disk, and reopens its own disk by unique id', async () => {
    const dir = tempDir();
    const theirs = path.join(dir, 'theirs.vhd');
    fs.writeFileSync(theirs, 'not a disk');
    await expectCode(VhdTarget.open(theirs, { create: { sizeBytes: MiB } }), 'BR_TARGET_NAME_CONFLICT');
    expect(fs.readFileSync(theirs, 'utf8')).toBe('not a disk');

    const ours = path.join(dir, 'ours.vhd');
    const diskUuid = '6f1c0a52-3b7e-4d55-9a40-1e2f3a4b5c6d';
    let t = await VhdTarget.open(ours, { create: { sizeBytes: MiB, diskUuid } });
    await t.write(512, Buffer.alloc(512, 0x42));
    await t.close();
    t = await VhdTarget.open(ours, { create: { sizeBytes: MiB, diskUuid } });
    expect(t.diskUuid).toBe(diskUuid);
    expect((await t.read(512, 512)).equals(Buffer.alloc(512, 0x42))).toBe(true);
    await t.close();
    await expectCode(VhdTarget.open(ours, { create: { sizeBytes: MiB, diskUuid: '00000000-0000-4000-8000-000000000001' } }), 'BR_TARGET_NAME_CONFLICT');
  });

  it('removes the file it made when create fails part way', async () => {
    const file = path.join(tempDir(), 'huge.vhd');
    // No filesystem here holds a ~8 PiB file: ftruncate fails after the file exists.
    const sizeBytes = Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % 512) - 512;
    await expect(VhdTarget.open(file, { create: { sizeBytes } })).rejects.toMatchObject({ code: expect.stringMatching(/^BR_/) });
    expect(fs.existsSync(file)).toBe(false);
  });

  it('warns when a created VHD is not a whole MiB, which Azure will not take as a disk', async () => {
    const warnings: unknown[] = [];
    const logger = { warn: (...args: unknown[]) => void warnings.push(args) };
    const odd = await VhdTarget.open(path.join(tempDir(), 'odd.vhd'), { create: { sizeBytes: MiB + 512 }, logger });
    await odd.close();
    const even = await VhdTarget.open(path.join(tempDir(), 'even.vhd'), { create: { sizeBytes: 2 * MiB }, logger });
    await even.close();
    expect(warnings).toHaveLength(1);
  });

  it('refuses sizes that are not a positive multiple of 512', async () => {
    const file = path.join(tempDir(), 'odd.vhd');
    await expectCode(VhdTarget.open(file, { create: { sizeBytes: MiB + 1 } }), 'BR_TARGET_SIZE_MISMATCH');
    await expectCode(VhdTarget.open(file, { create: { sizeBytes: 0 } }), 'BR_TARGET_SIZE_MISMATCH');
    expect(fs.existsSync(file)).toBe(false);
  });

  it('refuses a second writable open of the same disk with BR_TARGET_DUPLICATE_UUID', async () => {
    const file = await makeVhd();
    const t = await VhdTarget.open(file);
    await expectCode(VhdTarget.open(file), 'BR_TARGET_DUPLICATE_UUID');
    await t.close();
    const again = await VhdTarget.open(file);
    await again.close();
  });

  it('stamps the footer with the injected clock and a fixed-disk layout', async () => {
    const file = path.join(tempDir(), 'stamp.vhd');
    const clock = new SimulatedClock(Date.UTC(2026, 5, 1, 12));
    const t = await VhdTarget.open(file, { create: { sizeBytes: 3 * MiB }, clock });
    await t.close();
    const footer = decodeVhdFooter(fs.readFileSync(file).subarray(3 * MiB), 3 * MiB, file);
    expect(footer.timestampSeconds).toBe((Date.UTC(2026, 5, 1, 12) - Date.UTC(2000, 0, 1)) / 1000);
    expect(footer.diskType).toBe(2);
    expect(footer.dataOffset).toBe(0xffffffffffffffffn);
    expect(footer.originalSizeBytes).toBe(3 * MiB);
  });
});

describe('fixed VHD files under seeded damage', () => {
  it('opens damaged files with a coded error or as a valid disk, never crashing and never writing', async () => {
    const dir = tempDir();
    const good = path.join(dir, 'good.vhd');
    const t = await VhdTarget.open(good, { create: { sizeBytes: 64 * 1024 } });
    await t.write(0, Buffer.alloc(4096, 0x3c));
    await t.close();
    const original = fs.readFileSync(good);
    let seed = 0x7e57;
    const next = (): number => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed / 4294967296;
    };
    const codes = new Set<string>();
    const file = path.join(dir, 'fuzz.vhd');
    for (let i = 0; i < 300; i++) {
      let bytes = Buffer.from(original);
      const r = next();
      if (r < 0.3) bytes = bytes.subarray(0, Math.floor(next() * bytes.length));
      else if (r < 0.4) bytes = Buffer.concat([bytes, Buffer.alloc(1 + Math.floor(next() * 2048), Math.floor(next() * 256))]);
      else {
        const flips = 1 + Math.floor(next() * 4);
        for (let f = 0; f < flips; f++) bytes[bytes.length - 512 + Math.floor(next() * 512)] = Math.floor(next() * 256);
      }
      fs.writeFileSync(file, bytes);
      try {
        const opened = await VhdTarget.open(file);
        codes.add('ok');
        await opened.read(0, opened.sizeBytes);
        await opened.close();
      } catch (err) {
        expect(err).toBeInstanceOf(Error);
        const code = (err as { code?: string }).code ?? 'uncoded';
        expect(code, (err as Error).message).toMatch(/^BR_VHD_/);
        expect((err as { details: { offset?: unknown } }).details.offset).toEqual(expect.any(Number));
        codes.add(code);
        expect(fs.readFileSync(file).equals(bytes)).toBe(true);
      }
    }
    expect(codes.has('BR_VHD_FOOTER_CORRUPT')).toBe(true);
  });
});

describe('fixed VHD data as a file span', () => {
  /** Bytes the filesystem has allocated to `file`. */
  function allocatedBytes(file: string): number {
    return fs.statSync(file).blocks * 512;
  }

  it('punches discards, reports the holes as zero extents, hashes natively, and never touches the footer', async () => {
    const file = path.join(tempDir(), 'holes.vhd');
    const t = await openDisk(`vhd:${file}`, { create: { sizeBytes: 16 * MiB } });
    expect(t.capabilities).toMatchObject({ sparse: true, discard: true, alignmentBytes: 512 });
    const footerBefore = fs.readFileSync(file).subarray(16 * MiB);
    const content = randomBytes(16 * MiB);
    await t.write(0, content);
    await t.flush();
    const before = allocatedBytes(file);
    // Up to the very end of the data: a raw file would be cut and regrown there, which would lose the footer.
    await t.discard(4 * MiB, 4 * MiB);
    await t.writeZeroes(12 * MiB, 4 * MiB);
    await t.flush();
    content.fill(0, 4 * MiB, 8 * MiB).fill(0, 12 * MiB, 16 * MiB);
    expect(before - allocatedBytes(file)).toBeGreaterThanOrEqual(8 * MiB - 8192);
    const zero: Array<{ offset: number; length: number }> = [];
    for await (const e of t.extents(0, t.sizeBytes)) if (e.zero) zero.push({ offset: e.offset, length: e.length });
    expect(zero).toEqual([
      { offset: 4 * MiB, length: 4 * MiB },
      { offset: 12 * MiB, length: 4 * MiB },
    ]);
    const { BlockHasher } = await import('../../src/resync/block-hasher');
    const wasm = await BlockHasher.create('wasm');
    expect((await t.hashBlocks!(0, 16 * MiB, 4096)).equals(wasm.hashBlocks(content, 4096))).toBe(true);
    await t.close();
    const bytes = fs.readFileSync(file);
    expect(bytes.length).toBe(16 * MiB + 512);
    expect(bytes.subarray(16 * MiB).equals(footerBefore)).toBe(true);
    expect(bytes.subarray(0, 16 * MiB).equals(content)).toBe(true);
    // qemu-img cannot check vpc images; it reads this one as the same disk.
    if (requireTool('qemu-img')) {
      const raw = path.join(path.dirname(file), 'holes.raw');
      fs.writeFileSync(raw, content);
      expect(qemu(['qemu-img', 'compare', '-f', 'vpc', '-F', 'raw', file, raw])).toContain('Images are identical');
    }
  });
});

describe('blockrelay convert with vhd:', () => {
  it('converts raw to vhd and back, byte for byte, and qemu-img agrees', async () => {
    const dir = tempDir();
    const rawFile = path.join(dir, 'src.raw');
    const vhdFile = path.join(dir, 'out.vhd');
    const backFile = path.join(dir, 'back.raw');
    const data = makeRawSource(rawFile, 6 * MiB);
    const toVhd = await runCli(['convert', `raw:${rawFile}`, `vhd:${vhdFile}`]);
    expect(toVhd.stderr).not.toMatch(/BR_/);
    expect(toVhd.status).toBe(0);
    expect(fs.statSync(vhdFile).size).toBe(6 * MiB + 512);
    const back = await runCli(['convert', `vhd:${vhdFile}`, `raw:${backFile}`]);
    expect(back.status).toBe(0);
    expect(fs.readFileSync(backFile).equals(data)).toBe(true);
    if (requireTool('qemu-img')) {
      expect(qemu(['qemu-img', 'compare', '-f', 'vpc', '-F', 'raw', vhdFile, rawFile])).toContain('Images are identical');
    }
    // A damaged VHD source fails with its code and creates nothing.
    const fd = fs.openSync(vhdFile, 'r+');
    fs.writeSync(fd, Buffer.from('X'), 0, 1, 6 * MiB);
    fs.closeSync(fd);
    const bad = await runCli(['convert', `vhd:${vhdFile}`, `raw:${path.join(dir, 'never.raw')}`]);
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toContain('BR_VHD_FOOTER_CORRUPT');
    expect(fs.existsSync(path.join(dir, 'never.raw'))).toBe(false);
  });
});
