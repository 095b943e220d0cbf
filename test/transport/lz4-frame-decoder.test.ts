import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { describe, expect, it } from 'vitest';
import { isBlockrelayError } from '../../src/retry/blockrelay-error';
import { Lz4FrameDecoder } from '../../src/transport/lz4-frame-decoder';
import { Lz4FrameEncoder } from '../../src/transport/lz4-frame-encoder';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { prng } from './transport-fixture';

/** Feeds `stream` in pieces of the given sizes (cycled) and returns what the decoder produced. */
async function decode(stream: Buffer, pieceSizes: number[] = [65_536]): Promise<Buffer> {
  const pieces: Buffer[] = [];
  for (let at = 0, i = 0; at < stream.length; i++) {
    const n = Math.min(pieceSizes[i % pieceSizes.length]!, stream.length - at);
    pieces.push(stream.subarray(at, at + n));
    at += n;
  }
  const out: Buffer[] = [];
  const decoder = new Lz4FrameDecoder();
  decoder.on('data', (c: Buffer) => out.push(Buffer.from(c)));
  await pipeline(Readable.from(pieces), decoder);
  return Buffer.concat(out);
}

async function encodeOurs(data: Buffer): Promise<Buffer> {
  const encoder = new Lz4FrameEncoder();
  return Buffer.concat([await Lz4FrameEncoder.header(), ...encoder.encodeChunk(data), ...encoder.finish()]);
}

function sample(seed: number, bytes: number): Buffer {
  const rand = prng(seed);
  const b = Buffer.alloc(bytes);
  // Random stretches and compressible runs, so frames hold both kinds of block.
  for (let at = 0; at < bytes; ) {
    const n = Math.min(bytes - at, 1 + Math.floor(rand() * 200_000));
    if (rand() < 0.5) for (let i = 0; i < n; i++) b[at + i] = Math.floor(rand() * 256);
    else b.fill(Math.floor(rand() * 4), at, at + n);
    at += n;
  }
  return b;
}

describe('LZ4 frame decoder', () => {
  const tmp = useTempDirs();

  it('decodes frames the lz4 tool writes with every block size, block and content checksums, content size, several frames and skippable frames', async () => {
    if (!requireTool('lz4')) return;
    const dir = tmp();
    const data = sample(1, 3_000_000);
    const input = path.join(dir, 'in.bin');
    fs.writeFileSync(input, data);
    const frameOf = (args: string[]): Buffer => {
      const out = path.join(dir, `${args.join('')}.lz4`);
      execFileSync('lz4', ['-q', '-f', ...args, input, out]);
      return fs.readFileSync(out);
    };
    for (const args of [['-B4'], ['-B5', '-BX'], ['-B6', '--content-size'], ['-B7', '--no-frame-crc'], ['-9', '-B4', '-BX', '--content-size'], ['--no-frame-crc', '-B4', '-BX']]) {
      const frame = frameOf(['-BI', ...args]);
      for (const pieces of [[65_536], [1, 7, 4093], [1 << 20]]) {
        expect((await decode(frame, pieces)).equals(data), `lz4 ${args.join(' ')} in pieces of ${pieces.join('/')}`).toBe(true);
      }
    }
    // Two frames back to back with a skippable frame between them.
    const first = frameOf(['-BI', '-B4']);
    const skippable = Buffer.alloc(8 + 5);
    skippable.writeUInt32LE(0x184d2a5b, 0);
    skippable.writeUInt32LE(5, 4);
    const two = Buffer.concat([first, skippable, await encodeOurs(data)]);
    expect((await decode(two, [3, 100_003])).equals(Buffer.concat([data, data]))).toBe(true);
  });

  it('refuses damage with a coded error naming the offset, and a stream cut inside a frame as incomplete', async () => {
    const data = sample(2, 400_000);
    const frame = await encodeOurs(data);
    const fails = async (stream: Buffer, code: string, message: RegExp): Promise<void> => {
      await expect(decode(stream)).rejects.toMatchObject({ code, message: expect.stringMatching(message) });
    };
    const flip = (at: number): Buffer => {
      const b = Buffer.from(frame);
      b[at]! ^= 0x40;
      return b;
    };
    await fails(flip(0), 'BR_PROTOCOL', /at byte 0: magic number/);
    await fails(flip(6), 'BR_PROTOCOL', /at byte 6: header checksum/);
    await fails(frame.subarray(0, frame.length - 2), 'BR_UPLOAD_INCOMPLETE', /ends inside a frame/);
    await fails(frame.subarray(0, 5), 'BR_UPLOAD_INCOMPLETE', /ends inside a frame/);
    // A block size beyond the frame's 64 KiB blocks.
    const big = Buffer.from(frame);
    big.writeUInt32LE((0x8000_0000 | (70 * 1024)) >>> 0, 7);
    await fails(big, 'BR_PROTOCOL', /at byte 7: block of 71680 bytes exceeds/);
  });

  it('refuses linked blocks and checks block and content checksums of the lz4 tool\'s frames', async () => {
    if (!requireTool('lz4')) return;
    const dir = tmp();
    const data = sample(3, 300_000);
    const input = path.join(dir, 'in.bin');
    fs.writeFileSync(input, data);
    execFileSync('lz4', ['-q', '-f', '-B4', '-BD', input, path.join(dir, 'linked.lz4')]);
    await expect(decode(fs.readFileSync(path.join(dir, 'linked.lz4')))).rejects.toMatchObject({ code: 'BR_PROTOCOL', message: expect.stringMatching(/linked blocks/) });
    execFileSync('lz4', ['-q', '-f', '-BI', '-BX', input, path.join(dir, 'checked.lz4')]);
    const checked = fs.readFileSync(path.join(dir, 'checked.lz4'));
    const inBlock = Buffer.from(checked);
    inBlock[7 + 4 + 10]! ^= 1;
    await expect(decode(inBlock)).rejects.toMatchObject({ code: 'BR_PROTOCOL', message: expect.stringMatching(/block checksum|does not decode/) });
    const inContent = Buffer.from(checked);
    inContent[inContent.length - 1]! ^= 1;
    await expect(decode(inContent)).rejects.toMatchObject({ code: 'BR_PROTOCOL', message: expect.stringMatching(/content checksum/) });
  });

  it('survives a seeded fuzz of damaged frames: output or a coded error, never anything else', async () => {
    const rand = prng(99);
    const data = sample(4, 200_000);
    const frame = await encodeOurs(data);
    const started = Date.now();
    let iterations = 0;
    for (; iterations < 3000 && Date.now() - started < 15_000; iterations++) {
      const b = Buffer.from(frame.subarray(0, rand() < 0.2 ? Math.floor(rand() * frame.length) : frame.length));
      const flips = 1 + Math.floor(rand() * 4);
      for (let i = 0; i < flips && b.length > 0; i++) {
        // Mostly the header and block-size words, where structure lives.
        const at = rand() < 0.5 ? Math.floor(rand() * Math.min(b.length, 16)) : Math.floor(rand() * b.length);
        b[at] = Math.floor(rand() * 256);
      }
      try {
        await decode(b, [1 + Math.floor(rand() * 70_000)]);
      } catch (err) {
        expect(isBlockrelayError(err), String(err)).toBe(true);
      }
    }
    expect(iterations).toBeGreaterThan(200);
  }, 30_000);
});
