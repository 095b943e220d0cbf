import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openDisk } from '../../src/targets/disk-spec';
import { PassThrough } from 'node:stream';
import { main } from '../../src/daemon/cli';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { runConformanceSuite } from './conformance';

const tempDir = useTempDirs();
const haveQemu = requireTool('qemu-img') && requireTool('qemu-io');
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

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

function qemuIo(file: string, ...commands: string[]): string {
  return execFileSync('qemu-io', ['-f', 'vmdk', ...commands.flatMap((c) => ['-c', c]), file], { encoding: 'utf8' });
}

if (haveQemu) {
  // blockrelay never creates split disks, so qemu-img makes each one; below
  // 2 GiB that is a single extent behind a text descriptor.
  runConformanceSuite('vmdk twoGbMaxExtentSparse (made by qemu-img)', {
    create: async (sizeBytes) => {
      const file = path.join(tempDir(), 'split.vmdk');
      execFileSync('qemu-img', ['create', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', file, String(sizeBytes)]);
      return openDisk(`vmdk:${file}`);
    },
    reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
  });
}

describe.skipIf(!haveQemu)('split sparse VMDK (twoGbMaxExtentSparse)', () => {
  it('reads and writes across the 2 GiB extent boundary compatibly with qemu', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'big.vmdk');
    execFileSync('qemu-img', ['create', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', file, '5G']);
    expect(fs.existsSync(path.join(dir, 'big-s003.vmdk'))).toBe(true);
    qemuIo(file, 'write -P 0x61 2047M 2M', 'write -P 0x62 4G 64k');
    const t = await openDisk(`vmdk:${file}`);
    expect(t.sizeBytes).toBe(5 * GiB);
    expect((await t.read(2047 * MiB, 2 * MiB)).equals(Buffer.alloc(2 * MiB, 0x61))).toBe(true);
    expect((await t.read(4 * GiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024, 0x62))).toBe(true);
    const extents = [];
    for await (const e of t.extents(2046 * MiB, 4 * MiB)) extents.push(e);
    expect(extents).toEqual([
      { offset: 2046 * MiB, length: MiB, zero: true },
      { offset: 2047 * MiB, length: 2 * MiB, zero: false },
      { offset: 2049 * MiB, length: MiB, zero: true },
    ]);
    await t.write(2 * GiB - 32 * 1024, Buffer.alloc(64 * 1024, 0x63));
    await t.writeZeroes(4 * GiB, 4096);
    await t.close();
    const io = qemuIo(file, 'read -P 0x61 2047M 992k', 'read -P 0x63 2097120k 64k', 'read -P 0x61 2097184k 992k', 'read -P 0 4G 4k', 'read -P 0x62 4294971392 60k');
    expect(io).not.toContain('Pattern verification failed');
    expect(spawnSync('qemu-img', ['check', '-f', 'vmdk', file]).status).toBe(0);
  });

  it('converts to raw identically to qemu-img convert of the same disk', async () => {
    const dir = tempDir();
    const file = path.join(dir, 's.vmdk');
    execFileSync('qemu-img', ['create', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', file, '3G']);
    qemuIo(file, 'write -P 0x44 2G 1M', 'write -P 0x45 100M 128k');
    const ours = path.join(dir, 'ours.img');
    const converted = await runInProcess(['convert', `vmdk:${file}`, `raw:${ours}`]);
    expect(converted.status, converted.stderr).toBe(0);
    expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', ours, file]).status).toBe(0);
    expect(fs.statSync(ours).blocks * 512).toBeLessThan(16 * MiB);
  });
});
