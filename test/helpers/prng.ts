/** A deterministic pseudo-random generator (mulberry32), so failing runs replay from their seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `length` bytes of a simple pattern that differs with `seed` (writes a test can tell apart and recompute). */
export function pattern(seed: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (seed * 31 + i * 7) & 0xff;
  return b;
}

/** `length` bytes drawn from `rand` (a whole number of 32-bit words; a tail under 4 bytes stays zero). */
export function randomData(rand: () => number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i + 4 <= length; i += 4) out.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
  return out;
}
