import { BlockrelayError } from '../retry/blockrelay-error';
import { DISK_ID_PATTERN } from '../platform/disk-id';

/**
 * The blockrelay transport protocol, version 1: how sealed [MS-HRL] logs
 * travel source -> process server -> master target over HTTP(S).
 *
 * A log is uploaded with `PUT /v1/disks/{diskId}/logs/{seq}`. The body is the
 * sealed log itself (a valid [MS-HRL] file, untouched), optionally
 * lz4-framed on the wire; everything blockrelay needs beyond the log travels
 * in headers (the envelope), never inside it. The receiver answers only when
 * the log is verified and durable. See docs/transport.md.
 */
export const PROTOCOL_VERSION = 'v1';

export const HEADER = {
  /** `Bearer <shared secret>` on every call. */
  authorization: 'authorization',
  /** xxhash64 of the uncompressed log, 16 lowercase hex digits. */
  xxhash64: 'x-blockrelay-xxhash64',
  /** Byte length of the uncompressed log. */
  logLength: 'x-blockrelay-log-length',
  /** `lz4` when the body is an lz4 frame stream; absent for the plain log. */
  encoding: 'x-blockrelay-encoding',
  /** The source's cut time in ms since the epoch: the recovery point's time. */
  cutTimeMs: 'x-blockrelay-cut-time-ms',
  /** Identity of the cut; disks cut together share it. */
  cutId: 'x-blockrelay-cut-id',
  /** Replication group of the disk, if any. */
  group: 'x-blockrelay-group',
  /** Present on an app-consistent cut: the tag's name (may be empty). */
  appTag: 'x-blockrelay-app-tag',
  /** Size in bytes of the protected disk. */
  diskSizeBytes: 'x-blockrelay-disk-size-bytes',
  /**
   * `1` on a log that carries resync data: blocks read from the source while
   * it was being written, so its end is not a crash-consistent point.
   */
  resync: 'x-blockrelay-resync',
  /**
   * On a resync log only: the sequence number it follows, the newest log
   * before it that the source did not fold (logs between were folded into
   * the resync data and are never sent). A receiver admits the resync log
   * past a gap only once it has everything up to this one.
   */
  follows: 'x-blockrelay-follows',
  /**
   * `1` on an ordinary log sealed while the source still owed a resync
   * (after an overflow, or a crash's write intents, until the last round):
   * the target at its end mixes new and old blocks, so it ends no
   * selectable recovery point. Unlike `resync`, it changes nothing in how
   * the log is admitted.
   */
  tainted: 'x-blockrelay-tainted',
} as const;

/** Bounds the receiver enforces. */
export const TRANSPORT_LIMITS = {
  /** A sealed log larger than this is refused (BR_UPLOAD_TOO_LARGE). */
  maxLogBytes: 4 * 1024 ** 3,
  /** Highest sequence number: sequence numbers are 20-digit decimal file names. */
  maxSeq: Number.MAX_SAFE_INTEGER,
  maxTagBytes: 256,
  maxGroupBytes: 64,
  /** Idle time after which an upload is abandoned. */
  uploadIdleTimeoutMs: 60_000,
} as const;

/** What travels beside a log. */
export interface LogEnvelope {
  readonly diskId: string;
  readonly seq: number;
  readonly xxhash64: string;
  readonly logLength: number;
  readonly cutTimeMs: number;
  readonly cutId: string;
  readonly group: string | undefined;
  /** undefined: crash-consistent only; a string (possibly empty): app-consistent tag name. */
  readonly appTag: string | undefined;
  readonly diskSizeBytes: number;
  /** The log carries resync data; no recovery point ends with it (absent: false). */
  readonly resync?: boolean;
  /**
   * Resync logs only: the sequence this log follows (`seq - 1` for a resync
   * round; the last log shipped or kept before an overflow fold). Absent on
   * a resync log from an older sender or spool: see SequenceLedger.admit.
   */
  readonly follows?: number;
  /** Sealed while a resync was still owed: no selectable point ends with it (absent: false). See HEADER.tainted. */
  readonly tainted?: boolean;
}

export function validateDiskId(diskId: string): string {
  if (!DISK_ID_PATTERN.test(diskId)) {
    throw new BlockrelayError('BR_DISK_ID_INVALID', `disk id '${diskId.slice(0, 80)}' is not 1 to 64 letters, digits, ".", "_" or "-" starting with a letter or digit`);
  }
  return diskId;
}

function wholeNumber(name: string, text: string | undefined, max: number): number {
  if (text === undefined || !/^\d{1,20}$/.test(text)) throw new BlockrelayError('BR_PROTOCOL', `${name} must be a whole number, got '${String(text).slice(0, 40)}'`);
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n > max) throw new BlockrelayError('BR_PROTOCOL', `${name} ${text} is out of range (max ${max})`);
  return n;
}

/** Parses and validates an envelope from request headers; refuses anything malformed. */
export function parseEnvelope(diskId: string, seqText: string, headers: Record<string, string | string[] | undefined>): LogEnvelope {
  const one = (name: string): string | undefined => {
    const v = headers[name];
    return Array.isArray(v) ? v[0] : v;
  };
  const hash = one(HEADER.xxhash64);
  if (hash === undefined || !/^[0-9a-f]{16}$/.test(hash)) throw new BlockrelayError('BR_PROTOCOL', `${HEADER.xxhash64} must be 16 lowercase hex digits`);
  const appTag = one(HEADER.appTag);
  const group = one(HEADER.group);
  const cutId = one(HEADER.cutId) ?? '';
  if (appTag !== undefined && Buffer.byteLength(appTag) > TRANSPORT_LIMITS.maxTagBytes) throw new BlockrelayError('BR_PROTOCOL', `app tag longer than ${TRANSPORT_LIMITS.maxTagBytes} bytes`);
  if (group !== undefined && !/^[A-Za-z0-9._-]{1,64}$/.test(group)) throw new BlockrelayError('BR_PROTOCOL', 'group must be 1 to 64 letters, digits, ".", "_" or "-"');
  if (!/^[A-Za-z0-9._-]{0,64}$/.test(cutId)) throw new BlockrelayError('BR_PROTOCOL', 'cut id must be up to 64 letters, digits, ".", "_" or "-"');
  const logLength = wholeNumber(HEADER.logLength, one(HEADER.logLength), TRANSPORT_LIMITS.maxLogBytes);
  const seq = wholeNumber('sequence number', seqText, TRANSPORT_LIMITS.maxSeq);
  const resync = flag(HEADER.resync, one(HEADER.resync));
  const follows = followsOf(one(HEADER.follows), seq, resync);
  const tainted = flag(HEADER.tainted, one(HEADER.tainted));
  return {
    diskId: validateDiskId(diskId),
    seq,
    xxhash64: hash,
    logLength,
    cutTimeMs: wholeNumber(HEADER.cutTimeMs, one(HEADER.cutTimeMs), 8.64e15),
    cutId,
    group,
    appTag: appTag === undefined ? undefined : decodeTag(appTag),
    diskSizeBytes: wholeNumber(HEADER.diskSizeBytes, one(HEADER.diskSizeBytes), 2 ** 53 - 1),
    ...(resync ? { resync: true } : {}),
    ...(follows === undefined ? {} : { follows }),
    ...(tainted ? { tainted: true } : {}),
  };
}

/** `follows` belongs to a resync log and names an earlier sequence. */
function followsOf(text: string | undefined, seq: number, resync: boolean): number | undefined {
  if (text === undefined) return undefined;
  if (!resync) throw new BlockrelayError('BR_PROTOCOL', `${HEADER.follows} is only allowed on a resync log`);
  const follows = wholeNumber(HEADER.follows, text, TRANSPORT_LIMITS.maxSeq);
  if (follows >= seq) throw new BlockrelayError('BR_PROTOCOL', `${HEADER.follows} ${follows} is not before log ${seq}`);
  return follows;
}

function decodeTag(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new BlockrelayError('BR_PROTOCOL', `${HEADER.appTag} is not URI-encoded text`);
  }
}

/** A 0/1 header (absent: 0). */
function flag(name: string, text: string | undefined): boolean {
  if (text === undefined || text === '0') return false;
  if (text === '1') return true;
  throw new BlockrelayError('BR_PROTOCOL', `${name} must be 0 or 1, got '${text.slice(0, 20)}'`);
}

/** The headers that carry an envelope. */
export function envelopeHeaders(env: LogEnvelope): Record<string, string> {
  const h: Record<string, string> = {
    [HEADER.xxhash64]: env.xxhash64,
    [HEADER.logLength]: String(env.logLength),
    [HEADER.cutTimeMs]: String(env.cutTimeMs),
    [HEADER.cutId]: env.cutId,
    [HEADER.diskSizeBytes]: String(env.diskSizeBytes),
  };
  if (env.group !== undefined) h[HEADER.group] = env.group;
  if (env.appTag !== undefined) h[HEADER.appTag] = encodeURIComponent(env.appTag);
  if (env.resync === true) h[HEADER.resync] = '1';
  if (env.resync === true && env.follows !== undefined) h[HEADER.follows] = String(env.follows);
  if (env.tainted === true) h[HEADER.tainted] = '1';
  return h;
}

/** Sequence numbers as fixed-width names, so lexical order is apply order. */
export function seqName(seq: number): string {
  return String(seq).padStart(20, '0');
}

export function logPath(diskId: string, seq: number): string {
  return `/${PROTOCOL_VERSION}/disks/${encodeURIComponent(diskId)}/logs/${seq}`;
}
