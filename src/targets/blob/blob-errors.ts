import { BlockrelayError } from '../../retry/blockrelay-error';
import type { ErrorCode } from '../../retry/error-codes';

/** Storage error codes that mean our lease is gone or another writer holds one. */
const LEASE_LOST_CODES = new Set([
  'LeaseIdMismatchWithBlobOperation',
  'LeaseIdMismatchWithLeaseOperation',
  'LeaseIdMissing',
  'LeaseNotPresentWithBlobOperation',
  'LeaseNotPresentWithLeaseOperation',
  'LeaseLost',
  'LeaseIsBrokenAndCannotBeRenewed',
  'LeaseIsBreakingAndCannotBeAcquired',
  'LeaseIsBreakingAndCannotBeChanged',
]);

/** Node and SDK codes of requests that never got an answer. */
const NETWORK_CODES = new Set(['REQUEST_SEND_ERROR', 'ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'EAI_AGAIN', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH']);

/** The facts of a failed storage request that decide its code. */
export interface StorageFailure {
  readonly statusCode?: number;
  /** The storage error code (x-ms-error-code), or a Node/SDK code for network failures. */
  readonly code?: string;
  readonly name?: string;
}

/**
 * The project's code for a failed storage request, as a pure function of its
 * status and error code: throttling (429, 503) and other 5xx answers and
 * network failures are recoverable, so the retry policy waits and tries
 * again; authentication (401, 403), missing blobs, lease conflicts and other
 * 4xx answers are not. `phase` tells a failed lease acquisition (another
 * writer holds it) from a write refused because ours is gone.
 */
export function blobErrorCode(failure: StorageFailure, phase: 'acquire' | 'other' = 'other'): ErrorCode {
  const { statusCode, code } = failure;
  if (statusCode === undefined) {
    // A RestError without a status is a request that got no answer; any
    // other error without one is a defect and must not be retried as if it
    // were the network.
    if (failure.name === 'AbortError' || failure.name === 'RestError' || (code !== undefined && NETWORK_CODES.has(code))) return 'BR_BLOB_NETWORK';
    return 'BR_INTERNAL';
  }
  if (statusCode === 429 || statusCode === 503) return 'BR_BLOB_THROTTLED';
  if (statusCode >= 500) return 'BR_BLOB_SERVER_ERROR';
  if (statusCode === 408) return 'BR_BLOB_NETWORK';
  if (statusCode === 401 || statusCode === 403) return 'BR_BLOB_AUTH';
  if (statusCode === 404) return 'BR_BLOB_NOT_FOUND';
  if (code === 'LeaseAlreadyPresent' || (phase === 'acquire' && statusCode === 409)) return 'BR_BLOB_LEASE_HELD';
  if (code !== undefined && LEASE_LOST_CODES.has(code)) return 'BR_BLOB_LEASE_LOST';
  if (code === 'InvalidBlobType') return 'BR_BLOB_NOT_PAGE_BLOB';
  return 'BR_BLOB_REQUEST_FAILED';
}

/**
 * Wraps an error from the storage SDK into a BlockrelayError where it enters
 * our code, keeping the original as `cause`. BlockrelayErrors pass through.
 */
export function wrapBlobError(err: unknown, what: string, spec: string, phase: 'acquire' | 'other' = 'other'): BlockrelayError {
  if (err instanceof BlockrelayError) return err;
  const e = err as { statusCode?: number; code?: string; name?: string; message?: string; details?: { errorCode?: string } } | undefined;
  const storageCode = e?.details?.errorCode ?? e?.code;
  const failure: StorageFailure = { statusCode: e?.statusCode, code: storageCode, name: e?.name };
  const code = blobErrorCode(failure, phase);
  const status = e?.statusCode === undefined ? 'no answer' : `HTTP ${e.statusCode}${storageCode === undefined ? '' : ` ${storageCode}`}`;
  const firstLine = (e?.message ?? String(err)).split('\n')[0];
  return new BlockrelayError(code, `${what} on ${spec} failed (${status}): ${firstLine}`, {
    cause: err,
    details: { spec, statusCode: e?.statusCode, storageCode },
  });
}
