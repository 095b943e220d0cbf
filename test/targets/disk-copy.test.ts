import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { copyDisk } from '../../src/targets/disk-copy';
import { openDisk } from '../../src/targets/disk-spec';
import { useTempDirs } from '../helpers/tmp';

describe('copyDisk', () => {
  const tmp = useTempDirs();

  it('copies the tail of a chunk that is not a whole number of 64 KiB scan blocks', async () => {
    const dir = tmp();
    const src = path.join(dir, 'src.img');
    // 100 KiB: the one data extent ends 36 KiB into a 64 KiB scan block.
    const data = crypto.randomBytes(100 * 1024);
    fs.writeFileSync(src, data);
    const from = await openDisk(`raw:${src}`, { readOnly: true });
    const to = await openDisk(`raw:${path.join(dir, 'dst.img')}`, { create: { sizeBytes: from.sizeBytes } });
    await copyDisk(from, to, { targetIsZero: true });
    await from.close();
    await to.close();
    expect(fs.readFileSync(path.join(dir, 'dst.img')).equals(data)).toBe(true);
  });
});
