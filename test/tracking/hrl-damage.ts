import { hrlChecksum } from '../../src/tracking/hrl-format';

/** Where the header (offset 0), metadata blocks and entries of a sealed log are. */
export interface HrlLayout {
  readonly blocks: number[];
  readonly entries: number[];
}

/** The layout of a sealed log of `metadataSize`-byte blocks, by walking its chain back from EOLLocation. */
export function hrlLayout(log: Buffer, metadataSize: number): HrlLayout {
  const blocks: number[] = [];
  const entries: number[] = [];
  let cur = Number(log.readBigUInt64LE(44)) - metadataSize;
  for (;;) {
    blocks.push(cur);
    for (let e = 0; e < log.readUInt32LE(cur + 8); e++) entries.push(cur + 32 + e * 32);
    const prev = Number(log.readBigUInt64LE(cur));
    if (prev === 0) return { blocks, entries };
    cur -= prev;
  }
}

/**
 * Sets byte `field` of the structure at `at` (0: the header, else a block
 * or an entry of `layout`) to `value` and fixes that structure's checksum,
 * so the damage reaches the checks behind it.
 */
export function setStructureByte(log: Buffer, layout: HrlLayout, at: number, field: number, value: number): void {
  log[at + field] = value;
  if (at === 0) log.writeUInt32LE(hrlChecksum(log.subarray(0, 4096), 40), 40);
  else if (layout.blocks.includes(at)) log.writeUInt32LE(hrlChecksum(log.subarray(at, at + 32), 12), at + 12);
  else log.writeUInt32LE(hrlChecksum(log.subarray(at, at + 32), 8), at + 8);
}
