/**
 * The one registry of blockrelay error codes.
 *
 * Codes never change meaning once released; messages may. Callers match on
 * `code`, never on message text. Each entry says whether the failure is
 * recoverable (retried by the retry policy) or not (the disk goes Critical
 * until an operator acts), and where Azure Site Recovery has a number users
 * know, that number. `docs/errors.md` is generated from this table
 * (`npm run errors:doc`).
 *
 * Each domain keeps its codes in its own section, prefixed by the domain.
 */
export interface ErrorSpec {
  /** True when waiting and trying again can succeed. */
  readonly recoverable: boolean;
  /** One line an operator can act on. */
  readonly description: string;
  /** The Azure Site Recovery error number users know, where one exists. */
  readonly asrCode?: number;
}

export const ERROR_CODES = {
  // --- general / daemon ---
  BR_CONFIG_INVALID: { recoverable: false, description: 'A configuration key is unknown, missing or out of range.' },
  BR_USAGE: { recoverable: false, description: 'A command line argument is missing or malformed.' },
  BR_INTERNAL: { recoverable: false, description: 'An unexpected internal failure; the message carries the cause.' },
  BR_LOCKED: { recoverable: false, description: 'Another blockrelay instance holds the lock on this state directory.' },

  // --- platform / resources ---
  BR_IO: { recoverable: true, description: 'An I/O operation on a local file failed.' },
  BR_DISK_FULL: { recoverable: true, description: 'The volume has too little free space.' },
  BR_LOW_MEMORY: { recoverable: true, description: 'The process could not obtain the memory it needs.' },
  BR_FILE_NOT_FOUND: { recoverable: false, description: 'A file named on the command line or in the configuration does not exist.' },

  // --- retry ---
  BR_RETRY_CANCELLED: { recoverable: false, description: 'A retry loop was cancelled before it succeeded.' },

  // --- native addon ---
  BR_NATIVE_UNAVAILABLE: { recoverable: false, description: 'The native addon is not built; run npm install (needs python3, make, g++).' },
  BR_DIRTYMAP_CORRUPT: { recoverable: false, description: 'A persisted dirty map failed validation.' },

  // --- tracking (MS-HRL logs, change tracker) ---

  // --- targets ---
  BR_TARGET_SPEC_INVALID: { recoverable: false, description: 'A disk spec is malformed; expected raw:PATH, vmdk:PATH, vmdk-flat:PATH, vhd:PATH, blob:URL or nbd://HOST:PORT/EXPORT.' },
  BR_TARGET_UNSUPPORTED: { recoverable: false, description: 'The disk kind or a feature of this image (e.g. a VMDK subformat) is not supported.' },
  BR_TARGET_OUT_OF_RANGE: { recoverable: false, description: 'A request reaches outside the disk.' },
  BR_TARGET_UNALIGNED: { recoverable: false, description: 'A request offset or length is not a multiple of the target alignment.' },
  BR_TARGET_READ_ONLY: { recoverable: false, description: 'The disk is open read-only and refuses writes.' },
  BR_TARGET_CLOSED: { recoverable: false, description: 'The disk was used after close.' },
  BR_TARGET_NAME_CONFLICT: { recoverable: false, description: 'A disk that is not ours already exists where a disk was to be created.', asrCode: 78052 },
  BR_TARGET_DUPLICATE_UUID: { recoverable: false, description: 'Another open disk in this process has the same disk UUID.' },
  BR_TARGET_HAS_PARENT: { recoverable: false, description: 'The image is a child in a snapshot chain (it has a parent); the master target needs a disk without snapshots.' },
  BR_TARGET_IS_PARENT: { recoverable: false, description: 'The image is the parent of another image (a snapshot exists); writing it would corrupt the child.' },
  BR_TARGET_TOO_MANY_DISKS: { recoverable: false, description: 'The master target already has the maximum of 60 attached disks.' },
  BR_TARGET_CORRUPT: { recoverable: false, description: 'The disk image is damaged (bad magic, bad checksum, pointers past the end, truncated); the message names the byte offset.' },
  BR_TARGET_SIZE_MISMATCH: { recoverable: false, description: 'The disks of a copy differ in size, or a size is not valid for the format.' },

  // --- tap (NBD) ---

  // --- transport ---

  // --- resync ---

  // --- retention ---
} as const satisfies Record<string, ErrorSpec>;

export type ErrorCode = keyof typeof ERROR_CODES;

export function isErrorCode(value: string): value is ErrorCode {
  return Object.prototype.hasOwnProperty.call(ERROR_CODES, value);
}
