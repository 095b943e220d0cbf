import * as os from 'node:os';
import { loadXxhash as xxhash } from '../platform/xxhash';
import { BlockrelayError } from '../retry/blockrelay-error';
import { xxh64Blocks } from '../platform/block-hashing';
import { xxh64 as nativeXxh64 } from '../tracking/dirty-map';

/** Bytes in one block hash on the wire and in memory: an xxh64 digest, little-endian. */
export const HASH_BYTES = 8;

/** Seed of every resync hash; both sides must agree, so it is a fixed part of the protocol. */
const HASH_SEED = 0n;

/** xxh64 (seed 0) of `data[offset, offset + length)`. */
type RangeHash = (data: Uint8Array, offset: number, length: number) => bigint;

/** Which xxh64 implementation a hasher uses; both give the same hashes. */
export type HasherImplementation = 'native' | 'wasm';

/** Hashes of every block of `data`, 8 bytes little-endian each. */
type BlocksHash = (data: Uint8Array, blockSizeBytes: number) => Buffer;

type Loaded = { hash: RangeHash; implementation: HasherImplementation; blocks?: BlocksHash };

let loadingBest: Promise<Loaded> | undefined;
let loadingWasm: Promise<Loaded> | undefined;

async function loadWasm(): Promise<Loaded> {
  const { h64Raw } = await xxhash();
  return { hash: (data, offset, length) => h64Raw(data.subarray(offset, offset + length), HASH_SEED), implementation: 'wasm' };
}

/**
 * The faster implementation available: the addon's xxh64 (a whole buffer
 * of blocks per call, in place: about 22 GB/s on 4 KiB blocks in cache here,
 * 64-70 GB/s where AVX-512 hashes eight blocks side by side) when the addon is
 * built, else xxhash-wasm's h64Raw (about 4-7 GB/s: it copies each block
 * into wasm memory and needs a subarray per block).
 */
async function loadBest(): Promise<Loaded> {
  try {
    const probe = Buffer.from('blockrelay');
    nativeXxh64(probe, 0, probe.length);
    return { hash: nativeXxh64, implementation: 'native', blocks: xxh64Blocks };
  } catch {
    // The addon is not built (BR_NATIVE_UNAVAILABLE): the wasm one works everywhere.
    return (loadingWasm ??= loadWasm());
  }
}

/**
 * Hashes disk blocks with xxh64, seed 0: the addon's when it is built,
 * xxhash-wasm's otherwise (they agree bit for bit, so the two sides of a
 * resync may use different ones).
 *
 * Measured on the 2-core machine (bench/resync.bench.ts prints it each run):
 * xxhash-wasm about 4-7 GB/s on 4 KiB blocks and 12 GB/s on 64 KiB blocks,
 * the addon 22 GB/s scalar and 64-70 GB/s with AVX-512 on 4 KiB blocks in
 * cache — above what copying the disk out of the page cache gives, so the resync hashes at the finest block size and derives coarser
 * hashes from the fine ones (`groupHashes`): one pass over the data serves
 * every level. Disks in a local file skip this class for the bulk work:
 * DiskTarget.hashBlocks reads and hashes them natively off the main thread
 * (the same xxh64, so the two paths agree).
 */
export class BlockHasher {
  private constructor(
    private readonly h64: RangeHash,
    readonly implementation: HasherImplementation,
    private readonly blocks: BlocksHash | undefined,
  ) {}

  /** Loads the implementation once per process; `'wasm'` forces xxhash-wasm (for measuring both). */
  static async create(prefer?: 'wasm'): Promise<BlockHasher> {
    // Hashes are stored through a BigUint64Array (a plain store, far cheaper
    // than writeBigUInt64LE per block), which uses the host's byte order; the
    // wire and state formats are little-endian.
    if (os.endianness() !== 'LE') throw new BlockrelayError('BR_INTERNAL', 'the resync block hasher needs a little-endian host');
    const { hash, implementation, blocks } = await (prefer === 'wasm' ? (loadingWasm ??= loadWasm()) : (loadingBest ??= loadBest()));
    return new BlockHasher(hash, implementation, blocks);
  }

  /** xxh64 of `data` as a bigint. */
  hash(data: Uint8Array): bigint {
    return this.h64(data, 0, data.length);
  }

  /**
   * Hashes `data` in blocks of `blockSizeBytes`; a shorter last block (the
   * end of a disk whose size is not a multiple of the block) is hashed as it
   * is. Returns `HASH_BYTES` per block, in block order.
   */
  hashBlocks(data: Uint8Array, blockSizeBytes: number): Buffer {
    // The addon hashes the whole buffer in one call (and, with AVX-512, eight blocks at a time).
    if (this.blocks !== undefined) return this.blocks(data, blockSizeBytes);
    const count = Math.ceil(data.length / blockSizeBytes);
    const hashes = new BigUint64Array(count);
    for (let i = 0; i < count; i++) {
      const start = i * blockSizeBytes;
      hashes[i] = this.h64(data, start, Math.min(blockSizeBytes, data.length - start));
    }
    return Buffer.from(hashes.buffer, 0, count * HASH_BYTES);
  }

  /**
   * Coarse hashes from fine ones: hash number g is xxh64 over the fine hashes
   * `[g * groupBlocks, (g + 1) * groupBlocks)` (the last group may be
   * shorter). With `groupBlocks` 1 the fine hashes come back unchanged. Both
   * sides derive coarse hashes this way, so a coarse hash matches exactly
   * when every fine hash under it matches (up to xxh64 collisions).
   */
  groupHashes(fineHashes: Buffer, groupBlocks: number): Buffer {
    if (groupBlocks === 1) return fineHashes;
    // A group's hash is xxh64 over its run of fine hashes: blocks of groupBlocks hashes.
    if (this.blocks !== undefined) return this.blocks(fineHashes, groupBlocks * HASH_BYTES);
    const fineCount = fineHashes.length / HASH_BYTES;
    const count = Math.ceil(fineCount / groupBlocks);
    const hashes = new BigUint64Array(count);
    for (let g = 0; g < count; g++) {
      const start = g * groupBlocks * HASH_BYTES;
      const end = Math.min(start + groupBlocks * HASH_BYTES, fineHashes.length);
      hashes[g] = this.h64(fineHashes, start, end - start);
    }
    return Buffer.from(hashes.buffer, 0, count * HASH_BYTES);
  }

}
