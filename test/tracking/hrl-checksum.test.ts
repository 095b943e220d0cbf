import { describe, expect, it } from 'vitest';
import {
  HRL_CHECKSUM_NATIVE_MIN_BYTES,
  hrlChecksum,
  hrlChecksumBestKernel,
  hrlChecksumKernels,
  hrlChecksumReference,
  hrlChecksumWithKernel,
} from '../../src/tracking/hrl-checksum';
import { prng } from '../helpers/prng';

/** Parses the spaced hex dumps of ms-hrl-notes.md §4.5. */
function hex(text: string): Buffer {
  return Buffer.from(text.replace(/\s+/g, ''), 'hex');
}

// The derived vectors of ms-hrl-notes.md §4.5. The file header vector is left
// out on purpose: the notes show the spec's printed header checksum cannot be
// reproduced from its own field values.
const METADATA_HEADERS = [
  {
    name: 'metadata header #1 (empty block)',
    bytes: '00 00 00 00 00 00 00 00  00 00 00 00 FF FF FF FF  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00',
    checksum: 0xffffffff,
  },
  {
    name: 'metadata header #2 (58 entries)',
    bytes: '00 F2 04 00 00 00 00 00  3A 00 00 00 CF FE FF FF  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00',
    checksum: 0xfffffecf,
  },
];
const ENTRIES = [
  { name: 'entry 58', bytes: '00 90 25 D8 00 00 00 00  6F FD FF FF  00 10 00 00  4E 57 2D 20  01  00 00 00 00  00  00 00 00 00 00 00', checksum: 0xfffffd6f },
  { name: 'entry 1', bytes: '00 B0 25 D8 00 00 00 00  50 FD FF FF  00 10 00 00  4D 57 2D 20  01  00 00 00 00  00  00 00 00 00 00 00', checksum: 0xfffffd50 },
  { name: 'entry 23', bytes: '00 00 10 08 00 00 00 00  F0 FE FF FF  00 04 00 00  4E 57 2D 20  01  00 00 00 00  00  00 00 00 00 00 00', checksum: 0xfffffef0 },
  { name: 'entry 51 (64-bit offset)', bytes: '00 60 43 5F 02 00 00 00  F8 FD FF FF  00 10 00 00  4E 57 2D 20  01  00 00 00 00  00  00 00 00 00 00 00', checksum: 0xfffffdf8 },
];
const METADATA_HEADER_CHECKSUM_OFFSET = 12;
const METADATA_ENTRY_CHECKSUM_OFFSET = 8;

describe('hrlChecksum', () => {
  const kernels = hrlChecksumKernels();

  for (const vector of METADATA_HEADERS) {
    it(`reproduces the spec checksum of ${vector.name}`, () => {
      const bytes = hex(vector.bytes);
      expect(bytes.length).toBe(32);
      expect(bytes.readUInt32LE(METADATA_HEADER_CHECKSUM_OFFSET)).toBe(vector.checksum);
      expect(hrlChecksum(bytes, METADATA_HEADER_CHECKSUM_OFFSET)).toBe(vector.checksum);
      expect(hrlChecksumReference(bytes, METADATA_HEADER_CHECKSUM_OFFSET)).toBe(vector.checksum);
      for (const kernel of kernels) {
        expect(hrlChecksumWithKernel(kernel, bytes, METADATA_HEADER_CHECKSUM_OFFSET), kernel.name).toBe(vector.checksum);
      }
      // Taking the field as zero gives the same result as skipping it.
      const zeroed = Buffer.from(bytes);
      zeroed.writeUInt32LE(0, METADATA_HEADER_CHECKSUM_OFFSET);
      expect(hrlChecksum(zeroed)).toBe(vector.checksum);
    });
  }

  for (const vector of ENTRIES) {
    it(`reproduces the spec checksum of metadata ${vector.name}`, () => {
      const bytes = hex(vector.bytes);
      expect(bytes.length).toBe(32);
      expect(bytes.readUInt32LE(METADATA_ENTRY_CHECKSUM_OFFSET)).toBe(vector.checksum);
      expect(hrlChecksum(bytes, METADATA_ENTRY_CHECKSUM_OFFSET)).toBe(vector.checksum);
      for (const kernel of kernels) {
        expect(hrlChecksumWithKernel(kernel, bytes, METADATA_ENTRY_CHECKSUM_OFFSET), kernel.name).toBe(vector.checksum);
      }
    });
  }

  it('returns 0xFFFFFFFF for zero-filled buffers of any length, on every kernel', () => {
    for (const length of [0, 1, 31, 32, 4096, 1 << 20]) {
      const zeros = new Uint8Array(length);
      expect(hrlChecksum(zeros)).toBe(0xffffffff);
      for (const kernel of kernels) expect(hrlChecksumWithKernel(kernel, zeros), `${kernel.name} ${length}`).toBe(0xffffffff);
    }
  });

  it('offers the portable kernel everywhere and names a listed kernel as best', () => {
    expect(kernels.map((k) => k.name)).toContain('portable');
    expect(kernels).toContainEqual(hrlChecksumBestKernel());
  });

  it('agrees with the reference on random buffers, lengths and ignore offsets on every kernel', () => {
    const random = prng(0x5eed);
    const backing = new Uint8Array(70_000 + 64);
    for (let i = 0; i < backing.length; i++) backing[i] = Math.floor(random() * 256);
    for (let iteration = 0; iteration < 600; iteration++) {
      // Lengths cluster around the vector widths and the addon threshold, with
      // some long ones; views start at unaligned offsets of a shared buffer.
      const pick = random();
      const length =
        pick < 0.5 ? Math.floor(random() * 300) : pick < 0.9 ? Math.floor(random() * 5000) : Math.floor(random() * 70_000);
      const start = Math.floor(random() * 64);
      const data = backing.subarray(start, start + length);
      const where = random();
      const ignore =
        where < 0.2 ? -1 : where < 0.4 ? Math.max(0, length - 1 - Math.floor(random() * 4)) : where < 0.5 ? length + Math.floor(random() * 3) : Math.floor(random() * Math.max(1, length));
      const expected = hrlChecksumReference(data, ignore);
      expect(hrlChecksum(data, ignore), `length ${length} ignore ${ignore}`).toBe(expected);
      for (const kernel of kernels) {
        expect(hrlChecksumWithKernel(kernel, data, ignore), `${kernel.name} length ${length} start ${start} ignore ${ignore}`).toBe(expected);
      }
    }
  });

  it('wraps the sum modulo 2^32 on buffers whose byte sum exceeds 32 bits', () => {
    // 17 MiB of 0xFF sums to 0xFF * 17 Mi = 0x10FEF0000 + ..., past 2^32.
    const length = 17 * 1024 * 1024;
    const data = new Uint8Array(length).fill(0xff);
    const expected = ~((0xff * length) % 2 ** 32) >>> 0;
    expect(0xff * length).toBeGreaterThan(2 ** 32);
    for (const kernel of kernels) expect(hrlChecksumWithKernel(kernel, data), kernel.name).toBe(expected);
    expect(hrlChecksum(data, 5)).toBe((~((0xff * (length - 4)) % 2 ** 32)) >>> 0);
  });

  it('uses the same answer on both sides of the native threshold', () => {
    const random = prng(7);
    for (const length of [HRL_CHECKSUM_NATIVE_MIN_BYTES - 1, HRL_CHECKSUM_NATIVE_MIN_BYTES, HRL_CHECKSUM_NATIVE_MIN_BYTES + 1]) {
      const data = Uint8Array.from({ length }, () => Math.floor(random() * 256));
      expect(hrlChecksum(data, length - 4)).toBe(hrlChecksumReference(data, length - 4));
    }
  });

  it('refuses a non-byte array and bad ignore offsets, naming the argument', () => {
    expect(() => hrlChecksum(new Uint16Array(4) as unknown as Uint8Array)).toThrow(/data must be a Uint8Array or Buffer, got Uint16Array/);
    expect(() => hrlChecksum('abc' as unknown as Uint8Array)).toThrow(/data must be a Uint8Array or Buffer, got string/);
    expect(() => hrlChecksum(new Uint8Array(4), -2)).toThrow(/ignoreOffset must be -1 \(none\) or an integer >= 0, got -2/);
    expect(() => hrlChecksum(new Uint8Array(4), 1.5)).toThrow(/ignoreOffset .* got 1.5/);
    expect(() => hrlChecksum(new Uint8Array(4), Number.NaN)).toThrow(/ignoreOffset .* got NaN/);
  });
});

describe('hrlChecksumReference', () => {
  it('sums every byte when no offset is ignored, including the first three', () => {
    const data = Uint8Array.from([1, 2, 3, 4, 5]);
    expect(hrlChecksumReference(data)).toBe(~15 >>> 0);
    expect(hrlChecksumReference(data, -1)).toBe(~15 >>> 0);
    expect(hrlChecksumReference(data, 0)).toBe(~5 >>> 0);
    expect(hrlChecksumReference(data, 3)).toBe(~6 >>> 0);
  });
});
