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
 * rename, fsync of the directory. The temporary name carries the pid and a
 * per-process counter, so no two writes ever share one: two processes, or
 * two overlapping saves of one file in a process, each rename their own
 * whole file (the last rename wins; callers that read, modify and write a
 * file must still serialise that themselves). Temporaries a crash leaves end
 * in `.tmp`, which the owners' open-time cleanup removes.
 */
export async function writeFileDurably(file: string, content: string | Uint8Array): Promise<void> {
  const tmp = `${file}.${process.pid}-${++temporaryCounter}.tmp`;
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

/** Temporaries this process created so far: the last part of each one's name. */
let temporaryCounter = 0;

/**
 * How writeFileDurably names a temporary: `<file>.<pid>-<n>.tmp`, and
 * `<file>.<pid>.tmp` as releases before the counter named them (a crash of
 * such a process can still have left one).
 */
const TEMPORARY_NAME = /^(.+)\.(\d+)(?:-\d+)?\.tmp$/;

/**
 * Removes the temporaries writeFileDurably left in `dir` when a process died
 * between creating one and renaming it: `<file>.<pid>-<n>.tmp` whose pid is not
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
