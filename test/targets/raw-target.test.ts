import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openDisk } from '../../src/targets/disk-spec';
import { useTempDirs } from '../helpers/tmp';
import { runConformanceSuite } from './conformance';

const tempDir = useTempDirs();

runConformanceSuite('raw file', {
  create: (sizeBytes) => openDisk(`raw:${path.join(tempDir(), 'disk.img')}`, { create: { sizeBytes } }),
  reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
});

describe('raw target', () => {
  it('creates a sparse file and releases the tail on writeZeroes', async () => {
    const file = path.join(tempDir(), 'sparse.img');
    const t = await openDisk(`raw:${file}`, { create: { sizeBytes: 64 * 1024 * 1024 } });
    expect(fs.statSync(file).blocks * 512).toBeLessThan(1024 * 1024);
    await t.write(32 * 1024 * 1024, Buffer.alloc(32 * 1024 * 1024, 1));
    expect(fs.statSync(file).blocks * 512).toBeGreaterThanOrEqual(32 * 1024 * 1024);
    await t.writeZeroes(32 * 1024 * 1024, 32 * 1024 * 1024);
    await t.close();
    expect(fs.statSync(file).size).toBe(64 * 1024 * 1024);
    expect(fs.statSync(file).blocks * 512).toBeLessThan(1024 * 1024);
  });

  it('refuses to create over an existing non-empty file with BR_TARGET_NAME_CONFLICT', async () => {
    const file = path.join(tempDir(), 'theirs.img');
    fs.writeFileSync(file, 'not ours');
    await expect(openDisk(`raw:${file}`, { create: { sizeBytes: 1024 * 1024 } })).rejects.toMatchObject({ code: 'BR_TARGET_NAME_CONFLICT' });
    expect(fs.readFileSync(file, 'utf8')).toBe('not ours');
  });

  it('creates into an empty existing file', async () => {
    const file = path.join(tempDir(), 'empty.img');
    fs.writeFileSync(file, '');
    const t = await openDisk(`raw:${file}`, { create: { sizeBytes: 1024 * 1024 } });
    await t.close();
    expect(fs.statSync(file).size).toBe(1024 * 1024);
  });

  it('refuses to open a missing file with BR_FILE_NOT_FOUND', async () => {
    await expect(openDisk(`raw:${path.join(tempDir(), 'missing.img')}`)).rejects.toMatchObject({ code: 'BR_FILE_NOT_FOUND' });
  });

  it('refuses a directory with BR_TARGET_UNSUPPORTED', async () => {
    await expect(openDisk(`raw:${tempDir()}`)).rejects.toMatchObject({ code: 'BR_TARGET_UNSUPPORTED' });
  });
});
