import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { processAlive } from './process-liveness';

/**
 * The one way blockrelay makes small files durable. Every format that is
 * replaced whole (tracker state and sidecars, spool envelopes, ledgers,
 * retention catalogs and manifests, resync progress) goes through
 * `writeFileDurably`, so a reader after a crash sees the old file or the new
 * one, whole, never a mix.
 */

/** fsyncs a directory, making renames and creations in it durable. */
export async function syncDirectory(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** fsyncs a file written through another handle (or a stream). */
export async function fsyncFile(file: string): Promise<void> {
  const fh = await fsp.open(file, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Replaces `file` atomically and durably: a temporary file beside it, fsync,
 * rename, fsync of the directory. The temporary name carries the pid, so two
 * processes never share one; within a process, callers write one file from
 * one place at a time (each owner serialises its own saves). Temporaries a
 * crash leaves end in `.tmp`, which the owners' open-time cleanup removes.
 */
export async function writeFileDurably(file: string, content: string | Uint8Array): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  const fh = await fsp.open(tmp, 'w');
  try {
    await fh.writeFile(content);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsp.rename(tmp, file);
  await syncDirectory(path.dirname(file));
}

/** How writeFileDurably names a temporary: `<file>.<pid>.tmp`. */
const TEMPORARY_NAME = /^(.+)\.(\d+)\.tmp$/;

/**
 * Removes the temporaries writeFileDurably left in `dir` when a process died
 * between creating one and renaming it: `<file>.<pid>.tmp` whose pid is not
 * ours and not running. The file it was replacing is whole either way (the
 * rename never happened), so the temporary holds nothing anyone needs.
 * Owners call this when they open their directory; a missing directory has
 * nothing to sweep. With `files`, only temporaries of those file names are
 * touched (for a directory blockrelay does not own, such as where an
 * operator put a resync state file). Returns the names removed.
 */
export async function removeStrayTemporaries(dir: string, files?: readonly string[]): Promise<string[]> {
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const removed: string[] = [];
  for (const name of names) {
    const m = TEMPORARY_NAME.exec(name);
    if (m === null || (files !== undefined && !files.includes(m[1]))) continue;
    const pid = Number(m[2]);
    if (pid === process.pid || processAlive(pid)) continue;
    await fsp.rm(path.join(dir, name), { force: true });
    removed.push(name);
  }
  return removed;
}
