import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';

/** statfs f_type of tmpfs (linux/magic.h TMPFS_MAGIC). */
const TMPFS_MAGIC = 0x01021994;

/** Bytes of `file` in the page cache, as util-linux fincore counts them. */
export function residentBytes(file: string): number {
  return Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' }).trim());
}

/**
 * Whether POSIX_FADV_DONTNEED can drop the pages of files under `dir`. Not on
 * tmpfs: its pages are the files themselves (shmem), so the advice is a no-op
 * and a residency check after a drop would fail with nothing wrong (CI
 * containers often have /tmp on tmpfs). Tests then skip only that check.
 */
export function pageCacheDroppable(dir: string): boolean {
  return fs.statfsSync(dir).type !== TMPFS_MAGIC;
}
