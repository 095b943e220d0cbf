import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openDisk } from '../../src/targets/disk-spec';
import { hasTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { runConformanceSuite } from './conformance';

const tempDir = useTempDirs();
const attached: string[] = [];

/** Attaches a loop device over a fresh sparse file; undefined where loop devices cannot be made (not root, a container without /dev/loop-control). */
function attachLoop(sizeBytes: number, dir: string): string | undefined {
  const file = path.join(dir, `backing-${attached.length}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, sizeBytes);
  try {
    const device = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
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
  it('reads the device size from sysfs, keeps to 512-byte sectors and refuses a create larger than the device', async () => {
    const device = attachLoop(2 * 1024 * 1024, tempDir())!;
    const t = await openDisk(`raw:${device}`);
    expect(t.sizeBytes).toBe(2 * 1024 * 1024);
    expect(t.capabilities).toMatchObject({ alignmentBytes: 512, sparse: false });
    await t.close();
    await expect(openDisk(`raw:${device}`, { create: { sizeBytes: 4 * 1024 * 1024 } })).rejects.toMatchObject({ code: 'BR_TARGET_SIZE_MISMATCH' });
  });
});
