/**
 * The [MS-HRL] §2.6 checksum: the bitwise NOT of the 32-bit wrapping sum of
 * every byte of `data`, skipping the 4 bytes at `ignoreOffset` (the checksum
 * field itself) when given. A zero-filled structure sums to 0xFFFFFFFF.
 *
 * This is the portable reference; the native addon provides the fast path
 * used on log payloads, and tests hold the two to the same results.
 */
export function hrlChecksumReference(data: Uint8Array, ignoreOffset = -1): number {
  let sum = 0;
  for (let i = 0; i < data.length; i++) {
    if (i >= ignoreOffset && i < ignoreOffset + 4) continue;
    sum = (sum + data[i]!) >>> 0;
  }
  return ~sum >>> 0;
}
