import { loadNative } from '../platform/native';

/**
 * The [MS-HRL] §2.6 checksum: the bitwise NOT of the 32-bit wrapping sum of
 * every byte of `data`, skipping the 4 bytes at `ignoreOffset` (the checksum
 * field itself) when given. A zero-filled structure sums to 0xFFFFFFFF.
 *
 * This is the portable reference; the native addon provides the fast path
 * used on log payloads ({@link hrlChecksum}), and tests hold the two to the
 * same results. A negative `ignoreOffset` ignores nothing.
 */
export function hrlChecksumReference(data: Uint8Array, ignoreOffset = -1): number {
  // A negative offset ignores nothing. Without this guard the range
  // [-1, 3) would silently drop the first three bytes.
  const ignoreStart = ignoreOffset < 0 ? Number.POSITIVE_INFINITY : ignoreOffset;
  let sum = 0;
  for (let i = 0; i < data.length; i++) {
    if (i >= ignoreStart && i < ignoreStart + 4) continue;
    sum = (sum + data[i]!) >>> 0;
  }
  return ~sum >>> 0;
}

/** One summing loop of the addon, as listed by {@link hrlChecksumKernels}. */
export interface HrlChecksumKernel {
  /** The number passed to the addon to select this kernel. */
  readonly id: number;
  /** `portable` (SWAR, any CPU), `sse2` or `avx2`. */
  readonly name: string;
}

interface ChecksumAddon {
  hrlChecksum(data: Uint8Array, ignoreOffset: number, kernel: number): number | undefined;
  readonly hrlChecksumKernels: readonly HrlChecksumKernel[];
  readonly hrlChecksumBestKernel: number;
}

/**
 * Below this length the JavaScript loop wins: a call into the addon costs
 * about 80 ns whatever the length, which is what the loop needs for about
 * 64 bytes. Measured with `npx tsx bench/native.bench.ts` (the
 * `checksumCrossover` figures). Metadata headers and entries (32 bytes) stay
 * in JavaScript; payloads (512 bytes and up) go native.
 */
export const HRL_CHECKSUM_NATIVE_MIN_BYTES = 64;

const KERNEL_BEST = 0;

function validate(data: Uint8Array, ignoreOffset: number): void {
  if (!(data instanceof Uint8Array)) {
    throw new TypeError(`hrlChecksum: data must be a Uint8Array or Buffer, got ${describe(data)}`);
  }
  if (!Number.isSafeInteger(ignoreOffset) || ignoreOffset < -1) {
    throw new RangeError(`hrlChecksum: ignoreOffset must be -1 (none) or an integer >= 0, got ${String(ignoreOffset)}`);
  }
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (typeof value === 'object') return (value as object).constructor?.name ?? 'object';
  return typeof value;
}

/**
 * The [MS-HRL] §2.6 checksum of `data`, skipping the bytes of
 * `[ignoreOffset, ignoreOffset + 4)` that lie inside `data` (-1: skip
 * nothing). Same results as {@link hrlChecksumReference}; large buffers are
 * summed by the addon's SIMD kernel at memory speed.
 *
 * @throws TypeError when `data` is not a Uint8Array; RangeError when
 *   `ignoreOffset` is not an integer >= -1.
 */
export function hrlChecksum(data: Uint8Array, ignoreOffset = -1): number {
  validate(data, ignoreOffset);
  if (data.length < HRL_CHECKSUM_NATIVE_MIN_BYTES) return hrlChecksumReference(data, ignoreOffset);
  return callNative(data, ignoreOffset, KERNEL_BEST);
}

/**
 * The checksum computed by one named addon kernel, whatever the length: for
 * tests that hold every kernel to the reference, and for the benchmark.
 */
export function hrlChecksumWithKernel(kernel: HrlChecksumKernel, data: Uint8Array, ignoreOffset = -1): number {
  validate(data, ignoreOffset);
  return callNative(data, ignoreOffset, kernel.id);
}

/** The kernels this build and CPU can run, the best one last. */
export function hrlChecksumKernels(): readonly HrlChecksumKernel[] {
  return loadNative<ChecksumAddon>().hrlChecksumKernels;
}

/** The kernel {@link hrlChecksum} uses on large buffers. */
export function hrlChecksumBestKernel(): HrlChecksumKernel {
  const addon = loadNative<ChecksumAddon>();
  const best = addon.hrlChecksumKernels.find((k) => k.id === addon.hrlChecksumBestKernel);
  if (best === undefined) throw new Error(`addon names kernel ${addon.hrlChecksumBestKernel} as best but does not list it`);
  return best;
}

function callNative(data: Uint8Array, ignoreOffset: number, kernel: number): number {
  const result = loadNative<ChecksumAddon>().hrlChecksum(data, ignoreOffset, kernel);
  // The addon answers undefined only to arguments this module never passes.
  if (result === undefined) throw new Error(`addon refused hrlChecksum arguments (kernel ${kernel})`);
  return result;
}
