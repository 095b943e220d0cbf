import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import lz4 from 'lz4';
import { describe, expect, it } from 'vitest';
import { Lz4FrameDecoder } from '../../src/transport/lz4-frame-decoder';
import { LZ4_FRAME_BLOCK_BYTES, LZ4_MIN_SAVING_PACED, LZ4_MIN_SAVING_UNPACED, Lz4FrameEncoder } from '../../src/transport/lz4-frame-encoder';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { prng } from './transport-fixture';

/** Encodes `data` fed to encodeChunk in chunks of the given sizes (cycled); returns the frame and the encoder. */
async function encode(data: Buffer, chunkSizes: number[], options: { minSaving?: number } = {}): Promise<{ frame: Buffer; encoder: Lz4FrameEncoder }> {
  const encoder = new Lz4FrameEncoder(options);
  const pieces: Buffer[] = [await Lz4FrameEncoder.header()];
  for (let at = 0, i = 0; at < data.length; i++) {
    const n = Math.min(chunkSizes[i % chunkSizes.length]!, data.length - at);
    pieces.push(...encoder.encodeChunk(data.subarray(at, at + n)));
    at += n;
  }
  pieces.push(...encoder.finish());
  return { frame: Buffer.concat(pieces), encoder };
}

/** Encodes `data` as a sender does (log-client.ts): read by `readBytes` into a fresh frame layout each time, then encodeLaidOut. */
async function encodeLaidOut(data: Buffer, readBytes: number, options: { minSaving?: number } = {}): Promise<{ frame: Buffer; encoder: Lz4FrameEncoder; piecesPerRead: number[] }> {
  const encoder = new Lz4FrameEncoder(options);
  const pieces: Buffer[] = [await Lz4FrameEncoder.header()];
  const piecesPerRead: number[] = [];
  for (let at = 0; at < data.length; at += readBytes) {
    const part = data.subarray(at, Math.min(data.length, at + readBytes));
    // A fresh buffer per read, as the frame's pieces view it.
    const frame = Buffer.alloc(Lz4FrameEncoder.laidOutBytes(readBytes), 0xee);
    for (let b = 0; b * LZ4_FRAME_BLOCK_BYTES < part.length; b++) part.copy(frame, Lz4FrameEncoder.laidOutDataOffset(b), b * LZ4_FRAME_BLOCK_BYTES, Math.min(part.length, (b + 1) * LZ4_FRAME_BLOCK_BYTES));
    const out = encoder.encodeLaidOut(frame, part.length);
    piecesPerRead.push(out.length);
    pieces.push(...out);
  }
  pieces.push(...encoder.finish());
  return { frame: Buffer.concat(pieces), encoder, piecesPerRead };
}

/** Decodes with the receiving hop's decoder, and with the lz4 package's (another implementation). */
async function decode(frame: Buffer): Promise<Buffer> {
  const theirs: Buffer[] = [];
  const other = lz4.createDecoderStream();
  other.on('data', (c: Buffer) => theirs.push(c));
  await pipeline(Readable.from([frame]), other);
  const out: Buffer[] = [];
  const decoder = new Lz4FrameDecoder();
  decoder.on('data', (c: Buffer) => out.push(c));
  await pipeline(Readable.from([frame.subarray(0, 1000), frame.subarray(1000)].filter((b) => b.length > 0)), decoder);
  const decoded = Buffer.concat(out);
  expect(Buffer.concat(theirs).equals(decoded)).toBe(true);
  return decoded;
}

function random(bytes: number, seed: number): Buffer {
  const rand = prng(seed);
  const b = Buffer.alloc(bytes);
  for (let i = 0; i + 4 <= bytes; i += 4) b.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
  return b;
}

describe('LZ4 frame encoder', () => {
  const tmp = useTempDirs();

  it('round-trips through the receiver\'s decoder at any chunking and read size, including empty input and short blocks', async () => {
    const cases: Array<[string, Buffer]> = [
      ['empty', Buffer.alloc(0)],
      ['one byte', Buffer.from([7])],
      ['zeros, 1 MiB + 3', Buffer.alloc((1 << 20) + 3)],
      ['random, 3 blocks - 1', random(3 * LZ4_FRAME_BLOCK_BYTES - 1, 1)],
      ['random then zeros then random', Buffer.concat([random(700_000, 2), Buffer.alloc(900_000), random(300_001, 3)])],
    ];
    for (const [name, data] of cases) {
      for (const chunking of [[1 << 20], [4096, 65_537, 13], [LZ4_FRAME_BLOCK_BYTES]]) {
        const { frame } = await encode(data, chunking);
        expect((await decode(frame)).equals(data), `${name} chunked ${chunking.join('/')}`).toBe(true);
      }
      for (const readBytes of [LZ4_FRAME_BLOCK_BYTES, 16 * LZ4_FRAME_BLOCK_BYTES]) {
        const { frame } = await encodeLaidOut(data, readBytes);
        expect((await decode(frame)).equals(data), `${name} read by ${readBytes}`).toBe(true);
      }
    }
  });

  it('compresses what compresses and stops trying on incompressible data, retrying now and then', async () => {
    const zeros = await encode(Buffer.alloc(4 << 20), [1 << 20]);
    expect(zeros.encoder.storedBlocks).toBe(0);
    expect(zeros.frame.length).toBeLessThan(64 * 1024);

    const noise = random(16 << 20, 4);
    const r = await encode(noise, [1 << 20]);
    const blocks = (16 << 20) / LZ4_FRAME_BLOCK_BYTES;
    expect(r.encoder.compressedBlocks).toBe(0);
    expect(r.encoder.storedBlocks).toBe(blocks);
    // Stored blocks cost 4 bytes each; the frame is 7 bytes of header and a 4-byte end mark.
    expect(r.frame.length).toBe(noise.length + 4 * blocks + 11);

    // Compressible data after noise is compressed again once the back-off ends (within 64 blocks).
    const mixed = await encode(Buffer.concat([random(8 << 20, 5), Buffer.alloc(16 << 20)]), [1 << 20]);
    expect(mixed.encoder.compressedBlocks).toBeGreaterThan((16 << 20) / LZ4_FRAME_BLOCK_BYTES - 64);
  });

  it('stores blocks that shrink by less than its minimum saving, and compresses them under a lower one', async () => {
    // Like fio's blocks: random bytes that shrink by about 6% (a 4 KiB run of zeros per 64 KiB block).
    const block = Buffer.concat([random(LZ4_FRAME_BLOCK_BYTES - 4096, 21), Buffer.alloc(4096)]);
    const data = Buffer.concat(Array.from({ length: 64 }, () => block));
    const encodeWith = (minSaving: number | undefined): Promise<{ frame: Buffer; encoder: Lz4FrameEncoder }> => encodeLaidOut(data, 1 << 20, minSaving === undefined ? {} : { minSaving });
    const paced = await encodeWith(LZ4_MIN_SAVING_PACED);
    expect(paced.encoder.compressedBlocks).toBe(64);
    expect(paced.frame.length).toBeLessThan(data.length * 0.97);
    expect((await encodeWith(undefined)).encoder.compressedBlocks).toBe(64);
    const unpaced = await encodeWith(LZ4_MIN_SAVING_UNPACED);
    // Tried on 1 block in 2, 3, 5, 9, ... (the back-off), stored every time.
    expect(unpaced.encoder.compressedBlocks).toBe(0);
    expect(unpaced.encoder.storedBlocks).toBe(64);
    for (const { frame } of [paced, unpaced]) expect((await decode(frame)).equals(data)).toBe(true);
  });

  it('encodes each chunk as blocks of its own, passing stored blocks on as views of the chunk', async () => {
    const data = Buffer.concat([random(300_001, 8), Buffer.alloc(200_000), random(65_536, 9)]);
    const encoder = new Lz4FrameEncoder({ minSaving: LZ4_MIN_SAVING_UNPACED });
    const pieces: Buffer[] = [await Lz4FrameEncoder.header()];
    let viewed = 0;
    for (let at = 0, i = 0; at < data.length; i++) {
      const chunk = Buffer.from(data.subarray(at, Math.min(data.length, at + [65_536, 1, 100_000, 12_345][i % 4]!)));
      at += chunk.length;
      for (const piece of encoder.encodeChunk(chunk)) {
        // A view of the chunk's own memory: nothing was copied.
        if (piece.buffer === chunk.buffer && piece.length > 4) viewed += piece.length;
        pieces.push(piece);
      }
    }
    pieces.push(...encoder.finish());
    expect((await decode(Buffer.concat(pieces))).equals(data)).toBe(true);
    expect(encoder.compressedBlocks).toBeGreaterThan(0);
    expect(viewed).toBeGreaterThan(300_000);
  });

  it('encodes data laid out as a frame\'s blocks in place: one piece per run of stored blocks', async () => {
    const data = Buffer.concat([random(5 * LZ4_FRAME_BLOCK_BYTES, 10), Buffer.alloc(3 * LZ4_FRAME_BLOCK_BYTES), random(LZ4_FRAME_BLOCK_BYTES + 777, 11)]);
    const { frame, encoder, piecesPerRead } = await encodeLaidOut(data, 4 * LZ4_FRAME_BLOCK_BYTES, { minSaving: LZ4_MIN_SAVING_UNPACED });
    expect((await decode(frame)).equals(data)).toBe(true);
    // Random data only: the first read tries the first block, then backs off, and goes out as one piece.
    expect(piecesPerRead[0]).toBe(1);
    expect(encoder.compressedBlocks).toBeGreaterThan(0);
    // Every byte of data is framed once: the stored blocks cost 4 bytes each.
    expect(frame.length).toBeLessThan(data.length);
  });

  it('writes frames the lz4 command-line tool decodes, from chunks and from laid-out reads', async () => {
    if (!requireTool('lz4')) return;
    const dir = tmp();
    const data = Buffer.concat([random(500_000, 6), Buffer.alloc(300_000, 0x5a), random(77, 7)]);
    const frames = [(await encode(data, [100_000])).frame, (await encodeLaidOut(data, 4 * LZ4_FRAME_BLOCK_BYTES)).frame];
    for (const [i, frame] of frames.entries()) {
      fs.writeFileSync(path.join(dir, `f${i}.lz4`), frame);
      execFileSync('lz4', ['-d', '-f', '-q', path.join(dir, `f${i}.lz4`), path.join(dir, `f${i}.out`)]);
      expect(fs.readFileSync(path.join(dir, `f${i}.out`)).equals(data), `frame ${i}`).toBe(true);
    }
  });

});
