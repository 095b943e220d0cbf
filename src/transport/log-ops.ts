import type { DiskTarget, Extent } from '../targets/disk-target';

/**
 * What the transport needs from the change-log format: full verification of
 * a sealed log, its write ranges (for pre-images), and applying it to a
 * target. The [MS-HRL] implementation lives in src/tracking; the transport
 * only sees this seam.
 */
export interface LogOps {
  /** Verifies every structure and checksum; throws a coded BR_HRL_* error naming the offset. */
  verify(file: string, diskSizeBytes: number | undefined): Promise<void>;
  /** The byte ranges the log writes, in apply order (for the undo journal). */
  ranges(file: string): Promise<Extent[]>;
  /** Applies a verified log to the target, all entries in order. */
  apply(file: string, target: DiskTarget): Promise<{ entries: number; bytes: number }>;
}
