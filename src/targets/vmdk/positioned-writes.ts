import { loadNative } from '../../platform/native';
import { MAX_FD, requireInteger } from '../../platform/addon-arguments';

interface PositionedWritesAddon {
  writeAt(fd: number, buffers: Buffer[], positions: Float64Array): Promise<0 | [string, number]> | undefined;
  readAt(fd: number, buffers: Buffer[], positions: Float64Array): Promise<0 | [string, number]> | undefined;
}

/** Pieces one `writeAt` call takes at most (the addon's bound). */
export const WRITE_AT_MAX_PIECES = 1 << 20;

/** How `writeAt` and `readAt` fail: an errno error (or code `EOF`) with the file offset of the piece that failed. */
export interface PositionedIoError extends NodeJS.ErrnoException {
  readonly position: number;
}

/** One piece of `writeAt` / `readAt`: `buffer` at file offset `position`. */
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
export function writeAt(fd: number, pieces: readonly PositionedPiece[]): Promise<void> {
  return transfer('writeAt', fd, pieces);
}

/**
 * Reads every piece's buffer whole from its file offset, from one libuv
 * thread-pool job, pieces that meet in the file in one preadv: the undo
 * journal reads a log's scattered 64 KiB pre-images this way. Rejects as
 * `writeAt` does; a piece cut off by the end of the file fails with code
 * `EOF` and its offset.
 */
export function readAt(fd: number, pieces: readonly PositionedPiece[]): Promise<void> {
  return transfer('readAt', fd, pieces);
}

async function transfer(kind: 'writeAt' | 'readAt', fd: number, pieces: readonly PositionedPiece[]): Promise<void> {
  if (pieces.length === 0) return;
  requireInteger(`${kind}: fd`, fd, 0, MAX_FD);
  requireInteger(`${kind}: pieces`, pieces.length, 1, WRITE_AT_MAX_PIECES);
  const buffers: Buffer[] = new Array<Buffer>(pieces.length);
  const positions = new Float64Array(pieces.length);
  for (let i = 0; i < pieces.length; i++) {
    const p = pieces[i]!;
    requireInteger(`${kind}: position`, p.position, 0, Number.MAX_SAFE_INTEGER);
    requireInteger(`${kind}: length`, p.buffer.length, 1, Number.MAX_SAFE_INTEGER);
    buffers[i] = p.buffer;
    positions[i] = p.position;
  }
  const pending = loadNative<PositionedWritesAddon>()[kind](fd, buffers, positions);
  if (pending === undefined) throw new Error(`addon refused ${kind} arguments`);
  const result = await pending;
  if (result === 0) return;
  const [name, index] = result;
  const at = pieces[index]?.position ?? -1;
  const syscall = kind === 'writeAt' ? 'pwritev' : 'preadv';
  const err = new Error(name === 'EOF' ? `${syscall} on fd ${fd} at offset ${at} met the end of the file` : `${name}: ${syscall} on fd ${fd} at offset ${at} failed`);
  throw Object.assign(err, { code: name, syscall, position: at }) satisfies PositionedIoError;
}
