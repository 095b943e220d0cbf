import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { nativeFileExtents, type FileExtentOps } from '../../platform/file-extents';
import { BlockrelayError, wrapError } from '../../retry/blockrelay-error';
import type { OpenOptions, PageCachePolicy } from '../disk-target';
import { FILE_SPAN_EXTENT_GRANULARITY_BYTES, FileSpan } from '../file-span';
import { FileSpanTarget, openForTarget, statForOpen } from '../file-span-target';
import { checkOpen } from '../request-bounds';

const SECTOR_BYTES = 512;
/** Request alignment: none for files, the sector for block devices. */
const SECTOR_BYTES_IF_DEVICE = { file: 1, device: SECTOR_BYTES } as const;
/** Data extents are widened outward to this: the usual filesystem block, and no finer than callers need. */
export const RAW_EXTENT_GRANULARITY_BYTES = FILE_SPAN_EXTENT_GRANULARITY_BYTES;

/** {@link OpenOptions} plus the seam tests use to stand in for a filesystem without hole support. */
export interface RawOpenOptions extends OpenOptions {
  /** How holes are found and punched; default the native addon. */
  readonly fileExtents?: FileExtentOps;
}

/** The sysfs directory of a block device (`/sys/dev/block/MAJOR:MINOR`). */
function blockDeviceSysfs(stat: fs.Stats): string {
  const rdev = stat.rdev;
  const major = Math.floor(rdev / 256) % 4096;
  const minor = (rdev % 256) + Math.floor(rdev / 1048576) * 256;
  return `/sys/dev/block/${major}:${minor}`;
}

/** Size of a block device from sysfs: Node has no lseek(SEEK_END) and stat reports 0 for devices. */
function blockDeviceSizeBytes(stat: fs.Stats, path: string): number {
  const sysfs = `${blockDeviceSysfs(stat)}/size`;
  try {
    return Number(fs.readFileSync(sysfs, 'utf8').trim()) * SECTOR_BYTES;
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot read the size of block device ${path} from ${sysfs}`);
  }
}

/**
 * How a block device zeroes ranges, from its request queue in sysfs (a
 * partition has none of its own; its disk's is one level up). fallocate
 * PUNCH_HOLE on a block device (Linux 4.9+) zeroes with unmapping allowed
 * and no fallback to writing, so it works only where the device has a
 * write-zeroes command (`write_zeroes_max_bytes` > 0), and only on whole
 * logical blocks. Unknown answers mean no punching.
 */
function blockDeviceZeroing(stat: fs.Stats): { canPunch: boolean; logicalBlockBytes: number } {
  const base = blockDeviceSysfs(stat);
  for (const queue of [`${base}/queue`, `${base}/../queue`]) {
    try {
      const logicalBlockBytes = Number(fs.readFileSync(`${queue}/logical_block_size`, 'utf8').trim());
      const writeZeroesMaxBytes = Number(fs.readFileSync(`${queue}/write_zeroes_max_bytes`, 'utf8').trim());
      if (!Number.isSafeInteger(logicalBlockBytes) || logicalBlockBytes < SECTOR_BYTES || (logicalBlockBytes & (logicalBlockBytes - 1)) !== 0) break;
      return { canPunch: writeZeroesMaxBytes > 0, logicalBlockBytes };
    } catch {
      // Not this directory; try the parent disk's queue.
    }
  }
  return { canPunch: false, logicalBlockBytes: SECTOR_BYTES };
}

/**
 * A raw image file or block device: byte i of the disk is byte i of the file.
 *
 * Regular files are sparse: a file this target creates is all hole
 * (ftruncate), `extents()` walks the file with lseek(SEEK_DATA / SEEK_HOLE)
 * and reports holes as zero extents (data extents widened outward to
 * {@link RAW_EXTENT_GRANULARITY_BYTES}, so copies and resyncs never read a
 * hole), and `writeZeroes` and `discard` punch holes with
 * fallocate(PUNCH_HOLE | KEEP_SIZE), which frees the space (the kernel zeroes
 * partial blocks at unaligned edges, so no edge is written and a range that
 * was already a hole stays one).
 *
 * Where the filesystem cannot, the target degrades rather than fails: without
 * SEEK_DATA `extents()` reports one data extent; without hole punching
 * (probed at open without touching data, and again on every EOPNOTSUPP)
 * `writeZeroes` writes zeroes, except at the tail of the file where a
 * truncate down and up releases the blocks. `capabilities.discard` says
 * which: true only for a writable regular file that can punch holes.
 *
 * Block devices report one data extent. Their `writeZeroes` and `discard`
 * use the same fallocate where the device has a write-zeroes command (sysfs
 * `write_zeroes_max_bytes`; a loop device passes it on as a hole punch in its
 * backing file, an SSD may unmap): whole logical blocks are punched, the
 * rest written as zeroes. Other devices get written zeroes.
 *
 * The file I/O itself is a FileSpan over the whole file, shared with the
 * fixed VHD and flat VMDK targets.
 */
export class RawTarget extends FileSpanTarget {
  readonly diskUuid = undefined;

  private constructor(
    readonly spec: string,
    span: FileSpan,
    alignmentBytes: number,
    readOnly: boolean,
  ) {
    super(span, { sparse: alignmentBytes === 1, alignmentBytes, readOnly });
  }

  /**
   * The disk's open descriptor (disk byte i is file byte i), for native I/O
   * beside this target: the source tap's native data path duplicates it.
   * BR_TARGET_CLOSED after close.
   */
  get fileDescriptor(): number {
    checkOpen(this.closed, this.spec);
    return this.span.fd;
  }

  /** Builds the target for an open regular file, probing hole punching when it is writable. */
  private static async forFile(spec: string, path: string, handle: fsp.FileHandle, sizeBytes: number, readOnly: boolean, ops: FileExtentOps, pageCache: PageCachePolicy | undefined): Promise<RawTarget> {
    const punchHoles = !readOnly && (await FileSpan.probePunching(handle, sizeBytes, ops));
    return new RawTarget(spec, new FileSpan({ path, handle, fileOffsetBytes: 0, sizeBytes, regularFile: true, punchHoles, ownsFileTail: true, ops, pageCache }), SECTOR_BYTES_IF_DEVICE.file, readOnly);
  }

  /** Builds the target for an open block device; it punches only where sysfs says the device can zero without writing. */
  private static forBlockDevice(spec: string, path: string, handle: fsp.FileHandle, stat: fs.Stats, sizeBytes: number, readOnly: boolean, ops: FileExtentOps, pageCache: PageCachePolicy | undefined): RawTarget {
    const zeroing = blockDeviceZeroing(stat);
    const span = new FileSpan({ path, handle, fileOffsetBytes: 0, sizeBytes, regularFile: false, punchHoles: !readOnly && zeroing.canPunch, punchAlignBytes: zeroing.logicalBlockBytes, ownsFileTail: false, ops, pageCache });
    return new RawTarget(spec, span, SECTOR_BYTES_IF_DEVICE.device, readOnly);
  }

  /**
   * Opens `path`, or creates it with `options.create`. Creating refuses an
   * existing non-empty regular file (BR_TARGET_NAME_CONFLICT): a raw file
   * carries no identity, so anything already there is not provably ours. An
   * empty file or a block device at least as large is used as is.
   */
  static async open(path: string, options: RawOpenOptions = {}, spec = `raw:${path}`): Promise<RawTarget> {
    const ops = options.fileExtents ?? nativeFileExtents;
    const readOnly = options.readOnly === true;
    const create = options.create;
    const stat = await statForOpen(path, spec, create !== undefined, readOnly);
    if (create !== undefined) {
      if (!Number.isSafeInteger(create.sizeBytes) || create.sizeBytes <= 0) {
        throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `cannot create ${spec} with size ${create.sizeBytes}`, { details: { spec, sizeBytes: create.sizeBytes } });
      }
      if (stat?.isBlockDevice()) {
        const deviceBytes = blockDeviceSizeBytes(stat, path);
        if (deviceBytes < create.sizeBytes) {
          throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `block device ${path} holds ${deviceBytes} bytes, fewer than the ${create.sizeBytes} asked for`, { details: { spec, deviceBytes, sizeBytes: create.sizeBytes } });
        }
        const handle = await openForTarget(path, 'r+');
        return RawTarget.forBlockDevice(spec, path, handle, stat, create.sizeBytes, false, ops, options.pageCache);
      }
      if (stat !== undefined && !(stat.isFile() && stat.size === 0)) {
        throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${path} already exists and is not an empty file; refusing to create ${spec} over it`, { details: { spec, path } });
      }
      // 'wx' makes creation atomic against a racing creator; an empty file
      // that already exists is opened instead.
      const handle = await openForTarget(path, stat === undefined ? 'wx+' : 'r+');
      try {
        await handle.truncate(create.sizeBytes);
      } catch (err) {
        await handle.close();
        throw wrapError(err, 'BR_IO', `cannot size ${path} to ${create.sizeBytes} bytes`);
      }
      return RawTarget.forFile(spec, path, handle, create.sizeBytes, false, ops, options.pageCache);
    }
    if (stat === undefined) throw new BlockrelayError('BR_FILE_NOT_FOUND', `${path} does not exist`, { details: { spec, path } });
    if (!stat.isFile() && !stat.isBlockDevice()) {
      throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${path} is neither a regular file nor a block device`, { details: { spec, path } });
    }
    if (stat.isBlockDevice()) {
      const deviceBytes = blockDeviceSizeBytes(stat, path);
      const handle = await openForTarget(path, readOnly ? 'r' : 'r+');
      return RawTarget.forBlockDevice(spec, path, handle, stat, deviceBytes, readOnly, ops, options.pageCache);
    }
    const handle = await openForTarget(path, readOnly ? 'r' : 'r+');
    return RawTarget.forFile(spec, path, handle, stat.size, readOnly, ops, options.pageCache);
  }
}
