/** mulberry32, seeded: the same seed gives the same run. */
export { prng as seededRandom } from '../helpers/prng';

/** Fills `buf` with seeded pseudo-random bytes. */
export function fillRandom(buf: Buffer, random: () => number): Buffer {
  for (let i = 0; i + 4 <= buf.length; i += 4) buf.writeUInt32LE(Math.floor(random() * 4294967296), i);
  for (let i = buf.length - (buf.length % 4); i < buf.length; i++) buf[i] = Math.floor(random() * 256);
  return buf;
}

/** Picks `count` distinct block indexes below `blocks`. */
export function pickBlocks(blocks: number, count: number, random: () => number): number[] {
  const picked = new Set<number>();
  while (picked.size < count) picked.add(Math.floor(random() * blocks));
  return [...picked].sort((a, b) => a - b);
}
