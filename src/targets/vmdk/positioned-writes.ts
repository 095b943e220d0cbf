import { loadNative } from '../../platform/native';
import { MAX_FD, requireInteger } from '../../platform/addon-arguments';

interface PositionedWritesAddon {
  writeAt(fd: number, buffers: Buffer[], positions: Float64Array): Promise<0 | [string, number]> | undefined;
}

/** Pieces one `writeAt` call takes at most (the addon's bound). */
export const WRITE_AT_MAX_PIECES = 1 << 20;

/** One write of `writeAt`: `buffer` at file offset `position`. */
export interface PositionedPiece {
  readonly position: number;
  readonly buffer: Buffer;
}

/**
 * Writes every piece at its file offset from one libuv thread-pool job
 * (native/positioned-writes.cc), in the given order, pieces that meet in
 * the file joined into one pwritev. A log of 64 KiB writes otherwise costs
 * a pool round trip per write (a queue lock, a thread wake-up, an eventfd
 * and a promise each).
 *
 * Resolves once all are written; rejects with an errno error (`code` set,
 * so `wrapError` classifies ENOSPC as a full disk) naming the offset of the
 * piece that failed. Pieces before it were written, later ones not. The
 * buffers must not change and `fd` must stay open until it settles.
 */
export async function writeAt(fd: number, pieces: readonly PositionedPiece[]): Promise<void> {
  if (pieces.length === 0) return;
  requireInteger('writeAt: fd', fd, 0, MAX_FD);
  requireInteger('writeAt: pieces', pieces.length, 1, WRITE_AT_MAX_PIECES);
  const buffers: Buffer[] = new Array<Buffer>(pieces.length);
  const positions = new Float64Array(pieces.length);
  for (let i = 0; i < pieces.length; i++) {
    const p = pieces[i]!;
    requireInteger('writeAt: position', p.position, 0, Number.MAX_SAFE_INTEGER);
    requireInteger('writeAt: length', p.buffer.length, 1, Number.MAX_SAFE_INTEGER);
    buffers[i] = p.buffer;
    positions[i] = p.position;
  }
  const pending = loadNative<PositionedWritesAddon>().writeAt(fd, buffers, positions);
  if (pending === undefined) throw new Error('addon refused writeAt arguments');
  const result = await pending;
  if (result === 0) return;
  const [name, index] = result;
  const at = pieces[index]?.position ?? -1;
  const err: NodeJS.ErrnoException = new Error(`${name}: pwritev on fd ${fd} at offset ${at} failed`);
  err.code = name;
  err.syscall = 'pwritev';
  throw err;
}
