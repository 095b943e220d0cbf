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
