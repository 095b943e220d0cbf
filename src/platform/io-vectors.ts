import type * as fsp from 'node:fs/promises';

/** The buffers left after `n` bytes of them were transferred (a short readv/writev). */
export function buffersAfter(buffers: readonly Buffer[], n: number): Buffer[] {
  const out: Buffer[] = [];
  let skip = n;
  for (const b of buffers) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    out.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return out;
}

/**
 * Writes every byte of `buffers` at `position`, going on after short
 * writes (a writev may write less than asked); resolves with the position
 * after the last byte.
 */
export async function writevAll(handle: fsp.FileHandle, buffers: readonly Buffer[], position: number): Promise<number> {
  let where = position;
  let rest = buffers as Buffer[];
  while (rest.length > 0) {
    const { bytesWritten } = await handle.writev(rest, where);
    where += bytesWritten;
    rest = buffersAfter(rest, bytesWritten);
  }
  return where;
}
