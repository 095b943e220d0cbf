import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { defaultStateDir } from '../../src/resync/resync-command';
import { runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { writeImagePair } from './image-pair';

const MiB = 1024 * 1024;
const tempDir = useTempDirs();
const hasQemuImg = requireTool('qemu-img');

/** `qemu-img compare` exit status: 0 identical, 1 different. */
function qemuCompare(a: string, aFormat: string, b: string, bFormat: string): { status: number | null; out: string } {
  const r = spawnSync('qemu-img', ['compare', '-f', aFormat, '-F', bFormat, a, b], { encoding: 'utf8' });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

/** Inverts one byte at each offset: a change whatever the random data held there. */
function flipBytes(file: string, offsets: number[]): void {
  const fd = fs.openSync(file, 'r+');
  const one = Buffer.alloc(1);
  for (const at of offsets) {
    fs.readSync(fd, one, 0, 1, at);
    one[0] ^= 0xff;
    fs.writeSync(fd, one, 0, 1, at);
  }
  fs.closeSync(fd);
}

async function resyncJson(args: string[]) {
  const r = await runCli(['resync', ...args, '--json']);
  expect(r.stderr).not.toMatch(/BR_[A-Z_]+:/);
  expect(r.status).toBe(0);
  return JSON.parse(r.stdout) as Record<string, number>;
}

describe.skipIf(!hasQemuImg)('blockrelay resync (CLI, real targets)', () => {
  it('leaves a raw target identical to the source for qemu-img compare', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const dst = path.join(dir, 'target.img');
    const changed = writeImagePair(src, dst, 32 * MiB, 100, 1);
    expect(qemuCompare(src, 'raw', dst, 'raw').status).toBe(1);
    const run = await runCli(['resync', `raw:${src}`, `raw:${dst}`, '--json']);
    // Not a terminal: progress comes as log lines on stderr, the JSON alone on stdout.
    expect(run.stderr).toMatch(/^resync: compare 100% \(32\.0 of 32\.0 MiB\), 100 blocks/m);
    const result = JSON.parse(run.stdout) as Record<string, number>;
    expect(result.blocksSent).toBe(changed.length);
    expect(result.blocksCompared).toBe(8192);
    expect(result.bytesSent).toBeGreaterThanOrEqual(changed.length * 4096);
    expect(result.durationMs).toBeGreaterThanOrEqual(result.flushMs);
    expect(result.flushMs).toBeGreaterThanOrEqual(0);
    expect(qemuCompare(src, 'raw', dst, 'raw').status).toBe(0);
  });

  it('resyncs into an existing sparse VMDK that qemu-img wrote, sending only the changes', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const stale = path.join(dir, 'stale.img');
    const vmdk = path.join(dir, 'target.vmdk');
    const changed = writeImagePair(src, stale, 32 * MiB, 50, 2);
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', stale, vmdk]);
    expect(qemuCompare(src, 'raw', vmdk, 'vmdk').status).toBe(1);
    const result = await resyncJson([`raw:${src}`, `vmdk:${vmdk}`]);
    expect(result.blocksSent).toBe(changed.length);
    const cmp = qemuCompare(src, 'raw', vmdk, 'vmdk');
    expect(cmp.out).toMatch(/identical/i);
    expect(cmp.status).toBe(0);
    execFileSync('qemu-img', ['check', vmdk]);
  });

  it('resyncs a VMDK source into a flat VMDK target, created and then made stale', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const unused = path.join(dir, 'unused.img');
    const srcVmdk = path.join(dir, 'source.vmdk');
    const flat = path.join(dir, 'target.vmdk');
    writeImagePair(src, unused, 16 * MiB, 0, 3);
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', src, srcVmdk]);
    await resyncJson([`vmdk:${srcVmdk}`, `vmdk-flat:${flat}`, '--create']);
    // Make the flat extent stale behind the descriptor's back, as an old copy would be.
    const extent = path.join(dir, 'target-flat.vmdk');
    expect(fs.existsSync(extent)).toBe(true);
    flipBytes(extent, [4096, 7 * MiB + 100, 16 * MiB - 1]);
    expect(qemuCompare(srcVmdk, 'vmdk', flat, 'vmdk').status).toBe(1);
    const result = await resyncJson([`vmdk:${srcVmdk}`, `vmdk-flat:${flat}`]);
    expect(result.blocksSent).toBe(3);
    expect(qemuCompare(srcVmdk, 'vmdk', flat, 'vmdk').status).toBe(0);
  });

  it('resyncs into a flat VMDK that qemu-img wrote', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const stale = path.join(dir, 'stale.img');
    const flat = path.join(dir, 'qemu-flat.vmdk');
    const changed = writeImagePair(src, stale, 8 * MiB, 20, 6);
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=monolithicFlat', stale, flat]);
    expect(qemuCompare(src, 'raw', flat, 'vmdk').status).toBe(1);
    const result = await resyncJson([`raw:${src}`, `vmdk-flat:${flat}`]);
    expect(result.blocksSent).toBe(changed.length);
    expect(qemuCompare(src, 'raw', flat, 'vmdk').status).toBe(0);
  });

  it('creates a new VMDK with --create (alternate location) and copies every non-zero block', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const vmdk = path.join(dir, 'new.vmdk');
    // A mostly sparse source: 3 data blocks in 16 MiB.
    fs.writeFileSync(src, Buffer.alloc(0));
    fs.truncateSync(src, 16 * MiB);
    const fd = fs.openSync(src, 'r+');
    for (const at of [0, 5 * MiB + 4096, 16 * MiB - 4096]) fs.writeSync(fd, Buffer.alloc(4096, 0xab), 0, 4096, at);
    fs.closeSync(fd);
    const result = await resyncJson([`raw:${src}`, `vmdk:${vmdk}`, '--create']);
    expect(result.blocksSent).toBe(3);
    expect(result.hashBytes).toBe(0);
    expect(qemuCompare(src, 'raw', vmdk, 'vmdk').status).toBe(0);
  });

  it('compares only the extents of an --extents file', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const dst = path.join(dir, 'target.img');
    writeImagePair(src, dst, 8 * MiB, 0, 4);
    const fd = fs.openSync(dst, 'r+');
    fs.writeSync(fd, Buffer.from('changed'), 0, 7, 1 * MiB + 5);
    fs.closeSync(fd);
    const extentsFile = path.join(dir, 'extents.json');
    fs.writeFileSync(extentsFile, JSON.stringify([{ offset: 1 * MiB, length: 8192 }]));
    const result = await resyncJson([`raw:${src}`, `raw:${dst}`, '--extents', extentsFile]);
    expect(result.blocksCompared).toBe(2);
    expect(result.blocksSent).toBe(1);
    expect(qemuCompare(src, 'raw', dst, 'raw').status).toBe(0);
  });

  it('fails with one coded line when the disks differ in size', async () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'a.img'), Buffer.alloc(1 * MiB));
    fs.writeFileSync(path.join(dir, 'b.img'), Buffer.alloc(2 * MiB));
    const r = await runCli(['resync', `raw:${path.join(dir, 'a.img')}`, `raw:${path.join(dir, 'b.img')}`, '--json']);
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n').pop()).toMatch(/^BR_RESYNC_SIZE_MISMATCH: /);
  });

  it('refuses a block size that is not a power of two with BR_USAGE', async () => {
    const r = await runCli(['resync', 'raw:/nonexistent/a', 'raw:/nonexistent/b', '--block-size', '3000']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^BR_USAGE: .*--block-size/m);
  });
});

describe('networked resync progress without --state', () => {
  const io = (): { io: { stdout: NodeJS.WritableStream; stderr: NodeJS.WritableStream }; err: () => string } => {
    let text = '';
    const sink = { write: (s: string) => { text += s; return true; } } as unknown as NodeJS.WritableStream;
    return { io: { stdout: sink, stderr: sink }, err: () => text };
  };
  const withEnv = (env: Record<string, string | undefined>, fn: () => void): void => {
    const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
    for (const [k, v] of Object.entries(env)) if (v === undefined) delete process.env[k]; else process.env[k] = v;
    try {
      fn();
    } finally {
      for (const [k, v] of Object.entries(saved)) if (v === undefined) delete process.env[k]; else process.env[k] = v;
    }
  };

  it('is kept where a reboot does not clear it: systemd\'s state directory, else XDG_STATE_HOME, and the temp dir only when neither can be made', () => {
    const dir = tempDir();
    withEnv({ STATE_DIRECTORY: path.join(dir, 'systemd'), XDG_STATE_HOME: path.join(dir, 'xdg') }, () => {
      expect(defaultStateDir(io().io as never)).toBe(path.join(dir, 'systemd'));
    });
    withEnv({ STATE_DIRECTORY: undefined, XDG_STATE_HOME: path.join(dir, 'xdg') }, () => {
      expect(defaultStateDir(io().io as never)).toBe(path.join(dir, 'xdg', 'blockrelay'));
      expect(fs.statSync(path.join(dir, 'xdg', 'blockrelay')).isDirectory()).toBe(true);
    });
    fs.writeFileSync(path.join(dir, 'file'), '');
    withEnv({ STATE_DIRECTORY: undefined, XDG_STATE_HOME: path.join(dir, 'file') }, () => {
      const out = io();
      expect(defaultStateDir(out.io as never)).toBe(os.tmpdir());
      expect(out.err()).toMatch(/reboot may clear: give --state FILE/);
    });
  });
});
