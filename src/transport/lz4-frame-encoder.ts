import lz4 from 'lz4';
import { loadXxhash, type XxhashApi } from '../platform/xxhash';

/**
 * An LZ4 frame encoder (the frame format of lz4's lz4_Frame_format.md:
 * magic, descriptor, blocks, end mark) for the process server -> master
 * target hop, which any LZ4 frame decoder reads (the receiver uses the lz4
 * package's).
 *
 * Logs of random writes are mostly incompressible, and compressing a block
 * only to store it uncompressed afterwards (as LZ4 frames allow and every
 * encoder does) spent most of the forwarder's CPU. So this encoder backs
 * off: after a block that does not compress (shrink by `minSaving`: 1/32
 * on a paced link, 1/8 on an unpaced one) it stores the next blocks
 * uncompressed without trying, 1, 2, 4 ... up to 64 blocks (4 MiB), then
 * tries again; a block that compresses resets the back-off. Compressible
 * logs are compressed as before; the frame is valid LZ4 either way.
 *
 * Blocks are independent, 64 KiB at most (the lz4 package's stream decoder
 * copies its input once per chunk until a block is whole, so its cost grows
 * with the square of the block size), without block or content checksums:
 * the envelope's xxhash64 of the whole log covers integrity end to end.
 */
export const LZ4_FRAME_BLOCK_BYTES = 64 * 1024;

/** Longest run of blocks stored without trying to compress them. */
const MAX_BACKOFF_BLOCKS = 64;

/**
 * A block must shrink by at least this fraction to be stored compressed,
 * on a link paced by a bandwidth limit: there the link is the bottleneck,
 * and any saving is throughput.
 */
export const LZ4_MIN_SAVING_PACED = 1 / 32;

/**
 * The same on an unpaced link (a LAN, loopback). Compressing costs about
 * as much CPU per byte as sending the byte: fio's 64 KiB blocks (one
 * random buffer, lightly scrambled) shrink by about 6.5%, and compressing
 * them took 2.2 CPU-s of the process server's thread in the e2e bench's
 * quick run (about 1.5 s per GB), more than all its other work on the
 * log. A block that does not save an eighth is sent stored, and backs off.
 */
export const LZ4_MIN_SAVING_UNPACED = 1 / 8;

export interface Lz4FrameEncoderOptions {
  /** Least fraction a block must shrink by to be stored compressed (default LZ4_MIN_SAVING_PACED). */
  readonly minSaving?: number;
}

const LZ4_FRAME_MAGIC = 0x184d2204;
/** FLG: version 01, independent blocks, no block checksum, no content size, no content checksum, no dictionary. */
const FLG = 0b0110_0000;
/** BD: block maximum size 64 KiB (code 4). */
const BD = 4 << 4;
const UNCOMPRESSED_BIT = 0x8000_0000;

let xxhash: Promise<XxhashApi> | undefined;

/** The frame header: magic, FLG, BD and the header checksum (second byte of xxh32 of FLG..BD). */
async function frameHeader(): Promise<Buffer> {
  xxhash ??= loadXxhash();
  const api = await xxhash;
  const header = Buffer.alloc(7);
  header.writeUInt32LE(LZ4_FRAME_MAGIC, 0);
  header[4] = FLG;
  header[5] = BD;
  header[6] = (api.h32Raw(header.subarray(4, 6), 0) >>> 8) & 0xff;
  return header;
}

/**
 * The frame's pieces come from `encodeLaidOut` (a sender reading a log into
 * a frame's layout: log-client.ts) or `encodeChunk` (chunks that are never
 * reused: cut-through-forward.ts), after `header()` and before `finish()`.
 * The encoder holds only the back-off state between calls.
 */
export class Lz4FrameEncoder {
  private skip = 0;
  private backoff = 0;
  /** Blocks stored compressed and uncompressed (tests, diagnostics). */
  compressedBlocks = 0;
  storedBlocks = 0;
  private readonly minSaving: number;

  constructor(options: Lz4FrameEncoderOptions = {}) {
    this.minSaving = options.minSaving ?? LZ4_MIN_SAVING_PACED;
  }

  /** The frame header: the first piece of every frame (`encodeChunk`, `encodeLaidOut` and `finish` do not emit it). */
  static header(): Promise<Buffer> {
    return frameHeader();
  }

  /**
   * Encodes `chunk` as blocks of its own (64 KiB at most each; a frame's
   * blocks may be shorter than its block size) and carries nothing over to
   * the next call: for a stream of chunks that are never reused, such as
   * the chunks an upload arrives in, which a cut-through forward passes on
   * (cut-through-forward.ts). Every stored block is then a view of `chunk`
   * and no byte is copied.
   */
  encodeChunk(chunk: Buffer): Buffer[] {
    const out: Buffer[] = [];
    for (let at = 0; at < chunk.length; at += LZ4_FRAME_BLOCK_BYTES) this.block(chunk.subarray(at, Math.min(chunk.length, at + LZ4_FRAME_BLOCK_BYTES)), out);
    return out;
  }

  /** Bytes a frame buffer laid out for `encodeLaidOut` needs for `dataBytes` bytes of data. */
  static laidOutBytes(dataBytes: number): number {
    return dataBytes + 4 * Math.ceil(dataBytes / LZ4_FRAME_BLOCK_BYTES);
  }

  /** Where block `i`'s data starts in a laid-out frame buffer (its 4-byte size field is just before). */
  static laidOutDataOffset(i: number): number {
    return i * (4 + LZ4_FRAME_BLOCK_BYTES) + 4;
  }

  /**
   * Encodes data already laid out in `frame` as a frame's blocks are: each
   * block of 64 KiB of data preceded by 4 free bytes for its size field
   * (block i's data at laidOutDataOffset(i)), `dataBytes` bytes of data in
   * all, in blocks that are full but the last. The size fields of stored
   * blocks are written in place, and the pieces returned are views of
   * `frame` for each run of stored blocks and a buffer of its own for each
   * compressed block: one piece for the whole read when nothing compresses,
   * where a block of its own costs two pieces (size field and data). A
   * sender reads a log into such a buffer (readv into the blocks' data), so
   * nothing is copied either.
   */
  encodeLaidOut(frame: Buffer, dataBytes: number): Buffer[] {
    const out: Buffer[] = [];
    let runStart = -1;
    let runEnd = 0;
    for (let i = 0, left = dataBytes; left > 0; i++) {
      const at = Lz4FrameEncoder.laidOutDataOffset(i);
      const length = Math.min(LZ4_FRAME_BLOCK_BYTES, left);
      left -= length;
      const compressed = this.tryCompress(frame.subarray(at, at + length));
      if (compressed === undefined) {
        frame.writeUInt32LE((UNCOMPRESSED_BIT | length) >>> 0, at - 4);
        if (runStart < 0) runStart = at - 4;
        runEnd = at + length;
        continue;
      }
      if (runStart >= 0) out.push(frame.subarray(runStart, runEnd));
      runStart = -1;
      out.push(compressed);
    }
    if (runStart >= 0) out.push(frame.subarray(runStart, runEnd));
    return out;
  }

  /** The frame's end mark: its last piece. */
  finish(): Buffer[] {
    return [Buffer.alloc(4)];
  }

  private block(data: Buffer, out: Buffer[]): void {
    const compressed = this.tryCompress(data);
    if (compressed !== undefined) {
      out.push(compressed);
      return;
    }
    const size = Buffer.allocUnsafe(4);
    size.writeUInt32LE((UNCOMPRESSED_BIT | data.length) >>> 0, 0);
    out.push(size, data);
  }

  /**
   * The block compressed, with its size field, if it is worth it; undefined
   * when it is to be stored (counted as stored, the back-off applied).
   */
  private tryCompress(data: Buffer): Buffer | undefined {
    if (this.skip > 0) {
      this.skip--;
      this.storedBlocks++;
      return undefined;
    }
    const encoded = Buffer.allocUnsafe(4 + lz4.encodeBound(data.length));
    const size = lz4.encodeBlock(data, encoded.subarray(4));
    if (size > 0 && size <= data.length * (1 - this.minSaving)) {
      this.backoff = 0;
      this.compressedBlocks++;
      encoded.writeUInt32LE(size, 0);
      return encoded.subarray(0, 4 + size);
    }
    this.backoff = Math.min(MAX_BACKOFF_BLOCKS, Math.max(1, this.backoff * 2));
    this.skip = this.backoff;
    this.storedBlocks++;
    return undefined;
  }
}
