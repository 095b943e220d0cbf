import { execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { resyncDisks } from '../../src/resync/resync-disks';
import { openDisk } from '../../src/targets/disk-spec';
import { hasTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { runConformanceSuite } from './conformance';

const tempDir = useTempDirs();
const attached: string[] = [];

/** Attaches a loop device over a fresh sparse file; undefined where loop devices cannot be made (not root, a container without /dev/loop-control). */
function attachLoop(sizeBytes: number, dir: string, sectorBytes = 512): string | undefined {
  const file = path.join(dir, `backing-${attached.length}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, sizeBytes);
  try {
    const device = execFileSync('losetup', ['-f', '--show', '--sector-size', String(sectorBytes), file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    attached.push(device);
    return device;
  } catch {
    return undefined;
  }
}

function loopDevicesWork(): boolean {
  if (process.getuid?.() !== 0 || !hasTool('losetup')) return false;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-loop-probe-'));
  try {
    const device = attachLoop(1024 * 1024, dir);
    return device !== undefined;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const canLoop = loopDevicesWork();

afterAll(() => {
  for (const device of attached.splice(0)) {
    try {
      execFileSync('losetup', ['-d', device], { stdio: 'ignore' });
    } catch {
      // Already detached (autoclear) or gone: nothing to release.
    }
  }
});

if (canLoop) {
  runConformanceSuite('raw block device (loop)', {
    create: async (sizeBytes) => {
      const device = attachLoop(sizeBytes, tempDir());
      if (device === undefined) throw new Error('losetup failed after the probe worked');
      return openDisk(`raw:${device}`, { create: { sizeBytes } });
    },
    reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
  }, { sizeBytes: 4 * 1024 * 1024, operations: 150 });
}

describe.skipIf(!canLoop)('raw block device', () => {
  it('is resynced whole by resync --create although it held old data (a recycled LUN)', async () => {
    const dir = tempDir();
    const sizeBytes = 4 * 1024 * 1024;
    const device = attachLoop(sizeBytes, dir)!;
    fs.writeFileSync(device, crypto.randomBytes(sizeBytes));
    // The recovered disk: zeroes but for its first 4 KiB.
    const source = path.join(dir, 'recovered.img');
    const content = Buffer.alloc(sizeBytes);
    crypto.randomBytes(4096).copy(content);
    fs.writeFileSync(source, content);
    await resyncDisks(`raw:${source}`, `raw:${device}`, { create: true });
    expect(fs.readFileSync(device).equals(content)).toBe(true);
  });

  it('reads the device size from sysfs, keeps to 512-byte sectors and refuses a create larger than the device', async () => {
    const device = attachLoop(2 * 1024 * 1024, tempDir())!;
    const t = await openDisk(`raw:${device}`);
    expect(t.sizeBytes).toBe(2 * 1024 * 1024);
    expect(t.capabilities).toMatchObject({ alignmentBytes: 512, sparse: false });
    await t.close();
    await expect(openDisk(`raw:${device}`, { create: { sizeBytes: 4 * 1024 * 1024 } })).rejects.toMatchObject({ code: 'BR_TARGET_SIZE_MISMATCH' });
  });

  it('discards by zeroing without writing where the device can: a loop device punches its backing file', async () => {
    const dir = tempDir();
    const device = attachLoop(16 * 1024 * 1024, dir)!;
    const backing = path.join(dir, `backing-${attached.length - 1}.img`);
    const t = await openDisk(`raw:${device}`);
    expect(t.capabilities).toMatchObject({ discard: true, sparse: false });
    const content = Buffer.alloc(16 * 1024 * 1024, 0x6b);
    await t.write(0, content);
    await t.flush();
    const before = fs.statSync(backing).blocks * 512;
    await t.discard(1024 * 1024, 8 * 1024 * 1024);
    await t.writeZeroes(12 * 1024 * 1024 + 512, 1024);
    await t.flush();
    content.fill(0, 1024 * 1024, 9 * 1024 * 1024).fill(0, 12 * 1024 * 1024 + 512, 12 * 1024 * 1024 + 1536);
    expect((await t.read(0, t.sizeBytes)).equals(content)).toBe(true);
    expect(before - fs.statSync(backing).blocks * 512).toBeGreaterThanOrEqual(8 * 1024 * 1024);
    await t.close();
  });

  it('punches whole logical blocks of a 4 KiB-sector device and writes zeroes at the 512-byte edges', async () => {
    const dir = tempDir();
    const device = attachLoop(8 * 1024 * 1024, dir, 4096)!;
    const t = await openDisk(`raw:${device}`);
    expect(t.capabilities.discard).toBe(true);
    const content = Buffer.alloc(8 * 1024 * 1024, 0x3c);
    await t.write(0, content);
    await t.discard(4096 + 512, 3 * 1024 * 1024);
    await t.writeZeroes(5 * 1024 * 1024 + 1024, 1024);
    content.fill(0, 4096 + 512, 4096 + 512 + 3 * 1024 * 1024).fill(0, 5 * 1024 * 1024 + 1024, 5 * 1024 * 1024 + 2048);
    expect((await t.read(0, t.sizeBytes)).equals(content)).toBe(true);
    await t.close();
    const reopened = await openDisk(`raw:${device}`, { readOnly: true });
    expect(reopened.capabilities.discard).toBe(false);
    expect((await reopened.read(0, reopened.sizeBytes)).equals(content)).toBe(true);
    await reopened.close();
  });
});
