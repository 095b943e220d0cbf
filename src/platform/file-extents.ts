import { MAX_FD, requireInteger } from './addon-arguments';
import { loadNative } from './native';

/**
 * Holes in regular files, through the native addon: lseek(SEEK_DATA /
 * SEEK_HOLE) to find them and fallocate(PUNCH_HOLE | KEEP_SIZE) to make
 * them. Node has neither.
 *
 * Everything here degrades instead of failing where a filesystem cannot
 * answer: a seek it does not support reports `'unsupported'` (callers then
 * treat the file as all data), and so does a punch (callers then write
 * zeroes). Real I/O errors are thrown as Node-style errors whose `code` is
 * the errno name (`EIO`, `EBADF`), so callers wrap them with `wrapError`
 * exactly as they wrap `node:fs` errors.
 *
 * The seeks move the descriptor's file position; positional reads and writes
 * (what every target uses) do not care. The descriptor must stay open until
 * a `punchHole` promise settles: the punch runs on the libuv thread pool.
 */
export interface FileExtentOps {
  /** The first data offset at or after `offset`, {@link NO_MORE_DATA} when only a hole (or the end) follows, or `'unsupported'`. */
  seekData(fd: number, offset: number): number | 'unsupported';
  /** The first hole offset at or after `offset` (the end of the file counts as one), {@link NO_MORE_DATA} at or past the end, or `'unsupported'`. */
  seekHole(fd: number, offset: number): number | 'unsupported';
  /** Deallocates `[offset, offset + length)` keeping the size; the range reads as zeroes after `'punched'`. */
  punchHole(fd: number, offset: number, length: number): Promise<'punched' | 'unsupported'>;
}

/** What a seek returns when lseek said ENXIO: no data at or after the offset. */
export const NO_MORE_DATA = -1;

/** One run of a file's allocation map: `zero` runs are holes and read as zeroes. */
export interface FileExtent {
  readonly offset: number;
  readonly length: number;
  readonly zero: boolean;
}

/** Granularity extents are rounded to unless the caller asks otherwise: the usual filesystem block and page. */
export const FILE_EXTENT_GRANULARITY_BYTES = 4096;
/** Seeks made by {@link fileAllocation} before it lets the event loop run (the seeks are synchronous syscalls). */
export const SEEKS_PER_EVENT_LOOP_TURN = 512;

/** errno names that mean "this filesystem or kernel cannot", not "this I/O failed". */
const SEEK_UNSUPPORTED = new Set(['EINVAL', 'EOPNOTSUPP', 'ENOTSUP', 'ENOSYS']);
const PUNCH_UNSUPPORTED = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOSYS']);

interface FileExtentsAddon {
  seekData(fd: number, offset: number): number | string | undefined;
  seekHole(fd: number, offset: number): number | string | undefined;
  punchHole(fd: number, offset: number, length: number): Promise<number | string> | undefined;
}

function errnoError(name: string, syscall: string, fd: number, offset: number, length?: number): NodeJS.ErrnoException {
  const range = length === undefined ? `offset ${offset}` : `offset ${offset} length ${length}`;
  const err: NodeJS.ErrnoException = new Error(`${name}: ${syscall} on fd ${fd} at ${range} failed`);
  err.code = name;
  err.syscall = syscall;
  return err;
}

function seek(kind: 'seekData' | 'seekHole', fd: number, offset: number): number | 'unsupported' {
  requireInteger(`${kind}: fd`, fd, 0, MAX_FD);
  requireInteger(`${kind}: offset`, offset, 0, Number.MAX_SAFE_INTEGER);
  const result = loadNative<FileExtentsAddon>()[kind](fd, offset);
  if (typeof result === 'number') return result;
  if (result === undefined) throw new Error(`addon refused ${kind} arguments`);
  if (SEEK_UNSUPPORTED.has(result)) return 'unsupported';
  throw errnoError(result, kind === 'seekData' ? 'lseek(SEEK_DATA)' : 'lseek(SEEK_HOLE)', fd, offset);
}

/** The addon's seeks and punch, with arguments checked before they cross into C++. */
export const nativeFileExtents: FileExtentOps = {
  seekData: (fd, offset) => seek('seekData', fd, offset),
  seekHole: (fd, offset) => seek('seekHole', fd, offset),
  async punchHole(fd, offset, length) {
    requireInteger('punchHole: fd', fd, 0, MAX_FD);
    requireInteger('punchHole: offset', offset, 0, Number.MAX_SAFE_INTEGER);
    requireInteger('punchHole: length', length, 1, Number.MAX_SAFE_INTEGER - offset);
    const pending = loadNative<FileExtentsAddon>().punchHole(fd, offset, length);
    if (pending === undefined) throw new Error('addon refused punchHole arguments');
    const result = await pending;
    if (result === 0) return 'punched';
    if (typeof result === 'string' && PUNCH_UNSUPPORTED.has(result)) return 'unsupported';
    throw errnoError(String(result), 'fallocate(PUNCH_HOLE)', fd, offset, length);
  },
};

/**
 * Whether `fd` (open for writing, `sizeBytes` long) can punch holes, asked
 * without touching its contents: the probe punches one block just past the
 * end of the file, which filesystems that support punching accept and treat
 * as a no-op (no data lives there; KEEP_SIZE keeps the size). Like any
 * fallocate it updates the file's mtime, so probe only files opened to be
 * written.
 */
export async function canPunchHoles(fd: number, sizeBytes: number, ops: FileExtentOps = nativeFileExtents): Promise<boolean> {
  const past = Math.ceil(sizeBytes / FILE_EXTENT_GRANULARITY_BYTES) * FILE_EXTENT_GRANULARITY_BYTES;
  return (await ops.punchHole(fd, past, FILE_EXTENT_GRANULARITY_BYTES)) === 'punched';
}

export interface FileAllocationOptions {
  /** Data runs are widened outward to multiples of this (a power of two); default 4 KiB. */
  readonly granularityBytes?: number;
  readonly ops?: FileExtentOps;
}

/**
 * The allocation map of `[offset, offset + length)` of the file open on
 * `fd`: runs in order that cover the range exactly, adjacent runs never of
 * the same kind. Data runs are widened outward to `granularityBytes` (and
 * clipped to the range), so a zero run always lies inside a hole and reads
 * as zeroes. Past the end of the file is a hole. Where the filesystem cannot
 * seek holes, the rest of the range is one data run.
 *
 * Each run costs two synchronous lseek calls; the walk yields to the event
 * loop every {@link SEEKS_PER_EVENT_LOOP_TURN} seeks so a badly fragmented
 * file cannot stall the process.
 */
export async function* fileAllocation(fd: number, offset: number, length: number, options: FileAllocationOptions = {}): AsyncGenerator<FileExtent, void, undefined> {
  const granularity = options.granularityBytes ?? FILE_EXTENT_GRANULARITY_BYTES;
  const ops = options.ops ?? nativeFileExtents;
  requireInteger('fileAllocation: offset', offset, 0, Number.MAX_SAFE_INTEGER);
  requireInteger('fileAllocation: length', length, 0, Number.MAX_SAFE_INTEGER - offset);
  if (!Number.isSafeInteger(granularity) || granularity < 1 || (granularity & (granularity - 1)) !== 0 || granularity > 2 ** 30) {
    throw new RangeError(`fileAllocation: granularityBytes must be a power of two up to 1 GiB, got ${granularity}`);
  }
  const end = offset + length;
  let pos = offset;
  // The data run not yet yielded: a later one may touch it once both are widened.
  let dataStart = -1;
  let seeks = 0;
  while (pos < end) {
    if (seeks >= SEEKS_PER_EVENT_LOOP_TURN) {
      seeks = 0;
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    seeks += 2;
    const found = ops.seekData(fd, pos);
    if (found === 'unsupported') {
      if (dataStart < 0) dataStart = pos;
      pos = end;
      break;
    }
    if (found === NO_MORE_DATA || found >= end) break;
    // lseek never answers before `pos`; if a filesystem did, trust the data.
    const data = Math.max(found, pos);
    const hole = ops.seekHole(fd, data);
    // Data with no hole after it (or a file shrinking under us): data to the end.
    const holeAt = hole === 'unsupported' || hole === NO_MORE_DATA || hole <= data ? end : hole;
    const from = Math.max(pos, Math.floor(data / granularity) * granularity);
    const to = Math.min(end, Math.ceil(holeAt / granularity) * granularity);
    if (from > pos) {
      if (dataStart >= 0) yield { offset: dataStart, length: pos - dataStart, zero: false };
      yield { offset: pos, length: from - pos, zero: true };
      dataStart = from;
    } else if (dataStart < 0) {
      dataStart = pos;
    }
    pos = to;
  }
  if (dataStart >= 0) yield { offset: dataStart, length: pos - dataStart, zero: false };
  if (pos < end) yield { offset: pos, length: end - pos, zero: true };
}
