import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { BlockrelayError, wrapError } from '../../retry/blockrelay-error';
import type { AllocationExtent, DiskTarget, DiskTargetCapabilities, OpenOptions } from '../disk-target';
import { checkOpen, checkRequest } from '../request-bounds';

/** Largest zero buffer a raw writeZeroes writes at once: bounds memory for huge ranges. */
const ZERO_CHUNK_BYTES = 1024 * 1024;
const SECTOR_BYTES = 512;

/** Size of a block device from sysfs: Node has no lseek(SEEK_END) and stat reports 0 for devices. */
function blockDeviceSizeBytes(stat: fs.Stats, path: string): number {
  const rdev = stat.rdev;
  const major = Math.floor(rdev / 256) % 4096;
  const minor = (rdev % 256) + Math.floor(rdev / 1048576) * 256;
  const sysfs = `/sys/dev/block/${major}:${minor}/size`;
  try {
    return Number(fs.readFileSync(sysfs, 'utf8').trim()) * SECTOR_BYTES;
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot read the size of block device ${path} from ${sysfs}`);
  }
}

/**
 * A raw image file or block device: byte i of the disk is byte i of the file.
 *
 * Node has no fallocate or lseek(SEEK_DATA), so this target is honest about
 * what it can do: a file it creates is sparse (ftruncate leaves holes), but
 * writeZeroes writes zeroes except at the tail of a file (where a truncate
 * down and up releases the blocks), discard is the same as writeZeroes, and
 * extents() reports one data extent. Copies still keep holes because the copy
 * engine skips all-zero buffers.
 */
export class RawTarget implements DiskTarget {
  readonly diskUuid = undefined;
  readonly capabilities: DiskTargetCapabilities;
  private closed = false;

  private constructor(
    readonly spec: string,
    private readonly path: string,
    private readonly handle: fsp.FileHandle,
    readonly sizeBytes: number,
    private readonly regularFile: boolean,
    readOnly: boolean,
  ) {
    this.capabilities = { sparse: regularFile, discard: false, alignmentBytes: regularFile ? 1 : SECTOR_BYTES, readOnly };
  }

  /**
   * Opens `path`, or creates it with `options.create`. Creating refuses an
   * existing non-empty regular file (BR_TARGET_NAME_CONFLICT): a raw file
   * carries no identity, so anything already there is not provably ours. An
   * empty file or a block device at least as large is used as is.
   */
  static async open(path: string, options: OpenOptions = {}, spec = `raw:${path}`): Promise<RawTarget> {
    const readOnly = options.readOnly === true;
    const create = options.create;
    if (create !== undefined && readOnly) throw new BlockrelayError('BR_USAGE', `cannot create ${spec} read-only`);
    let stat: fs.Stats | undefined;
    try {
      stat = await fsp.stat(path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw wrapError(err, 'BR_IO', `cannot stat ${path}`);
    }
    if (create !== undefined) {
      if (!Number.isSafeInteger(create.sizeBytes) || create.sizeBytes <= 0) {
        throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `cannot create ${spec} with size ${create.sizeBytes}`, { details: { spec, sizeBytes: create.sizeBytes } });
      }
      if (stat?.isBlockDevice()) {
        const deviceBytes = blockDeviceSizeBytes(stat, path);
        if (deviceBytes < create.sizeBytes) {
          throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `block device ${path} holds ${deviceBytes} bytes, fewer than the ${create.sizeBytes} asked for`, { details: { spec, deviceBytes, sizeBytes: create.sizeBytes } });
        }
        const handle = await openHandle(path, 'r+');
        return new RawTarget(spec, path, handle, create.sizeBytes, false, false);
      }
      if (stat !== undefined && !(stat.isFile() && stat.size === 0)) {
        throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${path} already exists and is not an empty file; refusing to create ${spec} over it`, { details: { spec, path } });
      }
      // 'wx' makes creation atomic against a racing creator; an empty file
      // that already exists is opened instead.
      const handle = await openHandle(path, stat === undefined ? 'wx+' : 'r+');
      try {
        await handle.truncate(create.sizeBytes);
      } catch (err) {
        await handle.close();
        throw wrapError(err, 'BR_IO', `cannot size ${path} to ${create.sizeBytes} bytes`);
      }
      return new RawTarget(spec, path, handle, create.sizeBytes, true, false);
    }
    if (stat === undefined) throw new BlockrelayError('BR_FILE_NOT_FOUND', `${path} does not exist`, { details: { spec, path } });
    if (!stat.isFile() && !stat.isBlockDevice()) {
      throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${path} is neither a regular file nor a block device`, { details: { spec, path } });
    }
    const handle = await openHandle(path, readOnly ? 'r' : 'r+');
    const sizeBytes = stat.isBlockDevice() ? blockDeviceSizeBytes(stat, path) : stat.size;
    return new RawTarget(spec, path, handle, sizeBytes, stat.isFile(), readOnly);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'read', offset, length);
    // Every byte is either read or zero-filled below, so the buffer need not
    // be cleared first (a measurable cost when a copy reads a whole disk).
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.io(() => this.handle.read(out, done, length - done, offset + done), 'read');
      // A file shortened behind our back reads as zeroes past its end.
      if (bytesRead === 0) {
        out.fill(0, done);
        break;
      }
      done += bytesRead;
    }
    return out;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'write', offset, data.length);
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.io(() => this.handle.write(data, done, data.length - done, offset + done), 'write');
      done += bytesWritten;
    }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'writeZeroes', offset, length);
    if (length === 0) return;
    if (this.regularFile && offset + length === this.sizeBytes) {
      // The tail of a file can be released without fallocate: cut the file
      // at `offset` and grow it back; the regrown part is a hole.
      await this.io(() => this.handle.truncate(offset), 'truncate');
      await this.io(() => this.handle.truncate(this.sizeBytes), 'truncate');
      return;
    }
    const zeroes = Buffer.alloc(Math.min(length, ZERO_CHUNK_BYTES));
    for (let at = offset; at < offset + length; at += zeroes.length) {
      const n = Math.min(zeroes.length, offset + length - at);
      await this.write(at, n === zeroes.length ? zeroes : zeroes.subarray(0, n));
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'discard', offset, length);
    await this.writeZeroes(offset, length);
  }

  async flush(): Promise<void> {
    checkOpen(this.closed, this.spec);
    if (this.capabilities.readOnly) return;
    await this.io(() => this.handle.datasync(), 'flush');
  }

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'extents', offset, length);
    if (length > 0) yield { offset, length, zero: false };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.capabilities.readOnly) await this.io(() => this.handle.datasync(), 'flush');
    } finally {
      this.closed = true;
      await this.handle.close();
    }
  }

  private async io<T>(op: () => Promise<T>, what: string): Promise<T> {
    try {
      return await op();
    } catch (err) {
      throw wrapError(err, 'BR_IO', `${what} on ${this.path} failed`);
    }
  }
}

async function openHandle(path: string, flags: string): Promise<fsp.FileHandle> {
  try {
    return await fsp.open(path, flags);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${path} appeared while creating it`, { cause: err, details: { path } });
    }
    throw wrapError(err, 'BR_IO', `cannot open ${path}`);
  }
}
