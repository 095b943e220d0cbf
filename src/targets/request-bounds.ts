import { BlockrelayError } from '../retry/blockrelay-error';
import type { DiskTargetCapabilities } from './disk-target';

/**
 * The checks every DiskTarget makes before touching storage, in one place so
 * all targets refuse the same requests with the same codes: whole numbers,
 * inside `[0, sizeBytes)`, multiples of the target's alignment, and no writes
 * to a read-only or closed target.
 */
export interface RequestBoundsTarget {
  readonly spec: string;
  readonly sizeBytes: number;
  readonly capabilities: DiskTargetCapabilities;
}

export type RequestKind = 'read' | 'write' | 'writeZeroes' | 'discard' | 'extents';

/** Throws BR_TARGET_OUT_OF_RANGE / BR_TARGET_UNALIGNED / BR_TARGET_READ_ONLY for a bad request. */
export function checkRequest(target: RequestBoundsTarget, kind: RequestKind, offset: number, length: number): void {
  const details = { spec: target.spec, kind, offset, length, sizeBytes: target.sizeBytes };
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new BlockrelayError('BR_TARGET_OUT_OF_RANGE', `${kind} at offset ${offset} length ${length} is not a non-negative whole byte range`, { details });
  }
  if (offset + length > target.sizeBytes) {
    throw new BlockrelayError('BR_TARGET_OUT_OF_RANGE', `${kind} of ${length} bytes at offset ${offset} reaches past the end of ${target.spec} (${target.sizeBytes} bytes)`, { details });
  }
  const align = target.capabilities.alignmentBytes;
  // Every request keeps to the target's granularity, reads included, as the
  // DiskTarget contract says: a sector-based format never has to split one.
  if (offset % align !== 0 || length % align !== 0) {
    throw new BlockrelayError('BR_TARGET_UNALIGNED', `${kind} at offset ${offset} length ${length} is not a multiple of ${align} bytes on ${target.spec}`, { details: { ...details, alignmentBytes: align } });
  }
  if (kind !== 'read' && kind !== 'extents' && target.capabilities.readOnly) {
    throw new BlockrelayError('BR_TARGET_READ_ONLY', `${target.spec} is open read-only; ${kind} refused`, { details });
  }
}

/** Throws BR_TARGET_CLOSED when a target is used after close. */
export function checkOpen(closed: boolean, spec: string): void {
  if (closed) throw new BlockrelayError('BR_TARGET_CLOSED', `${spec} was used after close`, { details: { spec } });
}
