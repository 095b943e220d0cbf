import type { AllocationExtent, DiskTarget, Extent } from '../targets/disk-target';
import type { BlockHasher } from './block-hasher';

/** Span of the allocation map fetched at once: one extents() call serves many windows. */
const DEFAULT_SPAN_BYTES = 64 * 1024 * 1024;
/** Most extents kept from one span; a more fragmented span is fetched again per read. */
const MAX_CACHED_EXTENTS = 65_536;

/**
 * Reads a disk for hashing, skipping what its allocation map says reads as
 * zeroes: unallocated VMDK grains, empty page-blob pages. Those bytes are
 * zeroes in the returned buffer without any I/O, which matters most where
 * reads are remote (a page blob being failed back is mostly empty). The map
 * is fetched a span at a time, ahead of the sequential reads of a resync.
 */
interface Span {
  readonly start: number;
  readonly end: number;
  readonly extents: readonly AllocationExtent[];
}

const EMPTY_SPAN: Span = { start: 0, end: 0, extents: [] };

export class AllocatedReader {
  // Spans are replaced whole, never changed: concurrent reads each keep the
  // span they looked at, so none ever uses another range's map.
  private span: Promise<Span> = Promise.resolve(EMPTY_SPAN);

  constructor(
    private readonly disk: DiskTarget,
    private readonly spanBytes = DEFAULT_SPAN_BYTES,
  ) {}

  async read(offset: number, length: number): Promise<Buffer> {
    const end = offset + length;
    let span = await this.span;
    if (offset < span.start || end > span.end) {
      const fetching = this.fetch(offset, Math.max(length, Math.min(this.spanBytes, this.disk.sizeBytes - offset)));
      // A failed fetch fails this read, not every later one.
      this.span = fetching.catch(() => EMPTY_SPAN);
      span = await fetching;
    }
    const data: Array<{ offset: number; end: number }> = [];
    // Extents are in order: start at the first that ends after `offset`.
    let lo = 0;
    let hi = span.extents.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (span.extents[mid].offset + span.extents[mid].length <= offset) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; i < span.extents.length && span.extents[i].offset < end; i++) {
      const e = span.extents[i];
      const s = Math.max(e.offset, offset);
      const t = Math.min(e.offset + e.length, end);
      if (s >= t || e.zero) continue;
      const last = data[data.length - 1];
      if (last !== undefined && last.end === s) last.end = t;
      else data.push({ offset: s, end: t });
    }
    // The common case (raw files, full disks): one read, no copy.
    if (data.length === 1 && data[0].offset === offset && data[0].end === end) return this.disk.read(offset, length);
    const out = Buffer.alloc(length);
    const align = this.disk.capabilities.alignmentBytes;
    await Promise.all(
      data.map(async (d) => {
        // Extents keep to the disk's alignment, but widen to it anyway: a read must.
        const s = Math.max(offset, Math.floor(d.offset / align) * align);
        const t = Math.min(end, Math.ceil(d.end / align) * align);
        (await this.disk.read(s, t - s)).copy(out, s - offset);
      }),
    );
    return out;
  }

  /**
   * Whether `hashedRead` can read and hash natively: the disk offers
   * DiskTarget.hashBlocks and the hasher is the addon's (so the addon is
   * loaded and both give the same hashes anyway).
   */
  hashesNatively(hasher: BlockHasher): boolean {
    return this.disk.hashBlocks !== undefined && hasher.implementation === 'native';
  }

  /**
   * Reads and hashes `[offset, offset + length)` in one native pass (see
   * hashesNatively), leaving the bytes in `into` when given. Holes are read
   * like data here: on a local file a hole costs no I/O, only a copy of zeroes.
   */
  hashedRead(offset: number, length: number, blockSizeBytes: number, into?: Buffer): Promise<Buffer> {
    return this.disk.hashBlocks!(offset, length, blockSizeBytes, into);
  }

  /** Drops the map if it covers `[offset, offset + length)`: a write there may fill a hole. */
  forget(offset: number, length: number): void {
    const current = this.span;
    this.span = current.then((span) => (span.end <= offset || span.start >= offset + length ? span : EMPTY_SPAN));
  }

  private async fetch(offset: number, length: number): Promise<Span> {
    const extents: AllocationExtent[] = [];
    let covered = offset;
    for await (const e of this.disk.extents(offset, length)) {
      extents.push(e);
      covered = e.offset + e.length;
      if (extents.length >= MAX_CACHED_EXTENTS) break;
    }
    // Whatever the map did not cover (a bounded, fragmented span) is read as data.
    if (covered < offset + length) extents.push({ offset: covered, length: offset + length - covered, zero: false });
    return { start: offset, end: offset + length, extents };
  }
}

/**
 * Reads are split into pieces of this size, each hashed as soon as it
 * arrives, while it is still in the CPU's cache: hashing a 4 MiB buffer after
 * reading it means fetching it again from memory, which measured slower.
 * A power of two, so pieces hold whole blocks.
 */
export const READ_PIECE_BYTES = 512 * 1024;
/** Pieces of one range read at once. */
const MAX_PIECES_IN_FLIGHT = 8;

/** A range read in pieces, with the fine hashes of its blocks. */
export interface ReadRange {
  readonly pieceBytes: number;
  readonly pieces: readonly Buffer[];
  readonly fine: Buffer;
}

/**
 * Reads `r` in pieces (at most MAX_PIECES_IN_FLIGHT at once), hashing each
 * as it arrives unless `hash` is false. Where the disk hashes natively the
 * range is read and hashed in one call off the main thread instead, and its
 * bytes are kept only when `keepData` is true (the target side of a resync
 * needs only the hashes), in `into` when given (at least `r.length` bytes).
 */
export async function readPieces(reader: AllocatedReader, hasher: BlockHasher, r: Extent, blockSizeBytes: number, hash: boolean, keepData = true, into?: Buffer): Promise<ReadRange> {
  if (hash && r.length > 0 && reader.hashesNatively(hasher)) {
    // A reused `into` matters: fresh large buffers are fresh pages, and
    // faulting them in cost more than the read and the hash together.
    const data = keepData ? (into?.subarray(0, r.length) ?? Buffer.allocUnsafe(r.length)) : undefined;
    const fine = await reader.hashedRead(r.offset, r.length, blockSizeBytes, data);
    return { pieceBytes: r.length, pieces: data === undefined ? [] : [data], fine };
  }
  const pieceBytes = Math.max(READ_PIECE_BYTES, blockSizeBytes);
  const count = Math.ceil(r.length / pieceBytes);
  const pieces: Buffer[] = new Array<Buffer>(count);
  const hashes: Buffer[] = new Array<Buffer>(count);
  for (let first = 0; first < count; first += MAX_PIECES_IN_FLIGHT) {
    const batch: Array<Promise<void>> = [];
    for (let i = first; i < Math.min(count, first + MAX_PIECES_IN_FLIGHT); i++) {
      const offset = r.offset + i * pieceBytes;
      batch.push(
        reader.read(offset, Math.min(pieceBytes, r.offset + r.length - offset)).then((data) => {
          pieces[i] = data;
          if (hash) hashes[i] = hasher.hashBlocks(data, blockSizeBytes);
        }),
      );
    }
    await Promise.all(batch);
  }
  return { pieceBytes, pieces, fine: !hash ? Buffer.alloc(0) : count === 1 ? hashes[0] : Buffer.concat(hashes) };
}

/** Bytes `[start, end)` of a range read in pieces. */
export function slicePieces({ pieces, pieceBytes }: ReadRange, start: number, end: number): Buffer {
  const first = Math.floor(start / pieceBytes);
  const last = Math.floor((end - 1) / pieceBytes);
  if (first === last) return pieces[first].subarray(start - first * pieceBytes, end - first * pieceBytes);
  const parts: Buffer[] = [];
  for (let p = first; p <= last; p++) parts.push(pieces[p].subarray(Math.max(start, p * pieceBytes) - p * pieceBytes, Math.min(end, (p + 1) * pieceBytes) - p * pieceBytes));
  return Buffer.concat(parts);
}
