import { describe, expect, it } from 'vitest';
import { isBlockrelayError } from '../../src/retry/blockrelay-error';
import { BlockHasher } from '../../src/resync/block-hasher';
import { inProcessChannel, ResyncPeer, ResyncTargetService } from '../../src/resync/resync-peer';
import {
  decodeRequest,
  encodeHashRequest,
  encodeWriteRequest,
  MSG_HASH,
  MSG_WRITE,
  RANGE_BYTES,
  WIRE_HEADER_BYTES,
} from '../../src/resync/resync-wire';
import { MemoryDisk } from './memory-disk';
import { seededRandom } from './seeded-random';

describe('resync wire messages', () => {
  it('encodes a hash request in the documented layout', () => {
    const buf = encodeHashRequest({ fineBlockBytes: 4096, groupBlocks: 16, ranges: [{ offset: 65536, length: 131072 }] });
    expect(buf.toString('hex')).toBe(
      '02010000' + '01000000' + // type, version, reserved, count
      '00100000' + '10000000' + // fine block bytes, group blocks
      '0000010000000000' + '0000020000000000', // offset, length
    );
    expect(buf.length).toBe(WIRE_HEADER_BYTES + 8 + RANGE_BYTES);
  });

  it('round-trips hash and write requests', () => {
    const hash = decodeRequest(encodeHashRequest({ fineBlockBytes: 4096, groupBlocks: 1, ranges: [{ offset: 0, length: 100 }, { offset: 8192, length: 4096 }] }));
    expect(hash).toEqual({ type: MSG_HASH, request: { fineBlockBytes: 4096, groupBlocks: 1, ranges: [{ offset: 0, length: 100 }, { offset: 8192, length: 4096 }] } });
    const write = decodeRequest(encodeWriteRequest([{ offset: 512, data: Buffer.from('abc') }]));
    expect(write.type).toBe(MSG_WRITE);
    expect(write.type === MSG_WRITE && write.runs[0].data.toString()).toBe('abc');
  });

  it('refuses damaged requests with BR_RESYNC_PROTOCOL naming the byte offset', () => {
    const good = encodeHashRequest({ fineBlockBytes: 4096, groupBlocks: 1, ranges: [{ offset: 0, length: 4096 }] });
    const badVersion = Buffer.from(good);
    badVersion[1] = 9;
    expect(() => decodeRequest(badVersion)).toThrow(/byte 1/);
    const badBlock = Buffer.from(good);
    badBlock.writeUInt32LE(3000, WIRE_HEADER_BYTES);
    expect(() => decodeRequest(badBlock)).toThrow(/byte 8: block size 3000/);
    const unaligned = Buffer.from(good);
    unaligned.writeUInt32LE(100, WIRE_HEADER_BYTES + 8);
    expect(() => decodeRequest(unaligned)).toThrow(/byte 16: range offset 100/);
    try {
      decodeRequest(good.subarray(0, good.length - 1));
      expect.unreachable();
    } catch (err) {
      expect(err).toMatchObject({ code: 'BR_RESYNC_PROTOCOL' });
    }
  });

  it('survives thousands of random mutations with nothing but coded errors', () => {
    const random = seededRandom(99);
    const seeds = [
      encodeHashRequest({ fineBlockBytes: 4096, groupBlocks: 16, ranges: [{ offset: 0, length: 65536 }, { offset: 1 << 20, length: 4096 }] }),
      encodeWriteRequest([{ offset: 0, data: Buffer.alloc(64, 1) }, { offset: 4096, data: Buffer.alloc(10, 2) }]),
    ];
    const started = Date.now();
    for (let i = 0; i < 5000 && Date.now() - started < 5000; i++) {
      const buf = Buffer.from(seeds[i % seeds.length]);
      const flips = 1 + Math.floor(random() * 4);
      for (let f = 0; f < flips; f++) buf[Math.floor(random() * buf.length)] = Math.floor(random() * 256);
      const cut = random() < 0.2 ? buf.subarray(0, Math.floor(random() * buf.length)) : buf;
      try {
        decodeRequest(cut);
      } catch (err) {
        expect(isBlockrelayError(err) && err.code === 'BR_RESYNC_PROTOCOL', String(err)).toBe(true);
      }
    }
  });

  it('carries target-side failures back as coded errors', async () => {
    const hasher = await BlockHasher.create();
    const peer = new ResyncPeer(inProcessChannel(new ResyncTargetService(new MemoryDisk('mem:t', 8192), hasher)));
    await expect(peer.hashRanges({ fineBlockBytes: 4096, groupBlocks: 1, ranges: [{ offset: 0, length: 3 * 4096 }] })).rejects.toThrow(/target side/);
    const service = new ResyncTargetService(new MemoryDisk('mem:t', 8192), hasher);
    const reply = await service.handle(Buffer.from([0x02, 0x07, 0, 0, 0, 0, 0, 0]));
    const viaPeer = new ResyncPeer({ exchange: async () => reply });
    await expect(viaPeer.flush()).rejects.toMatchObject({ code: 'BR_RESYNC_PROTOCOL' });
  });

  it('counts every byte that crosses the seam', async () => {
    const hasher = await BlockHasher.create();
    const peer = new ResyncPeer(inProcessChannel(new ResyncTargetService(new MemoryDisk('mem:t', 1 << 20), hasher)));
    await peer.hashRanges({ fineBlockBytes: 4096, groupBlocks: 1, ranges: [{ offset: 0, length: 65536 }] });
    await peer.writeRuns([{ offset: 4096, data: Buffer.alloc(4096, 7) }]);
    expect(peer.counters).toEqual({
      bytesSent: (WIRE_HEADER_BYTES + 8 + RANGE_BYTES) + (WIRE_HEADER_BYTES + 12 + 4096),
      bytesReceived: (WIRE_HEADER_BYTES + 16 * 8) + WIRE_HEADER_BYTES,
      hashBytes: 16 * 8,
      dataBytes: 4096,
      exchanges: 2,
    });
  });
});

describe('BlockHasher', () => {
  it('gives the same hashes from the addon and from xxhash-wasm, so either side may use either', async () => {
    const best = await BlockHasher.create();
    const wasm = await BlockHasher.create('wasm');
    expect(wasm.implementation).toBe('wasm');
    const data = Buffer.alloc(3 * 4096 + 512);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7919) & 0xff;
    expect(best.hashBlocks(data, 4096).equals(wasm.hashBlocks(data, 4096))).toBe(true);
    expect(best.groupHashes(best.hashBlocks(data, 512), 8).equals(wasm.groupHashes(wasm.hashBlocks(data, 512), 8))).toBe(true);
    // xxh64 of the empty input, seed 0: the published reference value.
    expect(best.hash(Buffer.alloc(0))).toBe(0xef46db3751d8e999n);
  });
});
