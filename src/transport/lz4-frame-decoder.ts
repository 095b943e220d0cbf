import { Transform, type TransformCallback } from 'node:stream';
import lz4 from 'lz4';
import { loadXxhash, type XxhashApi } from '../platform/xxhash';
import { BlockrelayError } from '../retry/blockrelay-error';

/**
 * A streaming LZ4 frame decoder (lz4_Frame_format.md) for the master
 * target's side of the forward hop.
 *
 * It replaces the lz4 package's stream decoder, which concatenates its
 * buffered input with every incoming chunk (an allocation and a copy of
 * every byte at least once more, and a full garbage collection every few
 * tens of MB at 200 MB/s). This one keeps no input: a stored (uncompressed)
 * block is passed on as views of the chunks it arrived in, a compressed
 * block is assembled only when it spans chunks and decompressed natively
 * (the lz4 package's block decoder) into a buffer of its own.
 *
 * It reads any frame the format allows except two it cannot decode
 * correctly without a dictionary: linked blocks (B.Indep = 0) and a
 * dictionary id, both refused. Block checksums, the content checksum and
 * the content size are checked when the frame carries them; skippable
 * frames are skipped; frames may follow one another. Damage is BR_PROTOCOL
 * naming the byte offset in the stream; a stream that ends inside a frame is
 * BR_UPLOAD_INCOMPLETE.
 */
const LZ4_FRAME_MAGIC = 0x184d2204;
const SKIPPABLE_MAGIC_MASK = 0xfffffff0;
const SKIPPABLE_MAGIC = 0x184d2a50;
const STORED_BIT = 0x8000_0000;

/** Block maximum sizes by the BD byte's code (4..7). */
const BLOCK_MAX_BYTES: Readonly<Record<number, number>> = { 4: 64 * 1024, 5: 256 * 1024, 6: 1024 * 1024, 7: 4 * 1024 * 1024 };

/** FLG bits. */
const FLG_VERSION_MASK = 0b1100_0000;
const FLG_VERSION_01 = 0b0100_0000;
const FLG_BLOCK_INDEPENDENT = 0b0010_0000;
const FLG_BLOCK_CHECKSUM = 0b0001_0000;
const FLG_CONTENT_SIZE = 0b0000_1000;
const FLG_CONTENT_CHECKSUM = 0b0000_0100;
const FLG_RESERVED = 0b0000_0010;
const FLG_DICT_ID = 0b0000_0001;

type State =
  | 'magic'
  | 'flagBytes'
  | 'descriptorRest'
  | 'blockSize'
  | 'block'
  | 'blockChecksum'
  | 'contentChecksum'
  | 'skippableSize'
  | 'skip';

type Hasher32 = ReturnType<XxhashApi['create32']>;

let xxhash: Promise<XxhashApi> | undefined;

export class Lz4FrameDecoder extends Transform {
  private xx: XxhashApi | undefined;
  private state: State = 'magic';
  /** The fixed-size field being read (magic, descriptor, sizes, checksums), up to 15 bytes. */
  private readonly field = Buffer.alloc(16);
  private fieldBytes = 0;
  private fieldNeed = 4;
  /** Stream offset of the first byte of the current field or block (for error messages). */
  private fieldAt = 0;
  /** Bytes of the stream consumed so far. */
  private at = 0;
  private flg = 0;
  private blockMaxBytes = 0;
  private blockLength = 0;
  private blockStored = false;
  private blockParts: Buffer[] = [];
  private blockGot = 0;
  private contentSize: bigint | undefined;
  /** Bytes of the current frame delivered (a number: a BigInt per block was garbage; frames stay far below 2^53). */
  private contentBytes = 0;
  private contentHasher: Hasher32 | undefined;
  private skipLeft = 0;
  /** Frames decoded completely (tests, diagnostics). */
  frames = 0;

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    if (this.xx !== undefined) {
      this.run(chunk, done);
      return;
    }
    xxhash ??= loadXxhash();
    xxhash.then(
      (api) => {
        this.xx = api;
        this.run(chunk, done);
      },
      (err: Error) => done(err),
    );
  }

  override _flush(done: TransformCallback): void {
    if (this.state !== 'magic' || this.fieldBytes !== 0) {
      done(new BlockrelayError('BR_UPLOAD_INCOMPLETE', `lz4 stream ends inside a frame at byte ${this.at}`, { details: { offset: this.at } }));
      return;
    }
    done();
  }

  private run(chunk: Buffer, done: TransformCallback): void {
    try {
      this.consume(chunk);
      done();
    } catch (err) {
      done(err as Error);
    }
  }

  private damage(offset: number, why: string): BlockrelayError {
    return new BlockrelayError('BR_PROTOCOL', `lz4 stream at byte ${offset}: ${why}`, { details: { offset } });
  }

  private consume(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length) {
      if (this.state === 'block') {
        const take = Math.min(this.blockLength - this.blockGot, chunk.length - pos);
        const part = chunk.subarray(pos, pos + take);
        pos += take;
        this.at += take;
        this.blockGot += take;
        if (this.passesThrough()) this.deliver(part);
        else this.blockParts.push(part);
        if (this.blockGot === this.blockLength) this.blockDone();
        continue;
      }
      if (this.state === 'skip') {
        const take = Math.min(this.skipLeft, chunk.length - pos);
        pos += take;
        this.at += take;
        this.skipLeft -= take;
        if (this.skipLeft === 0) this.expect('magic', 4);
        continue;
      }
      const take = Math.min(this.fieldNeed - this.fieldBytes, chunk.length - pos);
      chunk.copy(this.field, this.fieldBytes, pos, pos + take);
      this.fieldBytes += take;
      pos += take;
      this.at += take;
      if (this.fieldBytes === this.fieldNeed) this.fieldDone();
    }
  }

  /** A stored block without a block checksum goes out as it arrives: nothing to check first. */
  private passesThrough(): boolean {
    return this.blockStored && (this.flg & FLG_BLOCK_CHECKSUM) === 0;
  }

  private expect(state: State, bytes: number): void {
    this.state = state;
    this.fieldNeed = bytes;
    this.fieldBytes = 0;
    this.fieldAt = this.at;
  }

  private fieldDone(): void {
    const f = this.field;
    switch (this.state) {
      case 'magic': {
        const magic = f.readUInt32LE(0);
        if (magic === LZ4_FRAME_MAGIC) {
          this.expect('flagBytes', 2);
          return;
        }
        if (((magic & SKIPPABLE_MAGIC_MASK) >>> 0) === SKIPPABLE_MAGIC) {
          this.expect('skippableSize', 4);
          return;
        }
        throw this.damage(this.fieldAt, `magic number 0x${magic.toString(16)} is not an LZ4 frame's`);
      }
      case 'flagBytes': {
        const flg = f[0]!;
        const bd = f[1]!;
        if ((flg & FLG_VERSION_MASK) !== FLG_VERSION_01) throw this.damage(this.fieldAt, `frame version bits ${(flg >> 6).toString(2)} are not 01`);
        if ((flg & FLG_RESERVED) !== 0 || (bd & 0b1000_1111) !== 0) throw this.damage(this.fieldAt, 'reserved descriptor bits are set');
        if ((flg & FLG_BLOCK_INDEPENDENT) === 0) throw this.damage(this.fieldAt, 'linked blocks (B.Indep = 0) are not supported');
        if ((flg & FLG_DICT_ID) !== 0) throw this.damage(this.fieldAt, 'frames with a dictionary id are not supported');
        const max = BLOCK_MAX_BYTES[(bd >> 4) & 0b111];
        if (max === undefined) throw this.damage(this.fieldAt + 1, `block maximum size code ${(bd >> 4) & 0b111} is not 4..7`);
        this.flg = flg;
        this.blockMaxBytes = max;
        // The rest: content size (8) if present, then the header checksum (1). The field keeps FLG and BD for the checksum.
        this.state = 'descriptorRest';
        this.fieldNeed = 2 + ((flg & FLG_CONTENT_SIZE) !== 0 ? 8 : 0) + 1;
        return;
      }
      case 'descriptorRest': {
        const described = this.fieldNeed - 1;
        const expected = (this.xx!.h32Raw(f.subarray(0, described), 0) >>> 8) & 0xff;
        if (f[described] !== expected) throw this.damage(this.fieldAt + described, `header checksum 0x${f[described]!.toString(16)} is not 0x${expected.toString(16)}`);
        this.contentSize = (this.flg & FLG_CONTENT_SIZE) !== 0 ? f.readBigUInt64LE(2) : undefined;
        this.contentBytes = 0;
        this.contentHasher = (this.flg & FLG_CONTENT_CHECKSUM) !== 0 ? this.xx!.create32(0) : undefined;
        this.expect('blockSize', 4);
        return;
      }
      case 'blockSize': {
        const word = f.readUInt32LE(0);
        if (word === 0) {
          if (this.contentSize !== undefined && this.contentSize !== BigInt(this.contentBytes)) {
            throw this.damage(this.fieldAt, `frame holds ${this.contentBytes} bytes, its header says ${this.contentSize}`);
          }
          if (this.contentHasher !== undefined) this.expect('contentChecksum', 4);
          else this.frameDone();
          return;
        }
        this.blockStored = (word & STORED_BIT) !== 0;
        this.blockLength = (word & ~STORED_BIT) >>> 0;
        if (this.blockLength > this.blockMaxBytes) throw this.damage(this.fieldAt, `block of ${this.blockLength} bytes exceeds the frame's ${this.blockMaxBytes}-byte blocks`);
        this.blockParts.length = 0;
        this.blockGot = 0;
        this.state = 'block';
        this.fieldAt = this.at;
        if (this.blockLength === 0) this.blockDone();
        return;
      }
      case 'blockChecksum': {
        const data = this.blockData();
        const expected = this.xx!.h32Raw(data, 0) >>> 0;
        if (f.readUInt32LE(0) !== expected) throw this.damage(this.fieldAt, `block checksum 0x${f.readUInt32LE(0).toString(16)} is not 0x${expected.toString(16)}`);
        this.output(data, this.fieldAt - this.blockLength);
        this.expect('blockSize', 4);
        return;
      }
      case 'contentChecksum': {
        const expected = Number(this.contentHasher!.digest()) >>> 0;
        if (f.readUInt32LE(0) !== expected) throw this.damage(this.fieldAt, `content checksum 0x${f.readUInt32LE(0).toString(16)} is not 0x${expected.toString(16)}`);
        this.frameDone();
        return;
      }
      case 'skippableSize':
        this.skipLeft = f.readUInt32LE(0);
        this.state = 'skip';
        if (this.skipLeft === 0) this.expect('magic', 4);
        return;
      default:
        throw new BlockrelayError('BR_INTERNAL', `lz4 decoder in state ${this.state} reading a field`);
    }
  }

  private frameDone(): void {
    this.frames++;
    this.contentHasher = undefined;
    this.expect('magic', 4);
  }

  private blockData(): Buffer {
    return this.blockParts.length === 1 ? this.blockParts[0]! : Buffer.concat(this.blockParts, this.blockLength);
  }

  private blockDone(): void {
    const blockAt = this.at - this.blockLength;
    if ((this.flg & FLG_BLOCK_CHECKSUM) !== 0) {
      this.expect('blockChecksum', 4);
      return;
    }
    if (!this.passesThrough()) this.output(this.blockData(), blockAt);
    this.blockParts.length = 0;
    this.expect('blockSize', 4);
  }

  /** A whole block's data (checked against its checksum if it had one): decompressed if need be, then passed on. */
  private output(data: Buffer, blockAt: number): void {
    // One parts array for the decoder's life: emptied, not replaced, per block.
    this.blockParts.length = 0;
    if (this.blockStored) {
      this.deliver(data);
      return;
    }
    const out = Buffer.allocUnsafe(this.blockMaxBytes);
    const n = data.length === 0 ? -1 : (lz4.decodeBlock(data, out) as number);
    if (n < 0) throw this.damage(blockAt, `compressed block of ${data.length} bytes does not decode`);
    this.deliver(out.subarray(0, n));
  }

  private deliver(data: Buffer): void {
    if (data.length === 0) return;
    this.contentBytes += data.length;
    this.contentHasher?.update(data);
    this.push(data);
  }
}
