import { describe, expect, it } from 'vitest';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import {
  VHD_FOOTER_OFFSETS,
  VHD_FOOTER_SIZE_BYTES,
  VHD_FIXED_DATA_OFFSET,
  VhdDiskType,
  checkFixedVhdFooter,
  decodeVhdFooter,
  encodeVhdFooter,
  newFixedVhdFooter,
  vhdChecksum,
  vhdGeometry,
} from '../../src/targets/vhd/vhd-footer';
import { prng } from '../helpers/prng';

/**
 * The footer `qemu-img convert -O vpc -o subformat=fixed,force_size=on` (qemu
 * 7.2) wrote for a 10 MiB disk: its non-zero prefix; the rest is zeroes.
 */
const QEMU_FOOTER_PREFIX_HEX =
  '636f6e6563746978000000020001000' +
  '0ffffffffffffffff3293ffd871656d32' +
  '000500035769326b0000000000a00000' +
  '0000000000a00000ffff10ff00000002' +
  'ffffe24a15b1dc3044b74338b9cbfcb1' +
  '801499f2';

function qemuFooter(): Buffer {
  const buf = Buffer.alloc(VHD_FOOTER_SIZE_BYTES);
  Buffer.from(QEMU_FOOTER_PREFIX_HEX, 'hex').copy(buf);
  return buf;
}

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
    return undefined;
  } catch (err) {
    if (err instanceof BlockrelayError) return err.code;
    throw err;
  }
}

describe('VHD footer layout', () => {
  it('places every field at the offset the VHD specification gives', () => {
    expect(VHD_FOOTER_OFFSETS).toEqual({
      cookie: 0, features: 8, fileFormatVersion: 12, dataOffset: 16, timestamp: 24, creatorApplication: 28,
      creatorVersion: 32, creatorHostOs: 36, originalSize: 40, currentSize: 48, diskGeometry: 56, diskType: 60,
      checksum: 64, uniqueId: 68, savedState: 84, reserved: 85,
    });
    expect(VHD_FOOTER_OFFSETS.reserved + 427).toBe(VHD_FOOTER_SIZE_BYTES);
  });

  it('decodes a footer written by qemu-img', () => {
    const footer = decodeVhdFooter(qemuFooter(), 10 * 1024 * 1024, 'qemu.vhd');
    expect(footer).toEqual({
      features: 2,
      fileFormatVersion: 0x00010000,
      dataOffset: VHD_FIXED_DATA_OFFSET,
      timestampSeconds: 0x3293ffd8,
      creatorApplication: 'qem2',
      creatorVersion: 0x00050003,
      creatorHostOs: 'Wi2k',
      originalSizeBytes: 10 * 1024 * 1024,
      currentSizeBytes: 10 * 1024 * 1024,
      geometry: { cylinders: 65535, heads: 16, sectorsPerTrack: 255 },
      diskType: VhdDiskType.fixed,
      checksum: 0xffffe24a,
      uniqueId: '15b1dc30-44b7-4338-b9cb-fcb1801499f2',
      savedState: false,
    });
    expect(() => checkFixedVhdFooter(footer, 10 * 1024 * 1024 + 512, 'qemu.vhd')).not.toThrow();
  });

  it('computes the checksum as the one\'s complement of the byte sum without the checksum field', () => {
    expect(vhdChecksum(qemuFooter())).toBe(0xffffe24a);
    const zeros = Buffer.alloc(VHD_FOOTER_SIZE_BYTES);
    expect(vhdChecksum(zeros)).toBe(0xffffffff);
    zeros[VHD_FOOTER_OFFSETS.checksum] = 0xff; // the checksum field itself does not count
    expect(vhdChecksum(zeros)).toBe(0xffffffff);
  });

  it('round-trips a footer it encodes, with the checksum qemu would compute', () => {
    const footer = newFixedVhdFooter(64 * 1024 * 1024, { uniqueId: '01234567-89ab-cdef-0123-456789abcdef', nowMs: Date.UTC(2026, 0, 1) });
    const bytes = encodeVhdFooter(footer);
    expect(bytes.readUInt32BE(VHD_FOOTER_OFFSETS.checksum)).toBe(vhdChecksum(bytes));
    expect(bytes.subarray(VHD_FOOTER_OFFSETS.reserved).every((b) => b === 0)).toBe(true);
    const decoded = decodeVhdFooter(bytes, 0, 'x');
    expect({ ...decoded, checksum: 0 }).toEqual(footer);
    expect(decoded.timestampSeconds).toBe((Date.UTC(2026, 0, 1) - Date.UTC(2000, 0, 1)) / 1000);
    expect(bytes.toString('latin1', 28, 32)).toBe('win ');
  });
});

describe('VHD CHS geometry', () => {
  it('follows the specification algorithm across its branches', () => {
    // 20536 sectors: the 17-sector branch with 4 heads, as qemu-img computes it.
    expect(vhdGeometry(20536 * 512)).toEqual({ cylinders: 302, heads: 4, sectorsPerTrack: 17 });
    // 1 GiB: too many cylinders for 17 sectors -> 63 sectors, 16 heads.
    expect(vhdGeometry(1024 ** 3)).toEqual({ cylinders: 2080, heads: 16, sectorsPerTrack: 63 });
    // 200 MiB: 409600 sectors / 17 = 24094 -> heads 24 > 16 -> 31 sectors: 13212 / 16 = 825.
    expect(vhdGeometry(200 * 1024 * 1024)).toEqual({ cylinders: 825, heads: 16, sectorsPerTrack: 31 });
    // From 65535*16*63 sectors on: 255 sectors, 16 heads.
    expect(vhdGeometry(65535 * 16 * 63 * 512)).toEqual({ cylinders: Math.floor((65535 * 63) / 255), heads: 16, sectorsPerTrack: 255 });
    // Beyond 127 GiB the geometry saturates.
    expect(vhdGeometry(2 * 1024 ** 4)).toEqual({ cylinders: 65535, heads: 16, sectorsPerTrack: 255 });
  });

  it('never describes more sectors than the disk has', () => {
    const next = prng(7);
    for (let i = 0; i < 2000; i++) {
      const sectors = 1 + Math.floor(next() * 65535 * 16 * 255);
      const g = vhdGeometry(sectors * 512);
      expect(g.cylinders * g.heads * g.sectorsPerTrack).toBeLessThanOrEqual(sectors);
      expect(g.heads).toBeLessThanOrEqual(16);
      expect(g.cylinders).toBeLessThanOrEqual(65535);
    }
  });
});

describe('VHD footer damage', () => {
  it('names the offset of a bad cookie, counted from the start of the container', () => {
    const buf = qemuFooter();
    buf.write('conectiX', 0, 'latin1');
    expect(() => decodeVhdFooter(buf, 4096, 'd.vhd')).toThrowError(/byte offset 4096/);
    try {
      decodeVhdFooter(buf, 4096, 'd.vhd');
    } catch (err) {
      expect(err).toMatchObject({ code: 'BR_VHD_FOOTER_CORRUPT', details: { offset: 4096 } });
    }
  });

  it('refuses a checksum mismatch naming the checksum field', () => {
    const buf = qemuFooter();
    buf[VHD_FOOTER_OFFSETS.currentSize + 7] ^= 0x02;
    try {
      decodeVhdFooter(buf, 1000 * 512, 'd.vhd');
      expect.unreachable();
    } catch (err) {
      expect(err).toMatchObject({ code: 'BR_VHD_FOOTER_CORRUPT', details: { offset: 1000 * 512 + 64 } });
    }
  });

  it('refuses a dynamic disk and a size that does not match the container', () => {
    const dynamic = { ...newFixedVhdFooter(1 << 20, { nowMs: 0 }), diskType: VhdDiskType.dynamic };
    const decoded = decodeVhdFooter(encodeVhdFooter(dynamic), 1 << 20, 'd.vhd');
    expect(codeOf(() => checkFixedVhdFooter(decoded, (1 << 20) + 512, 'd.vhd'))).toBe('BR_VHD_NOT_FIXED');
    const fixed = decodeVhdFooter(encodeVhdFooter(newFixedVhdFooter(1 << 20, { nowMs: 0 })), 0, 'd.vhd');
    expect(codeOf(() => checkFixedVhdFooter(fixed, 1 << 20, 'd.vhd'))).toBe('BR_VHD_SIZE_MISMATCH');
    expect(codeOf(() => checkFixedVhdFooter(fixed, (1 << 20) + 512, 'd.vhd'))).toBeUndefined();
  });

  it('detects every single-byte change of a footer', () => {
    const good = encodeVhdFooter(newFixedVhdFooter(1 << 30, { nowMs: Date.UTC(2026, 0, 1) }));
    for (let i = 0; i < VHD_FOOTER_SIZE_BYTES; i++) {
      const bad = Buffer.from(good);
      bad[i] ^= 0x10;
      expect(codeOf(() => decodeVhdFooter(bad, 0, 'f'))).toBe('BR_VHD_FOOTER_CORRUPT');
    }
  });

  it('answers random damage with a coded error or a valid decode, never a crash (seeded fuzz)', () => {
    const next = prng(0x5eed);
    const good = encodeVhdFooter(newFixedVhdFooter(1 << 30, { nowMs: Date.UTC(2026, 0, 1) }));
    const seen = new Set<string>();
    for (let i = 0; i < 5000; i++) {
      const bad = Buffer.from(good);
      const flips = 1 + Math.floor(next() * 8);
      for (let f = 0; f < flips; f++) bad[Math.floor(next() * VHD_FOOTER_SIZE_BYTES)] = Math.floor(next() * 256);
      // Half the time repair the checksum so damage reaches the field checks.
      if (next() < 0.5) bad.writeUInt32BE(vhdChecksum(bad), VHD_FOOTER_OFFSETS.checksum);
      const code = codeOf(() => {
        const footer = decodeVhdFooter(bad, 1 << 30, 'fuzz');
        checkFixedVhdFooter(footer, (1 << 30) + 512, 'fuzz');
      });
      seen.add(code ?? 'ok');
      if (code !== undefined) expect(code).toMatch(/^BR_VHD_/);
    }
    expect(seen.has('BR_VHD_FOOTER_CORRUPT')).toBe(true);
  });
});
