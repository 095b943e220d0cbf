import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { nativeFileExtents } from '../../src/platform/file-extents';
import { FileSpan } from '../../src/targets/file-span';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();

describe('FileSpan datasync', () => {
  it('fails every flush after one failed, though the kernel would sync cleanly again', async () => {
    const file = path.join(tempDir(), 'disk.raw');
    await fsp.writeFile(file, Buffer.alloc(64 * 1024));
    const handle = await fsp.open(file, 'r+');
    // Linux reports a writeback error to one fdatasync and marks the pages
    // clean: the next fdatasync returns 0. This handle does exactly that.
    const realSync = handle.datasync.bind(handle);
    let syncs = 0;
    handle.datasync = async () => {
      syncs++;
      if (syncs === 2) throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
      return realSync();
    };
    const span = new FileSpan({ path: file, handle, fileOffsetBytes: 0, sizeBytes: 64 * 1024, regularFile: true, punchHoles: false, ownsFileTail: true, ops: nativeFileExtents });
    try {
      await span.write(Buffer.alloc(4096, 1), 0, 0, 4096);
      await span.datasync();
      await span.write(Buffer.alloc(4096, 2), 0, 4096, 4096);
      await expect(span.datasync()).rejects.toMatchObject({ code: 'BR_IO' });
      for (let i = 0; i < 2; i++) {
        await expect(span.datasync()).rejects.toThrow(/an earlier flush failed/);
      }
      // The later calls never reached the kernel: its clean answer cannot be mistaken for durability.
      expect(syncs).toBe(2);
    } finally {
      await span.close();
    }
  });
  it('fails a flush that succeeded beside one that took the error and returned later', async () => {
    const file = path.join(tempDir(), 'disk.raw');
    await fsp.writeFile(file, Buffer.alloc(64 * 1024));
    const handle = await fsp.open(file, 'r+');
    // Two fdatasyncs at once: the kernel tells one of them, here the slower one.
    let syncs = 0;
    handle.datasync = async () => {
      syncs++;
      if (syncs === 1) {
        await new Promise((resolve) => setTimeout(resolve, 50));
        throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
      }
    };
    const span = new FileSpan({ path: file, handle, fileOffsetBytes: 0, sizeBytes: 64 * 1024, regularFile: true, punchHoles: false, ownsFileTail: true, ops: nativeFileExtents });
    try {
      const background = span.datasync();
      const requested = span.datasync();
      await expect(requested).rejects.toMatchObject({ code: 'BR_IO' });
      await expect(background).rejects.toMatchObject({ code: 'BR_IO' });
    } finally {
      handle.datasync = async () => undefined;
      await span.close();
    }
  });
});
