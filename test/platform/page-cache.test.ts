import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { dropFileCache } from '../../src/platform/page-cache';
import { pageCacheDroppable, residentBytes } from '../helpers/page-cache';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();

describe('dropFileCache', () => {
  it('drops a synced file from the page cache and the file reads back unchanged', () => {
    if (!requireTool('fincore')) return;
    const file = path.join(tempDir(), 'segment');
    const content = crypto.randomBytes(8 * 1024 * 1024);
    const fd = fs.openSync(file, 'w+');
    try {
      fs.writeSync(fd, content, 0, content.length, 0);
      fs.fdatasyncSync(fd);
      expect(residentBytes(file)).toBeGreaterThan(content.length / 2);
      expect(dropFileCache(fd, 0, 0)).toBeUndefined();
      // On tmpfs the pages cannot be dropped (see pageCacheDroppable).
      if (pageCacheDroppable(path.dirname(file))) expect(residentBytes(file)).toBeLessThan(content.length / 16);
      expect(fs.readFileSync(file).equals(content)).toBe(true);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('drops only the range asked for', () => {
    if (!requireTool('fincore')) return;
    const file = path.join(tempDir(), 'segment');
    const content = crypto.randomBytes(4 * 1024 * 1024);
    const fd = fs.openSync(file, 'w+');
    try {
      fs.writeSync(fd, content, 0, content.length, 0);
      fs.fdatasyncSync(fd);
      expect(dropFileCache(fd, 0, 2 * 1024 * 1024)).toBeUndefined();
      const resident = residentBytes(file);
      expect(resident).toBeGreaterThanOrEqual(1.5 * 1024 * 1024);
      if (pageCacheDroppable(path.dirname(file))) expect(resident).toBeLessThanOrEqual(2 * 1024 * 1024 + 64 * 1024);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('never drops bytes written after the last sync: they read back after the drop', () => {
    const file = path.join(tempDir(), 'segment');
    const content = crypto.randomBytes(1024 * 1024);
    const fd = fs.openSync(file, 'w+');
    try {
      fs.writeSync(fd, content, 0, content.length, 0);
      expect(dropFileCache(fd, 0, 0)).toBeUndefined();
      expect(fs.readFileSync(file).equals(content)).toBe(true);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('reports a closed descriptor as EBADF and refuses bad arguments before the addon', () => {
    const fd = fs.openSync(path.join(tempDir(), 'f'), 'w');
    fs.closeSync(fd);
    expect(dropFileCache(fd, 0, 0)).toBe('EBADF');
    expect(() => dropFileCache(-1, 0, 0)).toThrow(RangeError);
    expect(() => dropFileCache(3, 0.5, 0)).toThrow(/offsetBytes/);
    expect(() => dropFileCache(3, 0, -1)).toThrow(/lengthBytes/);
  });
});
