import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { HDR } from '../../src/targets/vmdk/vmdk-format';
import { requireTool } from '../helpers/tools';
import { runConformanceSuite } from './conformance';
import { openDisk } from '../../src/targets/disk-spec';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const MiB = 1024 * 1024;

// 40 MiB crosses a grain-table boundary (one GT maps 32 MiB).
runConformanceSuite('vmdk monolithicSparse', {
  create: (sizeBytes) => openDisk(`vmdk:${path.join(tempDir(), 'disk.vmdk')}`, { create: { sizeBytes } }),
  reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
}, { sizeBytes: 40 * 1024 * 1024 });

describe('vmdk monolithicSparse internals', () => {
  const haveQemu = requireTool('qemu-img') && requireTool('qemu-io');

  it('never lets a crash before flush leave a grain table entry pointing at unsynced data', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'c.vmdk');
    const t = await openDisk(`vmdk:${file}`, { create: { sizeBytes: 8 * MiB } });
    await t.write(0, Buffer.alloc(64 * 1024, 0xaa));
    await t.flush();
    await t.write(MiB, Buffer.alloc(64 * 1024, 0xbb)); // not flushed
    const crashed = path.join(dir, 'crashed.vmdk');
    fs.copyFileSync(file, crashed); // the file as a power cut would leave it
    await t.close();
    const c = await openDisk(`vmdk:${crashed}`);
    expect((await c.read(0, 64 * 1024)).equals(Buffer.alloc(64 * 1024, 0xaa))).toBe(true);
    expect((await c.read(MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024))).toBe(true);
    // New grains go after the orphaned one, never over it.
    await c.write(2 * MiB, Buffer.alloc(64 * 1024, 0xcc));
    await c.close();
    const r = await openDisk(`vmdk:${crashed}`, { readOnly: true });
    expect((await r.read(2 * MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024, 0xcc))).toBe(true);
    expect((await r.read(0, 64 * 1024)).equals(Buffer.alloc(64 * 1024, 0xaa))).toBe(true);
    await r.close();
    if (haveQemu) expect(spawnSync('qemu-img', ['check', '-f', 'vmdk', crashed]).status).toBe(0);
  });

  it('serialises concurrent writes into one unallocated grain so none is lost', async () => {
    const t = await openDisk(`vmdk:${path.join(tempDir(), 'p.vmdk')}`, { create: { sizeBytes: MiB } });
    await Promise.all(Array.from({ length: 16 }, (_, i) => t.write(i * 4096, Buffer.alloc(4096, i + 1))));
    for (let i = 0; i < 16; i++) expect((await t.read(i * 4096, 4096)).equals(Buffer.alloc(4096, i + 1))).toBe(true);
    await t.close();
  });

  it.skipIf(!haveQemu)('allocates a grain table a foreign image left unallocated, readable by qemu', async () => {
    const file = path.join(tempDir(), 'g.vmdk');
    const t = await openDisk(`vmdk:${file}`, { create: { sizeBytes: 64 * MiB } });
    await t.close();
    // Drop GT 1 from both directories, as a tool that allocates GTs lazily would leave it.
    const bytes = fs.readFileSync(file);
    for (const field of [HDR.gdOffset, HDR.rgdOffset]) bytes.writeUInt32LE(0, Number(bytes.readBigUInt64LE(field)) * 512 + 4);
    fs.writeFileSync(file, bytes);
    const w = await openDisk(`vmdk:${file}`);
    expect((await w.read(40 * MiB, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    await w.write(40 * MiB, Buffer.alloc(8192, 0x5c));
    await w.close();
    const io = execFileSync('qemu-io', ['-f', 'vmdk', '-c', 'read -P 0x5c 40M 8k', '-c', 'read -P 0 0 40M', file], { encoding: 'utf8' });
    expect(io).not.toContain('Pattern verification failed');
    expect(spawnSync('qemu-img', ['check', '-f', 'vmdk', file]).status).toBe(0);
  });
});
