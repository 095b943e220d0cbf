import { describe, expect, it } from 'vitest';
import { isBlockrelayError } from '../../src/retry/blockrelay-error';
import { BlockHasher } from '../../src/resync/block-hasher';
import {
  decodeState,
  encodeState,
  NOTED_EXTENT_BYTES,
  OFF_CURSOR,
  OFF_NOTED_COUNT,
  STATE_CHECKSUM_BYTES,
  STATE_HEADER_BYTES,
  type ResyncState,
} from '../../src/resync/resync-state-format';
import { seededRandom } from './seeded-random';

const STATE: ResyncState = {
  guided: true,
  blockSizeBytes: 4096,
  sizeBytes: 1 << 30,
  pairFingerprint: 0x1122334455667788n,
  workFingerprint: 0x99aabbccddeeff00n,
  cursorBytes: 64 << 20,
  startedAtMs: Date.UTC(2026, 0, 5, 18),
  updatedAtMs: Date.UTC(2026, 0, 5, 18, 5),
  totals: { blocksCompared: 16384, blocksSent: 12, bytesSent: 50_000, bytesReceived: 3_000, hashBytes: 2_800 },
  notedWrites: [{ offset: 4096, length: 8192 }],
};

describe('resync state file format', () => {
  it('has the documented size and layout and round-trips', async () => {
    const hasher = await BlockHasher.create();
    const bytes = encodeState(STATE, hasher);
    expect(STATE_HEADER_BYTES).toBe(112);
    expect(bytes.length).toBe(STATE_HEADER_BYTES + NOTED_EXTENT_BYTES + STATE_CHECKSUM_BYTES);
    expect(bytes.subarray(0, 16).toString('hex')).toBe('4252524553594e43' + '0100' + '0100' + '01000000');
    expect(bytes.readBigUInt64LE(OFF_CURSOR)).toBe(64n << 20n);
    // The checksum is xxh64 of everything before it.
    expect(bytes.readBigUInt64LE(bytes.length - 8)).toBe(hasher.hash(bytes.subarray(0, bytes.length - 8)));
    expect(decodeState(bytes, 'state', hasher)).toEqual(STATE);
  });

  it('refuses damage with BR_RESYNC_STATE_CORRUPT naming the byte offset', async () => {
    const hasher = await BlockHasher.create();
    const bytes = encodeState(STATE, hasher);
    const flipped = Buffer.from(bytes);
    flipped[OFF_CURSOR] ^= 1;
    expect(() => decodeState(flipped, 'state', hasher)).toThrow(new RegExp(`byte ${bytes.length - 8}: checksum`));
    const counted = Buffer.from(bytes);
    counted.writeUInt32LE(2, OFF_NOTED_COUNT);
    expect(() => decodeState(counted, 'state', hasher)).toThrow(/byte 12/);
    expect(() => decodeState(bytes.subarray(0, 50), 'state', hasher)).toThrow(/byte 50/);
    const magic = Buffer.from(bytes);
    magic[0] = 0x58;
    expect(() => decodeState(magic, 'state', hasher)).toThrow(/byte 0: magic/);
  });

  it('never yields a state from a randomly damaged file', async () => {
    const hasher = await BlockHasher.create();
    const bytes = encodeState(STATE, hasher);
    const random = seededRandom(7);
    for (let i = 0; i < 3000; i++) {
      const damaged = Buffer.from(bytes);
      const at = Math.floor(random() * damaged.length);
      damaged[at] ^= 1 + Math.floor(random() * 255);
      const input = random() < 0.2 ? damaged.subarray(0, Math.floor(random() * damaged.length)) : damaged;
      try {
        decodeState(input, 'state', hasher);
        expect.unreachable(`damage at byte ${at} went unnoticed`);
      } catch (err) {
        expect(isBlockrelayError(err) && err.code === 'BR_RESYNC_STATE_CORRUPT', String(err)).toBe(true);
      }
    }
  });
});
