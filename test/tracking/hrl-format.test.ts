import { describe, expect, it } from 'vitest';
import {
  HRL_DEFAULT_METADATA_SIZE,
  HRL_HEADER_SIZE,
  HRL_METADATA_ENTRY_SIZE,
  HRL_METADATA_HEADER_SIZE,
  computeHrlHeaderChecksum,
  decodeHrlHeader,
  decodeHrlMetadataEntry,
  decodeHrlMetadataHeader,
  encodeHrlHeader,
  encodeHrlMetadataEntry,
  encodeHrlMetadataHeader,
  guidFromBytes,
  guidToBytes,
  hrlByteSum,
  hrlChecksum,
  hrlChecksumFromSum,
  hrlEntriesPerBlock,
  hrlTimestampFromMs,
  hrlTimestampToIso,
} from '../../src/tracking/hrl-format';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

// Derived vectors from ms-hrl-notes.md §4.5 (checked there against the spec's printed checksums).
const METADATA_HEADER_1 = hex('00 00 00 00 00 00 00 00  00 00 00 00 FF FF FF FF  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00');
const METADATA_HEADER_2 = hex('00 F2 04 00 00 00 00 00  3A 00 00 00 CF FE FF FF  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00');
const ENTRY_VECTORS = [
  { id: 58, byteOffset: 0xd8259000, dataLength: 4096, timestamp: 0x202d574e, checksum: 0xfffffd6f, bytes: '00 90 25 D8 00 00 00 00  6F FD FF FF  00 10 00 00  4E 57 2D 20  01  00 00 00 00  00  00 00 00 00 00 00' },
  { id: 1, byteOffset: 0xd825b000, dataLength: 4096, timestamp: 0x202d574d, checksum: 0xfffffd50, bytes: '00 B0 25 D8 00 00 00 00  50 FD FF FF  00 10 00 00  4D 57 2D 20  01  00 00 00 00  00  00 00 00 00 00 00' },
  { id: 23, byteOffset: 0x08100000, dataLength: 1024, timestamp: 0x202d574e, checksum: 0xfffffef0, bytes: '00 00 10 08 00 00 00 00  F0 FE FF FF  00 04 00 00  4E 57 2D 20  01  00 00 00 00  00  00 00 00 00 00 00' },
  { id: 51, byteOffset: 0x25f436000, dataLength: 4096, timestamp: 0x202d574e, checksum: 0xfffffdf8, bytes: '00 60 43 5F 02 00 00 00  F8 FD FF FF  00 10 00 00  4E 57 2D 20  01  00 00 00 00  00  00 00 00 00 00 00' },
];
const HEADER_PREFIX = hex(`
6D 73 63 74 6C 6F 67 00 00 00 02 00 4C 57 2D 20
63 74 00 00 00 00 0A 00 00 00 00 00 00 00 00 00
00 12 05 00 00 00 00 00 7B E2 FF FF 00 12 05 00
00 00 00 00 00 00 00 00 00 10 00 00 FF C7 2F 57
03 1F AB 49 B3 C5 30 A6 65 B8 E2 0C 46 4B AE A8
AD F7 02 44 87 AA 5B 33 E9 F8 9C 77 50 57 2D 20
3A 00 00 00 00 00 00 00 00 00 00 00 00 00 57 5C
BE B9 BE F8 03 55 98 BB 6C 44 FA F9 AC 87`);

describe('hrl-format sizes', () => {
  it('packs 127 entries of 32 bytes after a 32-byte header in a 4096-byte block', () => {
    expect(HRL_HEADER_SIZE).toBe(4096);
    expect(HRL_METADATA_HEADER_SIZE).toBe(32);
    expect(HRL_METADATA_ENTRY_SIZE).toBe(32);
    expect(hrlEntriesPerBlock(HRL_DEFAULT_METADATA_SIZE)).toBe(127);
  });
});

describe('hrl checksum', () => {
  it('is the NOT of the byte sum, 0xFFFFFFFF for zeroes, and counts the first bytes', () => {
    expect(hrlChecksum(Buffer.alloc(64))).toBe(0xffffffff);
    expect(hrlChecksum(Buffer.from([1, 2, 3, 4]))).toBe(~10 >>> 0);
    expect(hrlChecksum(Buffer.from([1, 2, 3, 4, 5, 6]), 1)).toBe(~(1 + 6) >>> 0);
  });

  it('combines piecewise byte sums into the checksum of the whole', () => {
    const a = Buffer.from('hello, ');
    const b = Buffer.from('world');
    expect(hrlChecksumFromSum((hrlByteSum(a) + hrlByteSum(b)) >>> 0)).toBe(hrlChecksum(Buffer.concat([a, b])));
  });
});

describe('hrl metadata header vectors (notes §4.5)', () => {
  it('encodes block #1 (empty first block) exactly', () => {
    expect(encodeHrlMetadataHeader({ previousMetadataLocation: 0, validMetadataEntries: 0 })).toEqual(METADATA_HEADER_1);
  });

  it('encodes block #2 (58 entries, 324096 back) exactly with checksum 0xFFFFFECF', () => {
    const enc = encodeHrlMetadataHeader({ previousMetadataLocation: 324096, validMetadataEntries: 58 });
    expect(enc).toEqual(METADATA_HEADER_2);
    expect(decodeHrlMetadataHeader(METADATA_HEADER_2)).toEqual({ previousMetadataLocation: 324096, validMetadataEntries: 58, checksum: 0xfffffecf });
  });
});

describe('hrl metadata entry vectors (notes §4.5)', () => {
  for (const v of ENTRY_VECTORS) {
    it(`encodes entry ${v.id} exactly, checksum 0x${v.checksum.toString(16)}, 64-bit offset`, () => {
      const enc = encodeHrlMetadataEntry({ byteOffset: v.byteOffset, dataLength: v.dataLength, timestamp: v.timestamp, dataChecksum: 0 });
      expect(enc).toEqual(hex(v.bytes));
      const dec = decodeHrlMetadataEntry(hex(v.bytes));
      expect(dec).toEqual({ byteOffset: v.byteOffset, checksum: v.checksum, dataLength: v.dataLength, timestamp: v.timestamp, metaOperation: 1, dataChecksum: 0, location: 0 });
    });
  }
});

describe('hrl file header', () => {
  const example = {
    timestamp: 539842380,
    creatorApplication: Buffer.from('ct\0\0', 'latin1'),
    creatorVersion: 0xa0000,
    originalSize: 0,
    currentSize: 332288,
    eolLocation: 332288,
    metadataSize: 4096,
    uniqueId: '572fc7ff-1f03-49ab-b3c5-30a665b8e20c',
    previousUniqueId: 'a8ae4b46-f7ad-4402-87aa-5b33e9f89c77',
    lastModifiedTimestamp: 539842384,
    totalMetadataEntries: 58,
    vhd2DataWriteGuid: 'b9be5c57-f8be-5503-98bb-6c44faf9ac87',
  };

  it('encodes the §3 example fields to the derived 126-byte prefix (checksum aside) and zero reserved bytes', () => {
    const enc = encodeHrlHeader(example);
    const expected = Buffer.from(HEADER_PREFIX);
    // The spec's printed header checksum cannot be reproduced (notes §4.5); compare everything else.
    enc.writeUInt32LE(0, 40);
    expected.writeUInt32LE(0, 40);
    expect(enc.subarray(0, 126)).toEqual(expected);
    expect(enc.subarray(126).every((b) => b === 0)).toBe(true);
  });

  it('stores a checksum computed over all bytes but the checksum field (byte sum 8152 for the example)', () => {
    const enc = encodeHrlHeader(example);
    expect(enc.readUInt32LE(40)).toBe(0xffffe027);
    expect(computeHrlHeaderChecksum(enc)).toBe(enc.readUInt32LE(40));
  });

  it('decodes what it encodes', () => {
    const dec = decodeHrlHeader(encodeHrlHeader(example));
    expect(dec).toMatchObject({ ...example, logFormatVersion: 0x20000, fileType: 0, flags: 0, errorCode: 0, checksum: 0xffffe027 });
    expect(dec.cookie.toString('latin1')).toBe('msctlog\0');
  });
});

describe('hrl GUIDs and time', () => {
  it('stores GUIDs in the Windows mixed-endian layout and reads them back', () => {
    const b = guidToBytes('{572fc7ff-1f03-49ab-b3c5-30a665b8e20c}');
    expect(b.toString('hex')).toBe('ffc72f57031fab49b3c530a665b8e20c');
    expect(guidFromBytes(b)).toBe('572fc7ff-1f03-49ab-b3c5-30a665b8e20c');
  });

  it('counts seconds from 2000-01-01 UTC (the example is 2017-02-08 04:13:00)', () => {
    expect(hrlTimestampToIso(539842380)).toBe('2017-02-08T04:13:00.000Z');
    expect(hrlTimestampFromMs(Date.UTC(2017, 1, 8, 4, 13, 0))).toBe(539842380);
  });
});
