import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { requireTool } from '../helpers/tools';
import { runConformanceSuite } from './conformance';
import { openDisk } from '../../src/targets/disk-spec';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();

runConformanceSuite('vmdk monolithicFlat', {
  create: (sizeBytes) => openDisk(`vmdk-flat:${path.join(tempDir(), 'disk.vmdk')}`, { create: { sizeBytes } }),
  reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
});

describe('flat VMDK variants made by other tools', () => {
  const haveQemu = requireTool('qemu-img') && requireTool('qemu-io');
  const MiB = 1024 * 1024;

  it.skipIf(!haveQemu)('reads and writes a twoGbMaxExtentFlat disk across its extent boundary compatibly with qemu', async () => {
    const file = path.join(tempDir(), 'tf.vmdk');
    execFileSync('qemu-img', ['create', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentFlat', file, '3G']);
    execFileSync('qemu-io', ['-f', 'vmdk', '-c', 'write -P 0x71 2047M 1M', file]);
    const t = await openDisk(`vmdk:${file}`);
    expect(t.sizeBytes).toBe(3 * 1024 * MiB);
    expect((await t.read(2047 * MiB, MiB)).equals(Buffer.alloc(MiB, 0x71))).toBe(true);
    await t.write(2048 * MiB - 4096, Buffer.alloc(8192, 0x72));
    await t.close();
    const io = execFileSync('qemu-io', ['-f', 'vmdk', '-c', 'read -P 0x71 2047M 1020k', '-c', 'read -P 0x72 2097148k 8k', file], { encoding: 'utf8' });
    expect(io).not.toContain('Pattern verification failed');
  });

  it.skipIf(!haveQemu)('reads an ESX-style vmfs descriptor (VMFS extent) identically to qemu', async () => {
    const dir = tempDir();
    const data = Buffer.alloc(4 * MiB);
    for (let i = 0; i < data.length; i += 4096) data.writeUInt32LE(i, i);
    fs.writeFileSync(path.join(dir, 'esx-flat.vmdk'), data);
    const file = path.join(dir, 'esx.vmdk');
    fs.writeFileSync(file, [
      '# Disk DescriptorFile', 'version=1', 'encoding="UTF-8"', 'CID=3f2a8c11', 'parentCID=ffffffff', 'createType="vmfs"', '',
      '# Extent description', 'RW 8192 VMFS "esx-flat.vmdk"', '', '# The Disk Data Base', '#DDB', '',
      'ddb.adapterType = "lsilogic"', 'ddb.uuid = "60 00 C2 9b 69 2f c9 76-74 c4 07 9e 10 87 3b f9"', '',
    ].join('\n'));
    const t = await openDisk(`vmdk:${file}`, { readOnly: true });
    expect(t.diskUuid).toBe('6000c29b-692f-c976-74c4-079e10873bf9');
    expect((await t.read(0, t.sizeBytes)).equals(data)).toBe(true);
    await t.close();
    expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', path.join(dir, 'esx-flat.vmdk'), file]).status).toBe(0);
  });
});

describe('flat VMDK extents as file spans', () => {
  const MiB = 1024 * 1024;

  it('hashes natively across extents whose boundary splits a block, as the wasm hash of read() does', async () => {
    const dir = tempDir();
    const a = Buffer.alloc(8196 * 512);
    const b = Buffer.alloc(8188 * 512);
    for (let i = 0; i < a.length; i += 4) a.writeUInt32LE((i * 2654435761) >>> 0, i);
    for (let i = 0; i < b.length; i += 4) b.writeUInt32LE((i * 40503 + 7) >>> 0, i);
    fs.writeFileSync(path.join(dir, 'two-f001.vmdk'), a);
    // The second extent starts 1 MiB into its file.
    fs.writeFileSync(path.join(dir, 'two-f002.vmdk'), Buffer.concat([Buffer.alloc(MiB, 0xcc), b]));
    const file = path.join(dir, 'two.vmdk');
    fs.writeFileSync(file, [
      '# Disk DescriptorFile', 'version=1', 'CID=3f2a8c11', 'parentCID=ffffffff', 'createType="twoGbMaxExtentFlat"', '',
      'RW 8196 FLAT "two-f001.vmdk" 0', `RW 8188 FLAT "two-f002.vmdk" ${MiB / 512}`, '',
      '#DDB', 'ddb.uuid = "60 00 C2 9b 69 2f c9 76-74 c4 07 9e 10 87 3b fa"', '',
    ].join('\n'));
    const t = await openDisk(`vmdk:${file}`, { readOnly: true });
    const { BlockHasher } = await import('../../src/resync/block-hasher');
    const wasm = await BlockHasher.create('wasm');
    const whole = Buffer.concat([a, b]);
    for (const [offset, length] of [[0, whole.length], [4 * MiB - 8192, 16384 + 512], [4096, 4 * MiB]] as const) {
      const into = Buffer.alloc(length);
      const hashes = await t.hashBlocks!(offset, length, 4096, into);
      expect(into.equals(whole.subarray(offset, offset + length))).toBe(true);
      expect(hashes.equals(wasm.hashBlocks(whole.subarray(offset, offset + length), 4096))).toBe(true);
    }
    await t.close();
  });

  it('punches discards in its data file and reports the holes; qemu-img reads the same disk', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'holes.vmdk');
    const t = await openDisk(`vmdk-flat:${file}`, { create: { sizeBytes: 16 * MiB } });
    expect(t.capabilities).toMatchObject({ sparse: true, discard: true });
    const content = Buffer.alloc(16 * MiB, 0x5a);
    await t.write(0, content);
    await t.flush();
    const data = path.join(dir, 'holes-flat.vmdk');
    const before = fs.statSync(data).blocks * 512;
    await t.discard(4 * MiB, 4 * MiB);
    await t.writeZeroes(12 * MiB, 4 * MiB);
    await t.flush();
    content.fill(0, 4 * MiB, 8 * MiB).fill(0, 12 * MiB, 16 * MiB);
    expect(before - fs.statSync(data).blocks * 512).toBeGreaterThanOrEqual(8 * MiB - 8192);
    const zero: Array<{ offset: number; length: number }> = [];
    for await (const e of t.extents(0, t.sizeBytes)) if (e.zero) zero.push({ offset: e.offset, length: e.length });
    expect(zero).toEqual([
      { offset: 4 * MiB, length: 4 * MiB },
      { offset: 12 * MiB, length: 4 * MiB },
    ]);
    await t.close();
    expect(fs.statSync(data).size).toBe(16 * MiB);
    if (requireTool('qemu-img')) {
      const raw = path.join(dir, 'holes.raw');
      fs.writeFileSync(raw, content);
      expect(spawnSync('qemu-img', ['compare', '-f', 'vmdk', '-F', 'raw', file, raw]).status).toBe(0);
    }
  });
});
