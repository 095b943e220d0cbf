import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { copyDisk } from '../../src/targets/disk-copy';
import { openDisk } from '../../src/targets/disk-spec';
import { PassThrough } from 'node:stream';
import { main } from '../../src/daemon/cli';
import { runCli } from '../helpers/cli';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { canMountTmpfs, useSmallVolumes } from '../helpers/tmpfs';
import { seededRandom } from './conformance';

const tempDir = useTempDirs();
const smallVolume = useSmallVolumes();
const haveQemu = requireTool('qemu-img');
const MiB = 1024 * 1024;

/** Runs `blockrelay ARGS` in this process (the same main() the binary runs), for speed where the child-process path is already covered. */
async function runInProcess(args: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  const out = new PassThrough();
  const err = new PassThrough();
  let stdout = '';
  let stderr = '';
  out.on('data', (d) => { stdout += d; });
  err.on('data', (d) => { stderr += d; });
  const status = await main(args, { stdout: out, stderr: err });
  await new Promise((resolve) => setImmediate(resolve));
  return { status, stdout, stderr };
}

function makeRaw(file: string, sizeBytes: number, seed: number): Buffer {
  const rand = seededRandom(seed);
  const data = Buffer.alloc(sizeBytes);
  for (let i = 0; i < 30; i++) {
    const length = 512 * (1 + Math.floor(rand() * 600));
    const offset = 512 * Math.floor(rand() * ((sizeBytes - length) / 512));
    for (let k = 0; k < length; k++) data[offset + k] = (rand() * 256) | 0;
  }
  fs.writeFileSync(file, data);
  return data;
}

function compare(a: string, fa: string, b: string, fb: string): number | null {
  return spawnSync('qemu-img', ['compare', '-f', fa, '-F', fb, a, b]).status;
}

describe('blockrelay convert', () => {
  it.skipIf(!haveQemu)('converts raw to a sparse VMDK that qemu-img finds identical and clean, keeping holes, with progress on stderr', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'src.img');
    makeRaw(raw, 48 * MiB, 11);
    const vmdk = path.join(dir, 'out.vmdk');
    const r = await runCli(['convert', `raw:${raw}`, `vmdk:${vmdk}`]);
    expect(r.stderr).toMatch(/convert: 100% \(48\.0 of 48\.0 MiB/);
    expect(r.status).toBe(0);
    expect(compare(raw, 'raw', vmdk, 'vmdk')).toBe(0);
    expect(spawnSync('qemu-img', ['check', '-f', 'vmdk', vmdk]).status).toBe(0);
    expect(fs.statSync(vmdk).size).toBeLessThan(24 * MiB);
  });

  it.skipIf(!haveQemu)('reads back a VMDK made by qemu-img convert identically (converted back to raw, byte for byte)', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'src.img');
    const data = makeRaw(raw, 40 * MiB, 12);
    for (const subformat of ['monolithicSparse', 'monolithicFlat']) {
      const q = path.join(dir, `q-${subformat}.vmdk`);
      execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', `subformat=${subformat}`, raw, q]);
      const back = path.join(dir, `back-${subformat}.img`);
      const r = await runInProcess(['convert', `vmdk:${q}`, `raw:${back}`, '--json']);
      expect(r.status).toBe(0);
      const doc = JSON.parse(r.stdout);
      expect(doc).toMatchObject({ from: `vmdk:${q}`, to: `raw:${back}`, sizeBytes: 40 * MiB });
      expect(fs.readFileSync(back).equals(data)).toBe(true);
      expect(spawnSync('cmp', [raw, back]).status).toBe(0);
    }
  });

  it.skipIf(!haveQemu)('chains sparse VMDK -> flat VMDK -> raw without changing a byte', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'src.img');
    const data = makeRaw(raw, 16 * MiB, 13);
    const steps = [`raw:${raw}`, `vmdk:${path.join(dir, 'a.vmdk')}`, `vmdk-flat:${path.join(dir, 'b.vmdk')}`, `raw:${path.join(dir, 'c.img')}`];
    for (let i = 0; i + 1 < steps.length; i++) expect((await runInProcess(['convert', steps[i]!, steps[i + 1]!])).status).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'c.img')).equals(data)).toBe(true);
    expect(compare(raw, 'raw', path.join(dir, 'b.vmdk'), 'vmdk')).toBe(0);
  });

  it.skipIf(!haveQemu)('converts raw -> fixed VHD -> sparse VMDK -> raw without changing a byte', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'src.img');
    const data = makeRaw(raw, 8 * MiB, 16);
    const steps = [`raw:${raw}`, `vhd:${path.join(dir, 'b.vhd')}`, `vmdk:${path.join(dir, 'c.vmdk')}`, `raw:${path.join(dir, 'd.img')}`];
    for (let i = 0; i + 1 < steps.length; i++) expect((await runInProcess(['convert', steps[i]!, steps[i + 1]!])).status).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'd.img')).equals(data)).toBe(true);
    expect(compare(raw, 'raw', path.join(dir, 'b.vhd'), 'vpc')).toBe(0);
  });

  it('refuses to convert onto an existing file with BR_TARGET_NAME_CONFLICT and leaves it alone', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'src.img');
    makeRaw(raw, MiB, 14);
    const existing = path.join(dir, 'existing.img');
    fs.writeFileSync(existing, 'precious');
    const r = await runCli(['convert', `raw:${raw}`, `raw:${existing}`]);
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n').pop()).toMatch(/^BR_TARGET_NAME_CONFLICT: /);
    expect(fs.readFileSync(existing, 'utf8')).toBe('precious');
  });

  it.skipIf(!canMountTmpfs())('leaves an output it did not create in place when the copy fails, and removes one it did', async () => {
    const dir = tempDir();
    const raw = path.join(dir, 'src.img');
    makeRaw(raw, 4 * MiB, 16);
    // 1 MiB of room: the 4 MiB copy fails with ENOSPC part-way.
    const small = smallVolume('1m');
    const given = path.join(small, 'given.img');
    fs.writeFileSync(given, '');
    const failed = await runInProcess(['convert', `raw:${raw}`, `raw:${given}`]);
    expect(failed.status).toBe(1);
    expect(failed.stderr).toMatch(/BR_DISK_FULL/);
    expect(fs.existsSync(given)).toBe(true);
    const made = path.join(small, 'made.img');
    expect((await runInProcess(['convert', `raw:${raw}`, `raw:${made}`])).status).toBe(1);
    expect(fs.existsSync(made)).toBe(false);
  });

  it('exits non-zero naming the code for bad specs, missing sources and bad usage', async () => {
    const dir = tempDir();
    const bad = await runInProcess(['convert', 'qcow2:/x', `raw:${path.join(dir, 'o.img')}`]);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/^BR_TARGET_SPEC_INVALID: /m);
    const missing = await runInProcess(['convert', `vmdk:${path.join(dir, 'nope.vmdk')}`, `raw:${path.join(dir, 'o.img')}`]);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/^BR_(FILE_NOT_FOUND|IO): /m);
    expect(fs.existsSync(path.join(dir, 'o.img'))).toBe(false);
    const usage = await runCli(['convert', 'raw:/only-one']);
    expect(usage.status).toBe(2);
    expect(usage.stderr).toMatch(/^BR_USAGE: /m);
  });

  it('refuses a damaged source VMDK before creating the target', async () => {
    const dir = tempDir();
    const vmdk = path.join(dir, 'src.vmdk');
    const t = await openDisk(`vmdk:${vmdk}`, { create: { sizeBytes: 8 * MiB } });
    await t.write(4 * MiB, Buffer.alloc(MiB, 3));
    await t.close();
    // Cut the last grain in half: validation at open finds the GT entry pointing past the end.
    fs.truncateSync(vmdk, fs.statSync(vmdk).size - 32 * 1024);
    const out = path.join(dir, 'out.vmdk');
    const r = await runInProcess(['convert', `vmdk:${vmdk}`, `vmdk:${out}`]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^BR_TARGET_CORRUPT: .*byte offset \d+/m);
    expect(fs.existsSync(out)).toBe(false);
  });

  it('writes zero ranges over a target that is not known to be zero', async () => {
    const dir = tempDir();
    const srcFile = path.join(dir, 'src.img');
    const data = makeRaw(srcFile, 4 * MiB, 15);
    const dstFile = path.join(dir, 'dst.img');
    fs.writeFileSync(dstFile, Buffer.alloc(4 * MiB, 0xff));
    const from = await openDisk(`raw:${srcFile}`, { readOnly: true });
    const to = await openDisk(`raw:${dstFile}`);
    const progress: number[] = [];
    const result = await copyDisk(from, to, { targetIsZero: false, onProgress: (p) => progress.push(p.doneBytes), progressIntervalMs: 0 });
    await from.close();
    await to.close();
    expect(fs.readFileSync(dstFile).equals(data)).toBe(true);
    expect(result.zeroBytes).toBeGreaterThan(0);
    expect(result.writtenBytes + result.zeroBytes).toBe(4 * MiB);
    expect(progress[progress.length - 1]).toBe(4 * MiB);
  });

  it('refuses to copy between disks of different sizes', async () => {
    const dir = tempDir();
    const a = await openDisk(`raw:${path.join(dir, 'a.img')}`, { create: { sizeBytes: MiB } });
    const b = await openDisk(`raw:${path.join(dir, 'b.img')}`, { create: { sizeBytes: 2 * MiB } });
    await expect(copyDisk(a, b, { targetIsZero: true })).rejects.toMatchObject({ code: 'BR_TARGET_SIZE_MISMATCH' });
    await a.close();
    await b.close();
  });
});
