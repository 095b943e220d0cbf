/**
 * A small [MS-HRL] v2 writer written from ms-hrl-notes.md alone, with
 * DataView and no code from src/tracking, so tests can check that the
 * project's reader understands logs it did not write (and craft damaged
 * logs whose checksums are still right).
 */

export interface IndependentWrite {
  readonly offset: number;
  readonly data: Uint8Array;
  /** Defaults to 1 (write); anything else is an unsupported operation. */
  readonly metaOperation?: number;
  /** A DataLength other than data.length, to build payloads that do not fit. */
  readonly declaredLength?: number;
}

export interface IndependentLogOptions {
  /** Each inner array becomes one metadata block preceded by its payloads. */
  readonly blocks: readonly (readonly IndependentWrite[])[];
  readonly metadataSize?: number;
  readonly logFormatVersion?: number;
  readonly uniqueId?: Uint8Array;
  readonly previousUniqueId?: Uint8Array;
  /** Put DataChecksum in the entries (default true); false writes 0 like the spec's example. */
  readonly dataChecksums?: boolean;
  /** Overrides, to build logs that are damaged yet carry correct checksums. */
  readonly eolLocation?: number;
  readonly totalMetadataEntries?: number;
  readonly previousLocation?: (blockIndex: number, honest: number) => bigint;
}

/** The §2.6 checksum: NOT of the 32-bit byte sum, skipping 4 bytes at `skip`. */
function checksum(bytes: Uint8Array, start: number, length: number, skip: number): number {
  let sum = 0;
  for (let i = 0; i < length; i++) {
    if (skip >= 0 && i >= skip && i < skip + 4) continue;
    sum = (sum + bytes[start + i]!) % 0x1_0000_0000;
  }
  return (0xffffffff - sum) >>> 0;
}

/** Builds a whole sealed log in memory. */
export function buildIndependentLog(opts: IndependentLogOptions): Uint8Array {
  const ms = opts.metadataSize ?? 4096;
  let size = 4096;
  for (const block of opts.blocks) {
    for (const w of block) size += w.data.length;
    size += ms;
  }
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  let pos = 4096;
  let lastBlock = -1;
  let total = 0;
  opts.blocks.forEach((block, bi) => {
    const entryInfo: { offset: number; length: number; sum: number; op: number }[] = [];
    for (const w of block) {
      out.set(w.data, pos);
      entryInfo.push({ offset: w.offset, length: w.declaredLength ?? w.data.length, sum: checksum(w.data, 0, w.data.length, -1), op: w.metaOperation ?? 1 });
      pos += w.data.length;
    }
    const blockAt = pos;
    const honest = lastBlock < 0 ? 0 : blockAt - lastBlock;
    const prev = opts.previousLocation ? opts.previousLocation(bi, honest) : BigInt(honest);
    view.setBigUint64(blockAt, prev, true);
    view.setUint32(blockAt + 8, block.length, true);
    entryInfo.forEach((e, i) => {
      const at = blockAt + 32 + i * 32;
      view.setBigUint64(at, BigInt(e.offset), true);
      view.setUint32(at + 12, e.length, true);
      view.setUint32(at + 16, 600_000_000 + i, true);
      view.setUint8(at + 20, e.op);
      view.setUint32(at + 21, opts.dataChecksums === false ? 0 : e.sum, true);
      view.setUint32(at + 8, checksum(out, at, 32, 8), true);
    });
    view.setUint32(blockAt + 12, checksum(out, blockAt, 32, 12), true);
    total += block.length;
    lastBlock = blockAt;
    pos += ms;
  });
  // Header (§2.2): cookie, version, times, sizes, EOL, MetadataSize, GUIDs, counts.
  out.set([0x6d, 0x73, 0x63, 0x74, 0x6c, 0x6f, 0x67, 0x00], 0);
  view.setUint32(8, opts.logFormatVersion ?? 0x00020000, true);
  view.setUint32(12, 600_000_000, true);
  out.set([0x63, 0x74, 0, 0], 16);
  view.setUint32(20, 0x000a0000, true);
  view.setBigUint64(24, 0n, true);
  view.setBigUint64(32, BigInt(size), true);
  view.setBigUint64(44, BigInt(opts.eolLocation ?? size), true);
  view.setUint32(56, ms, true);
  out.set(opts.uniqueId ?? new Uint8Array(16).fill(0x11), 60);
  out.set(opts.previousUniqueId ?? new Uint8Array(16), 76);
  view.setUint32(92, 600_000_100, true);
  view.setBigUint64(96, BigInt(opts.totalMetadataEntries ?? total), true);
  view.setUint32(104, 0, true);
  view.setUint32(40, checksum(out, 0, 4096, 40), true);
  return out;
}

/** Recomputes the header checksum after a test edits header bytes. */
export function resealHeader(log: Uint8Array): void {
  new DataView(log.buffer, log.byteOffset).setUint32(40, checksum(log, 0, 4096, 40), true);
}
