import type { ChangeTrackerOptions } from '../../src/tracking/change-tracker';

/** Shared by the crash test and its child: the disk, the tracker settings and the deterministic writes. */
export const CRASH_DISK_BYTES = 4 * 1024 * 1024;

export function crashTrackerOptions(dir: string): ChangeTrackerOptions {
  return { dir, diskId: 'disk0', diskSizeBytes: CRASH_DISK_BYTES, metadataSizeBytes: 512, persistIntervalMs: 50, overflowRatio: 1, coalesceMinBytes: 1 };
}

export interface PlannedWrite {
  readonly offset: number;
  readonly length: number;
  readonly zero: boolean;
  readonly data: Buffer;
}

/** Write number `i`: where, how long, zeroes or data (all derived from `i`). */
export function writeOf(i: number): PlannedWrite {
  let x = (i * 2654435761) >>> 0 || 1;
  const next = (): number => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x;
  };
  const length = 512 * (1 + (next() % 16));
  const offset = (next() % (CRASH_DISK_BYTES / 4096 - 2)) * 4096;
  const zero = next() % 10 === 0;
  const data = Buffer.alloc(length);
  if (!zero) for (let k = 0; k < length; k += 4) data.writeUInt32LE(next(), k);
  return { offset, length, zero, data };
}
