import { MAX_FD, requireInteger } from './addon-arguments';
import { loadNative } from './native';

/**
 * Reading a file range and hashing it in fixed blocks in one native pass on
 * the libuv thread pool (native/block-hashing.cc): XXH64, seed 0, of each
 * block, the same hashes as BlockHasher.hashBlocks over the same bytes.
 *
 * Why native: a resync of a local disk spends its time copying the disk out
 * of the page cache and hashing it. Doing both on a pool thread, a 256 KiB
 * piece at a time (still in L2 when hashed), keeps the main thread free and
 * lets the source side and the target side of an in-process resync hash on
 * two cores at once (bench/resync.bench.ts).
 */
interface BlockHashingAddon {
  preadHashBlocks(fd: number, fileOffset: number, length: number, blockBytes: number, dest: Uint8Array | null, hashes: Uint8Array): Promise<number | string> | undefined;
  xxh64Blocks(data: Uint8Array, blockBytes: number, out: Uint8Array, scalar: boolean): true | undefined;
  xxh64BlocksVectorized(): boolean;
}

/** Most bytes one call reads (native kMaxLengthBytes). */
export const MAX_HASHED_READ_BYTES = 256 * 1024 * 1024;
/** Largest block (native kMaxBlockBytes, resync-wire MAX_BLOCK_BYTES). */
const MAX_BLOCK_BYTES = 16 * 1024 * 1024;
/** What one call read: the block hashes and how many bytes the file really held. */
export interface HashedRead {
  /** 8 bytes per block, little-endian XXH64, in block order. */
  readonly hashes: Buffer;
  /** Bytes the file held (below `length` when it ended early; the rest read as zeroes). */
  readonly bytesHeld: number;
}

/**
 * XXH64 (seed 0) of each block of `blockBytes` in `data` (the last may be
 * shorter), 8 bytes little-endian per block, in one native call: the same
 * hashes as xxh64 on each block. On CPUs with AVX-512 (F, VL, DQ) the addon
 * hashes eight blocks side by side (native/xxhash64.cc), several times the
 * scalar speed on 4 KiB blocks; `scalar` forces the plain code, so tests can
 * hold the two to the same answers.
 */
export function xxh64Blocks(data: Uint8Array, blockBytes: number, options: { scalar?: boolean } = {}): Buffer {
  if (!(data instanceof Uint8Array)) throw new TypeError('xxh64Blocks: data must be a Uint8Array');
  requireInteger('xxh64Blocks: blockBytes', blockBytes, 1, MAX_BLOCK_BYTES);
  const out = Buffer.allocUnsafe(Math.ceil(data.length / blockBytes) * 8);
  if (loadNative<BlockHashingAddon>().xxh64Blocks(data, blockBytes, out, options.scalar === true) !== true) throw new Error('addon refused xxh64Blocks arguments');
  return out;
}

/** Whether xxh64Blocks and preadHashBlocks use the AVX-512 code on this CPU. */
export function xxh64BlocksVectorized(): boolean {
  return loadNative<BlockHashingAddon>().xxh64BlocksVectorized();
}

/**
 * Reads `[fileOffset, fileOffset + length)` of `fd` and hashes it in blocks
 * of `blockBytes` (the last may be shorter). With `dest` the bytes are left
 * there too. Bytes past the end of the file count as zeroes. A failed read
 * rejects with a Node-style error whose `code` is the errno name, so callers
 * wrap it as they wrap `node:fs` errors. The caller keeps `fd` open until
 * the promise settles.
 */
export async function preadHashBlocks(fd: number, fileOffset: number, length: number, blockBytes: number, dest?: Buffer): Promise<HashedRead> {
  requireInteger('preadHashBlocks: fd', fd, 0, MAX_FD);
  requireInteger('preadHashBlocks: fileOffset', fileOffset, 0, Number.MAX_SAFE_INTEGER - length);
  requireInteger('preadHashBlocks: length', length, 1, MAX_HASHED_READ_BYTES);
  requireInteger('preadHashBlocks: blockBytes', blockBytes, 1, MAX_BLOCK_BYTES);
  if (dest !== undefined && dest.length < length) throw new RangeError(`preadHashBlocks: dest holds ${dest.length} bytes, ${length} needed`);
  const hashes = Buffer.allocUnsafe(Math.ceil(length / blockBytes) * 8);
  const pending = loadNative<BlockHashingAddon>().preadHashBlocks(fd, fileOffset, length, blockBytes, dest ?? null, hashes);
  if (pending === undefined) throw new Error('addon refused preadHashBlocks arguments');
  const result = await pending;
  if (typeof result === 'number') return { hashes, bytesHeld: result };
  const err: NodeJS.ErrnoException = new Error(`${result}: pread on fd ${fd} at offset ${fileOffset} length ${length} failed`);
  err.code = result;
  err.syscall = 'pread';
  throw err;
}
