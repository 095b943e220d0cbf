import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach } from 'vitest';

/** Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN, as on the dev and CI machines). */
export function canMountTmpfs(): boolean {
  if (process.getuid?.() !== 0) return false;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-mount-probe-'));
  try {
    if (spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', dir]).status !== 0) return false;
    spawnSync('umount', [dir]);
    return true;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Small volumes that really fill (ENOSPC), each a fresh tmpfs of the size
 * asked for, unmounted and removed after the test that made it.
 */
export function useSmallVolumes(): (size: string) => string {
  const mounts: string[] = [];
  afterEach(() => {
    for (const m of mounts.splice(0)) {
      spawnSync('umount', [m]);
      fs.rmSync(m, { recursive: true, force: true });
    }
  });
  return (size) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-small-volume-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir]);
    mounts.push(dir);
    return dir;
  };
}
