import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openDisk } from '../../src/targets/disk-spec';
import type { DiskTarget } from '../../src/targets/disk-target';
import { probeVmdk } from '../../src/targets/vmdk/vmdk-disk';
import { HDR } from '../../src/targets/vmdk/vmdk-format';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { seededRandom } from './conformance';

const tempDir = useTempDirs();
const haveQemu = requireTool('qemu-img') && requireTool('qemu-io');
const MiB = 1024 * 1024;

/** A raw image with random data in scattered pieces and holes elsewhere, written through fs. */
function makeRawSource(file: string, sizeBytes: number, seed: number): void {
  const rand = seededRandom(seed);
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, sizeBytes);
  for (let i = 0; i < 40; i++) {
    const length = 512 * (1 + Math.floor(rand() * 400));
    const offset = 512 * Math.floor(rand() * ((sizeBytes - length) / 512));
    const data = Buffer.alloc(length);
    for (let k = 0; k < length; k++) data[k] = (rand() * 256) | 0;
    fs.writeSync(fd, data, 0, length, offset);
  }
  fs.writeSync(fd, Buffer.alloc(512, 0x7e), 0, 512, sizeBytes - 512);
  fs.closeSync(fd);
}

async function copyInto(target: DiskTarget, rawFile: string): Promise<void> {
  const data = fs.readFileSync(rawFile);
  for (let at = 0; at < data.length; at += MiB) await target.write(at, data.subarray(at, Math.min(at + MiB, data.length)));
}

async function readAll(target: DiskTarget): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let at = 0; at < target.sizeBytes; at += 4 * MiB) parts.push(await target.read(at, Math.min(4 * MiB, target.sizeBytes - at)));
  return Buffer.concat(parts);
}

function qemuImg(args: string[]): { status: number | null; out: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

describe.skipIf(!haveQemu)('VMDK interoperability with qemu', () => {
  it('writes a sparse VMDK that qemu-img compare finds identical to the raw source and qemu-img check finds clean', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'src.img');
    makeRawSource(raw, 72 * MiB, 1);
    const vmdk = path.join(dir, 'ours.vmdk');
    const t = await openDisk(`vmdk:${vmdk}`, { create: { sizeBytes: 72 * MiB } });
    await copyInto(t, raw);
    await t.close();
    expect(qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, vmdk])).toMatchObject({ status: 0 });
    const check = qemuImg(['check', '-f', 'vmdk', vmdk]);
    expect(check.out).toContain('No errors were found');
    expect(check.status).toBe(0);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', vmdk], { encoding: 'utf8' }));
    expect(info['format-specific'].data['create-type']).toBe('monolithicSparse');
    // Holes stayed holes: far less on disk than the virtual size.
    expect(fs.statSync(vmdk).size).toBeLessThan(40 * MiB);
  });

  it('writes a flat VMDK that qemu-img compare finds identical to the raw source', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'src.img');
    makeRawSource(raw, 24 * MiB, 2);
    const vmdk = path.join(dir, 'flat.vmdk');
    const t = await openDisk(`vmdk-flat:${vmdk}`, { create: { sizeBytes: 24 * MiB } });
    await copyInto(t, raw);
    await t.close();
    expect(fs.existsSync(path.join(dir, 'flat-flat.vmdk'))).toBe(true);
    expect(qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, vmdk])).toMatchObject({ status: 0 });
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', vmdk], { encoding: 'utf8' }));
    expect(info['format-specific'].data['create-type']).toBe('monolithicFlat');
  });

  for (const subformat of ['monolithicSparse', 'monolithicFlat']) {
    it(`reads a ${subformat} VMDK made by qemu-img convert identically to its source`, async () => {
      const dir = tempDir();
      const raw = path.join(dir, 'src.img');
      makeRawSource(raw, 40 * MiB, 3);
      const vmdk = path.join(dir, 'q.vmdk');
      execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', `subformat=${subformat}`, raw, vmdk]);
      const t = await openDisk(`vmdk:${vmdk}`, { readOnly: true });
      expect(t.sizeBytes).toBe(40 * MiB);
      expect((await readAll(t)).equals(fs.readFileSync(raw))).toBe(true);
      await t.close();
    });
  }

  it('reads a compressed streamOptimized VMDK made by qemu-img, also with its grain directory found through a footer, and refuses to write it', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'src.img');
    makeRawSource(raw, 40 * MiB, 4);
    const vmdk = path.join(dir, 'stream.vmdk');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, vmdk]);
    await expect(openDisk(`vmdk:${vmdk}`)).rejects.toMatchObject({ code: 'BR_TARGET_UNSUPPORTED' });
    const t = await openDisk(`vmdk:${vmdk}`, { readOnly: true });
    expect((await readAll(t)).equals(fs.readFileSync(raw))).toBe(true);
    await t.close();
    // VMware writes streams with gdOffset = GD_AT_END and the real header in
    // a footer before the end-of-stream marker: rebuild this image that way.
    const bytes = fs.readFileSync(vmdk);
    const eos = bytes.subarray(bytes.length - 512);
    expect(eos.equals(Buffer.alloc(512))).toBe(true);
    const footerMarker = Buffer.alloc(512);
    footerMarker.writeBigUInt64LE(1n, 0);
    footerMarker.writeUInt32LE(3, 12);
    const footer = Buffer.from(bytes.subarray(0, 512));
    const head = Buffer.from(bytes.subarray(0, bytes.length - 512));
    head.writeBigUInt64LE(0xffffffffffffffffn, HDR.gdOffset);
    const atEnd = path.join(dir, 'at-end.vmdk');
    fs.writeFileSync(atEnd, Buffer.concat([head, footerMarker, footer, eos]));
    const e = await openDisk(`vmdk:${atEnd}`, { readOnly: true });
    expect((await readAll(e)).equals(fs.readFileSync(raw))).toBe(true);
    await e.close();
    expect(qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, atEnd]).status).toBe(0);
  });

  it('writes into a qemu-made sparse VMDK so that qemu reads the result back', async () => {
    const dir = tempDir();
    const vmdk = path.join(dir, 'q.vmdk');
    execFileSync('qemu-img', ['create', '-f', 'vmdk', vmdk, '64M']);
    execFileSync('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 40M 100k', vmdk]);
    const t = await openDisk(`vmdk:${vmdk}`);
    expect((await t.read(0, 4096)).equals(Buffer.alloc(4096, 0x11))).toBe(true);
    await t.write(512 * 1024, Buffer.alloc(1024 * 1024, 0x33)); // half over qemu's data, half new grains
    await t.write(60 * MiB, Buffer.alloc(4096, 0x44));
    await t.close();
    const io = (cmd: string): string => execFileSync('qemu-io', ['-f', 'vmdk', '-c', cmd, vmdk], { encoding: 'utf8' });
    expect(io('read -P 0x11 0 512k')).not.toContain('Pattern verification failed');
    expect(io('read -P 0x33 512k 1M')).not.toContain('Pattern verification failed');
    expect(io('read -P 0x22 40M 100k')).not.toContain('Pattern verification failed');
    expect(io('read -P 0x44 60M 4k')).not.toContain('Pattern verification failed');
    expect(io('read -P 0 2M 1M')).not.toContain('Pattern verification failed');
    expect(qemuImg(['check', '-f', 'vmdk', vmdk]).status).toBe(0);
  });

  it('reads zeroed-grain entries of a qemu zeroed_grain image as zeroes and keeps them compatible', async () => {
    const dir = tempDir();
    const vmdk = path.join(dir, 'z.vmdk');
    execFileSync('qemu-img', ['create', '-f', 'vmdk', '-o', 'zeroed_grain=on', vmdk, '8M']);
    execFileSync('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x55 0 1M', '-c', 'write -z 0 256k', vmdk]);
    const t = await openDisk(`vmdk:${vmdk}`);
    expect((await t.read(0, 256 * 1024)).equals(Buffer.alloc(256 * 1024))).toBe(true);
    expect((await t.read(256 * 1024, 4096)).equals(Buffer.alloc(4096, 0x55))).toBe(true);
    const extents = [];
    for await (const e of t.extents(0, 1024 * 1024)) extents.push(e);
    expect(extents[0]).toEqual({ offset: 0, length: 256 * 1024, zero: true });
    await t.writeZeroes(512 * 1024, 128 * 1024);
    await t.write(0, Buffer.alloc(512, 0x66));
    await t.close();
    const io = (cmd: string): string => execFileSync('qemu-io', ['-f', 'vmdk', '-c', cmd, vmdk], { encoding: 'utf8' });
    expect(io('read -P 0x66 0 512')).not.toContain('Pattern verification failed');
    expect(io('read -P 0 512 255k')).not.toContain('Pattern verification failed');
    expect(io('read -P 0 512k 128k')).not.toContain('Pattern verification failed');
    expect(io('read -P 0x55 640k 384k')).not.toContain('Pattern verification failed');
  });

  it('sets uncleanShutdown while open for writing and clears it on close; an unclean image is checked and reopened', async () => {
    const dir = tempDir();
    const vmdk = path.join(dir, 'u.vmdk');
    const t = await openDisk(`vmdk:${vmdk}`, { create: { sizeBytes: 8 * MiB } });
    await t.write(MiB, Buffer.alloc(128 * 1024, 0x21));
    await t.flush();
    expect(fs.readFileSync(vmdk)[HDR.uncleanShutdown]).toBe(1);
    // A crash: the file as it stands while the writer still has it open.
    const crashed = path.join(dir, 'crashed.vmdk');
    fs.copyFileSync(vmdk, crashed);
    await t.close();
    expect(fs.readFileSync(vmdk)[HDR.uncleanShutdown]).toBe(0);
    // The copy carries the same ddb.uuid, so open it alone.
    const c = await openDisk(`vmdk:${crashed}`);
    expect((await c.read(MiB, 128 * 1024)).equals(Buffer.alloc(128 * 1024, 0x21))).toBe(true);
    await c.close();
    expect(fs.readFileSync(crashed)[HDR.uncleanShutdown]).toBe(0);
    expect(qemuImg(['check', '-f', 'vmdk', crashed]).status).toBe(0);
  });

  it('repairs a redundant grain table that differs from the primary in an unclean image', async () => {
    const dir = tempDir();
    const vmdk = path.join(dir, 'r.vmdk');
    const t = await openDisk(`vmdk:${vmdk}`, { create: { sizeBytes: 8 * MiB } });
    await t.write(0, Buffer.alloc(64 * 1024, 0x31));
    await t.close();
    const buf = fs.readFileSync(vmdk);
    const rgd = Number(buf.readBigUInt64LE(HDR.rgdOffset));
    const rgt = buf.readUInt32LE(rgd * 512);
    const primaryGte = buf.readUInt32LE(Number(buf.readBigUInt64LE(HDR.gdOffset)) * 512);
    expect(primaryGte).not.toBe(0);
    const fd = fs.openSync(vmdk, 'r+');
    fs.writeSync(fd, Buffer.alloc(4), 0, 4, rgt * 512 + 0 * 4 + 0); // redundant GT entry 0 lost
    fs.writeSync(fd, Buffer.from([1]), 0, 1, HDR.uncleanShutdown);
    fs.closeSync(fd);
    const gdTable = fs.readFileSync(vmdk).readUInt32LE(Number(buf.readBigUInt64LE(HDR.gdOffset)) * 512);
    const r = await openDisk(`vmdk:${vmdk}`);
    await r.close();
    const after = fs.readFileSync(vmdk);
    expect(after.readUInt32LE(rgt * 512)).toBe(after.readUInt32LE(gdTable * 512));
    expect(qemuImg(['check', '-f', 'vmdk', vmdk]).status).toBe(0);
  });
});

describe('VMDK content ID (CID)', () => {
  for (const kind of ['vmdk', 'vmdk-flat']) {
    it(`gives a ${kind} disk a new CID when its content first changes in a session, and only then`, async () => {
      const file = path.join(tempDir(), 'cid.vmdk');
      const t = await openDisk(`${kind}:${file}`, { create: { sizeBytes: 4 * MiB } });
      await t.close();
      const cid0 = (await probeVmdk(file)).descriptor!.cid;
      const quiet = await openDisk(`${kind}:${file}`);
      await quiet.read(0, 4096);
      await quiet.close();
      expect((await probeVmdk(file)).descriptor!.cid).toBe(cid0);
      const w = await openDisk(`${kind}:${file}`);
      await w.write(0, Buffer.alloc(4096, 1));
      await w.write(MiB, Buffer.alloc(4096, 2));
      await w.close();
      const cid1 = (await probeVmdk(file)).descriptor!.cid;
      expect(cid1).not.toBe(cid0);
      expect(cid1).not.toBe(0xffffffff);
      const r = await openDisk(`${kind}:${file}`, { readOnly: true });
      expect((await r.read(MiB, 4096)).equals(Buffer.alloc(4096, 2))).toBe(true);
      await r.close();
      if (haveQemu) {
        const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file], { encoding: 'utf8' }));
        expect(info['format-specific'].data.cid).toBe(cid1);
        if (kind === 'vmdk') expect(qemuImg(['check', '-f', 'vmdk', file]).status).toBe(0);
      }
    });
  }
});
