/** One extent of a multi-extent VMDK: where it starts on the disk and how long it is. */
export interface PlacedExtent {
  /** Disk byte offset where this extent starts. */
  readonly start: number;
  readonly length: number;
}

/** The part of a request that falls in one extent. */
export interface ExtentPiece<E extends PlacedExtent> {
  readonly extent: E;
  /** Disk offset of the piece. */
  readonly at: number;
  /** Offset of the piece inside the extent. */
  readonly inExtent: number;
  readonly length: number;
}

/**
 * The extents a descriptor lists, concatenated in descriptor order (flat
 * and split VMDKs alike), and how a disk range divides among them.
 */
export class VmdkExtentMap<E extends PlacedExtent> {
  readonly sizeBytes: number;

  constructor(readonly extents: readonly E[]) {
    this.sizeBytes = extents.reduce((n, e) => n + e.length, 0);
  }

  /** The pieces of `[offset, offset + length)`, in disk order. */
  *pieces(offset: number, length: number): Generator<ExtentPiece<E>> {
    const end = offset + length;
    for (const extent of this.extents) {
      const from = Math.max(offset, extent.start);
      const to = Math.min(end, extent.start + extent.length);
      if (from < to) yield { extent, at: from, inExtent: from - extent.start, length: to - from };
    }
  }
}
