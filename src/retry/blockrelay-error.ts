import { ERROR_CODES, type ErrorCode } from './error-codes';

/** Structured facts about a failure, e.g. the byte offset of damage in a log. */
export type ErrorDetails = Readonly<Record<string, string | number | boolean | null | undefined>>;

/**
 * Every failure blockrelay reports on purpose is a BlockrelayError with a
 * stable `code` from the registry. Errors from libraries are wrapped where
 * they enter our code and kept as `cause`.
 */
export class BlockrelayError extends Error {
  readonly code: ErrorCode;
  readonly recoverable: boolean;
  readonly details: ErrorDetails;

  constructor(code: ErrorCode, message: string, options: { cause?: unknown; details?: ErrorDetails } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'BlockrelayError';
    this.code = code;
    this.recoverable = ERROR_CODES[code].recoverable;
    this.details = options.details ?? {};
  }

  /** The one-line form the CLI prints: `BR_CODE: message`. */
  toLine(): string {
    return `${this.code}: ${this.message}`;
  }
}

export function isBlockrelayError(err: unknown): err is BlockrelayError {
  return err instanceof BlockrelayError;
}

/**
 * Wraps an error from Node or a library into a BlockrelayError, mapping the
 * errno codes that mean "try again later" to recoverable codes. An error that
 * already is a BlockrelayError passes through unchanged.
 */
export function wrapError(err: unknown, fallback: ErrorCode, context: string): BlockrelayError {
  if (err instanceof BlockrelayError) return err;
  const errno = (err as NodeJS.ErrnoException | undefined)?.code;
  const text = err instanceof Error ? err.message : String(err);
  let code: ErrorCode = fallback;
  if (errno === 'ENOSPC' || errno === 'EDQUOT') code = 'BR_DISK_FULL';
  else if (errno === 'ENOMEM') code = 'BR_LOW_MEMORY';
  else if (errno === 'ENOENT') code = 'BR_FILE_NOT_FOUND';
  return new BlockrelayError(code, `${context}: ${text}`, { cause: err });
}
