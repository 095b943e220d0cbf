import * as os from 'node:os';
import xxhash from 'xxhash-wasm';

/** Bytes in one block hash on the wire and in memory: an xxh64 digest, little-endian. */
export const HASH_BYTES = 8;

/** Seed of every resync hash; both sides must agree, so it is a fixed part of the protocol. */
const HASH_SEED = 0n;

type H64Raw = (input: Uint8Array, seed?: bigint) => bigint;

let loading: Promise<H64Raw> | undefined;

/**
 * Hashes disk blocks with xxh64 (`xxhash-wasm`).
 *
 * Measured on the 2-core CI machine (bench/resync.bench.ts prints it again
 * each run): about 7 GB/s on 4 KiB blocks and 12 GB/s on 64 KiB blocks, an
 * order of magnitude above what reading the disk gives, so the resync always
 * hashes at the finest block size and derives coarser hashes from the fine
 * ones (`groupHashes`): one pass over the data serves every level.
 */
export class BlockHasher {
  private constructor(private readonly h64: H64Raw) {}

  /** Loads the wasm module once per process. */
  static async create(): Promise<BlockHasher> {
    // Hashes are stored through a BigUint64Array (a plain store, far cheaper
    // than writeBigUInt64LE per block), which uses the host's byte order; the
    // wire and state formats are little-endian.
    if (os.endianness() !== 'LE') throw new Error('BlockHasher needs a little-endian host');
    loading ??= xxhash().then((api) => api.h64Raw);
    return new BlockHasher(await loading);
  }

  /** xxh64 of `data` as a bigint. */
  hash(data: Uint8Array): bigint {
    return this.h64(data, HASH_SEED);
  }

  /**
   * Hashes `data` in blocks of `blockSizeBytes`; a shorter last block (the
   * end of a disk whose size is not a multiple of the block) is hashed as it
   * is. Returns `HASH_BYTES` per block, in block order.
   */
  hashBlocks(data: Uint8Array, blockSizeBytes: number): Buffer {
    const count = Math.ceil(data.length / blockSizeBytes);
    const hashes = new BigUint64Array(count);
    for (let i = 0; i < count; i++) {
      const start = i * blockSizeBytes;
      hashes[i] = this.h64(data.subarray(start, Math.min(start + blockSizeBytes, data.length)), HASH_SEED);
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
    const fineCount = fineHashes.length / HASH_BYTES;
    const count = Math.ceil(fineCount / groupBlocks);
    const hashes = new BigUint64Array(count);
    for (let g = 0; g < count; g++) {
      const start = g * groupBlocks * HASH_BYTES;
      const end = Math.min(start + groupBlocks * HASH_BYTES, fineHashes.length);
      hashes[g] = this.h64(fineHashes.subarray(start, end), HASH_SEED);
    }
    return Buffer.from(hashes.buffer, 0, count * HASH_BYTES);
  }
}
