import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ERROR_CODES } from '../../src/retry/error-codes';
import { openDisk } from '../../src/targets/disk-spec';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const haveQemu = requireTool('qemu-img');
const MiB = 1024 * 1024;
const UUID = '6000c29b-692f-c976-74c4-079e10873bf9';

describe('VMDK refusals', () => {
  it('refuses to create over an existing disk that is not ours with BR_TARGET_NAME_CONFLICT (ASR 78052), leaving it untouched', async () => {
    expect(ERROR_CODES.BR_TARGET_NAME_CONFLICT.asrCode).toBe(78052);
    const dir = tempDir();
    const theirs = path.join(dir, 'theirs.vmdk');
    fs.writeFileSync(theirs, 'some other file');
    await expect(openDisk(`vmdk:${theirs}`, { create: { sizeBytes: MiB } })).rejects.toMatchObject({ code: 'BR_TARGET_NAME_CONFLICT' });
    expect(fs.readFileSync(theirs, 'utf8')).toBe('some other file');
    const other = path.join(dir, 'other.vmdk');
    const t = await openDisk(`vmdk:${other}`, { create: { sizeBytes: MiB } });
    await t.close();
    const before = fs.readFileSync(other);
    await expect(openDisk(`vmdk:${other}`, { create: { sizeBytes: MiB, diskUuid: UUID } })).rejects.toMatchObject({ code: 'BR_TARGET_NAME_CONFLICT' });
    expect(fs.readFileSync(other).equals(before)).toBe(true);
  });

  it('refuses to create a flat VMDK whose -flat.vmdk data file already exists', async () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'd-flat.vmdk'), 'data');
    await expect(openDisk(`vmdk-flat:${path.join(dir, 'd.vmdk')}`, { create: { sizeBytes: MiB } })).rejects.toMatchObject({ code: 'BR_TARGET_NAME_CONFLICT' });
    expect(fs.existsSync(path.join(dir, 'd.vmdk'))).toBe(false);
  });

  it('reopens its own disk when created again with the same uuid and size', async () => {
    const file = path.join(tempDir(), 'mine.vmdk');
    const t = await openDisk(`vmdk:${file}`, { create: { sizeBytes: 2 * MiB, diskUuid: UUID } });
    expect(t.diskUuid).toBe(UUID);
    await t.write(0, Buffer.alloc(512, 9));
    await t.close();
    const again = await openDisk(`vmdk:${file}`, { create: { sizeBytes: 2 * MiB, diskUuid: UUID } });
    expect((await again.read(0, 512)).equals(Buffer.alloc(512, 9))).toBe(true);
    await again.close();
    await expect(openDisk(`vmdk:${file}`, { create: { sizeBytes: 4 * MiB, diskUuid: UUID } })).rejects.toMatchObject({ code: 'BR_TARGET_NAME_CONFLICT' });
  });

  it('refuses a second open disk with the same ddb.uuid, also through a copied file, until the first closes', async () => {
    const dir = tempDir();
    const a = path.join(dir, 'a.vmdk');
    const first = await openDisk(`vmdk:${a}`, { create: { sizeBytes: MiB, diskUuid: UUID } });
    await expect(openDisk(`vmdk:${a}`)).rejects.toMatchObject({ code: 'BR_TARGET_DUPLICATE_UUID' });
    await first.close();
    const b = path.join(dir, 'b.vmdk');
    fs.copyFileSync(a, b);
    const one = await openDisk(`vmdk:${a}`);
    await expect(openDisk(`vmdk:${b}`)).rejects.toMatchObject({ code: 'BR_TARGET_DUPLICATE_UUID' });
    await expect(openDisk(`vmdk:${b}`, { readOnly: true })).rejects.toMatchObject({ code: 'BR_TARGET_DUPLICATE_UUID' });
    await one.close();
    const r1 = await openDisk(`vmdk:${a}`, { readOnly: true });
    const r2 = await openDisk(`vmdk:${b}`, { readOnly: true });
    await r1.close();
    await r2.close();
    const w = await openDisk(`vmdk:${b}`);
    await w.close();
  });

  it.skipIf(!haveQemu)('refuses a snapshot child (parentCID set) with BR_TARGET_HAS_PARENT and its parent with BR_TARGET_IS_PARENT', async () => {
    const dir = tempDir();
    const base = path.join(dir, 'base.vmdk');
    const child = path.join(dir, 'child.vmdk');
    const t = await openDisk(`vmdk:${base}`, { create: { sizeBytes: 4 * MiB } });
    await t.write(0, Buffer.alloc(4096, 1));
    await t.close();
    execFileSync('qemu-img', ['create', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', child], { cwd: dir });
    const before = fs.readFileSync(base);
    await expect(openDisk(`vmdk:${child}`)).rejects.toMatchObject({ code: 'BR_TARGET_HAS_PARENT' });
    await expect(openDisk(`vmdk:${child}`, { readOnly: true })).rejects.toMatchObject({ code: 'BR_TARGET_HAS_PARENT' });
    await expect(openDisk(`vmdk:${base}`)).rejects.toMatchObject({ code: 'BR_TARGET_IS_PARENT' });
    expect(fs.readFileSync(base).equals(before)).toBe(true);
    // Reading the parent is harmless.
    const r = await openDisk(`vmdk:${base}`, { readOnly: true });
    expect((await r.read(0, 4096)).equals(Buffer.alloc(4096, 1))).toBe(true);
    await r.close();
  });

  it('refuses sizes a VMDK cannot hold with BR_TARGET_SIZE_MISMATCH', async () => {
    const dir = tempDir();
    await expect(openDisk(`vmdk:${path.join(dir, 'odd.vmdk')}`, { create: { sizeBytes: 1000 } })).rejects.toMatchObject({ code: 'BR_TARGET_SIZE_MISMATCH' });
    await expect(openDisk(`vmdk:${path.join(dir, 'huge.vmdk')}`, { create: { sizeBytes: 4 * 1024 ** 4 } })).rejects.toMatchObject({ code: 'BR_TARGET_SIZE_MISMATCH' });
    await expect(openDisk(`vmdk-flat:${path.join(dir, 'odd.vmdk')}`, { create: { sizeBytes: 1000 } })).rejects.toMatchObject({ code: 'BR_TARGET_SIZE_MISMATCH' });
    expect(fs.readdirSync(dir)).toEqual([]);
  });
});
