import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import type { Logger } from '../../daemon/logger';
import type { Clock } from '../../platform/clock';
import { systemClock } from '../../platform/clock';
import { nativeFileExtents } from '../../platform/file-extents';
import { BlockrelayError, wrapError } from '../../retry/blockrelay-error';
import type { OpenOptions, PageCachePolicy } from '../disk-target';
import { claimDiskUuid, type DiskUuidClaim } from '../disk-uuid-registry';
import { FileSpan } from '../file-span';
import { FileSpanTarget, openForTarget, statForOpen } from '../file-span-target';
import {
  VHD_FOOTER_SIZE_BYTES,
  VHD_SECTOR_SIZE_BYTES,
  checkFixedVhdFooter,
  decodeVhdFooter,
  encodeVhdFooter,
  isUuid,
  newFixedVhdFooter,
  type VhdFooter,
} from './vhd-footer';

export interface VhdOpenOptions extends OpenOptions {
  /** Source of the footer timestamp on create; the system clock by default. */
  readonly clock?: Clock;
  /** Where to warn about a created size Azure cannot attach (not a whole MiB). */
  readonly logger?: Pick<Logger, 'warn'>;
}

/** Azure attaches a VHD only if its virtual size is a whole number of MiB. */
const AZURE_DISK_SIZE_MULTIPLE_BYTES = 1024 * 1024;

/**
 * Reads and validates the footer at the end of an open VHD file of
 * `fileSizeBytes`. Every failure is coded and names the byte offset.
 */
async function readFixedFooter(handle: fsp.FileHandle, fileSizeBytes: number, path: string): Promise<VhdFooter> {
  if (fileSizeBytes < VHD_FOOTER_SIZE_BYTES) {
    throw new BlockrelayError('BR_VHD_FOOTER_CORRUPT', `${path}: file is ${fileSizeBytes} bytes, too short for the 512-byte VHD footer at byte offset 0`, {
      details: { offset: 0, where: path, fileSizeBytes },
    });
  }
  const footerOffset = fileSizeBytes - VHD_FOOTER_SIZE_BYTES;
  const buf = Buffer.alloc(VHD_FOOTER_SIZE_BYTES);
  try {
    await handle.read(buf, 0, VHD_FOOTER_SIZE_BYTES, footerOffset);
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot read the VHD footer of ${path}`);
  }
  const footer = decodeVhdFooter(buf, footerOffset, path);
  checkFixedVhdFooter(footer, fileSizeBytes, path);
  return footer;
}

/**
 * A fixed VHD file: the disk's bytes, then a 512-byte footer
 * (`docs/formats/vhd.md`). Disk byte i is file byte i, so I/O goes straight
 * to the file; the footer is written once at create and never rewritten, so
 * no write can damage it. Requests are 512-byte aligned (the VHD sector).
 *
 * The data is a FileSpan over the file's first `currentSize` bytes, as the
 * raw target's: the file is created sparse (ftruncate), `extents()` reports
 * its holes, and `writeZeroes` and `discard` punch holes where the
 * filesystem can (the footer lies past the span, so nothing ever cuts the
 * file's tail).
 */
export class VhdTarget extends FileSpanTarget {
  private constructor(
    readonly spec: string,
    span: FileSpan,
    private readonly footer: VhdFooter,
    private readonly uuidClaim: DiskUuidClaim,
    readOnly: boolean,
  ) {
    super(span, { sparse: true, alignmentBytes: VHD_SECTOR_SIZE_BYTES, readOnly });
  }

  /** Wraps an open, validated file: its data span, hole punching probed when writable. */
  private static async assemble(spec: string, path: string, handle: fsp.FileHandle, footer: VhdFooter, uuidClaim: DiskUuidClaim, readOnly: boolean, pageCache: PageCachePolicy | undefined): Promise<VhdTarget> {
    const sizeBytes = footer.currentSizeBytes;
    const ops = nativeFileExtents;
    const punchHoles = !readOnly && (await FileSpan.probePunching(handle, sizeBytes + VHD_FOOTER_SIZE_BYTES, ops));
    const span = new FileSpan({ path, handle, fileOffsetBytes: 0, sizeBytes, regularFile: true, punchHoles, punchAlignBytes: VHD_SECTOR_SIZE_BYTES, ownsFileTail: false, ops, pageCache });
    return new VhdTarget(spec, span, footer, uuidClaim, readOnly);
  }

  get diskUuid(): string {
    return this.footer.uniqueId;
  }

  /**
   * Opens the fixed VHD at `path`, or creates it with `options.create`.
   *
   * Opening validates the footer whole (cookie, checksum, version, fixed
   * type, current size = file size - 512) before anything else touches the
   * file. Creating refuses a size that is not a positive multiple of 512
   * (BR_TARGET_SIZE_MISMATCH) and anything already at `path` except an empty
   * file or a fixed VHD with the same unique id and size, which is ours and is
   * opened (BR_TARGET_NAME_CONFLICT otherwise).
   */
  static async open(path: string, options: VhdOpenOptions = {}, spec = `vhd:${path}`): Promise<VhdTarget> {
    const readOnly = options.readOnly === true;
    const create = options.create;
    const stat = await statForOpen(path, spec, create !== undefined, readOnly);
    if (create !== undefined) {
      const { sizeBytes, diskUuid } = create;
      if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % VHD_SECTOR_SIZE_BYTES !== 0) {
        throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `cannot create ${spec} with size ${sizeBytes}: a VHD size is a positive multiple of 512 bytes`, {
          details: { spec, sizeBytes },
        });
      }
      // Fixed VHDs are what Azure uploads take; a replica keeps its source's
      // size, so an odd size is worth a warning, not a refusal.
      if (sizeBytes % AZURE_DISK_SIZE_MULTIPLE_BYTES !== 0) {
        options.logger?.warn({ spec, sizeBytes }, 'VHD size is not a whole MiB; Azure will not accept it as a disk without resizing');
      }
      if (diskUuid !== undefined && !isUuid(diskUuid)) {
        throw new BlockrelayError('BR_USAGE', `disk uuid ${JSON.stringify(diskUuid)} for ${spec} is not a UUID`, { details: { spec } });
      }
      if (stat !== undefined && !(stat.isFile() && stat.size === 0)) {
        const existing = await VhdTarget.openExistingIfOurs(path, spec, stat, sizeBytes, diskUuid, options.pageCache);
        if (existing !== undefined) return existing;
        throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${path} already exists and is not this disk; refusing to create ${spec} over it`, {
          details: { spec, path },
        });
      }
      const footer = newFixedVhdFooter(sizeBytes, { uniqueId: diskUuid, nowMs: (options.clock ?? systemClock).now() });
      const uuidClaim = claimDiskUuid(footer.uniqueId, spec, true);
      let handle: fsp.FileHandle | undefined;
      try {
        handle = await openForTarget(path, stat === undefined ? 'wx+' : 'r+');
        // Size first, then the footer, then make both durable: a crash before
        // the footer lands leaves a file that opens as damaged, never as a
        // disk with a stale footer.
        await handle.truncate(sizeBytes + VHD_FOOTER_SIZE_BYTES);
        await writeAll(handle, encodeVhdFooter(footer), sizeBytes);
        await handle.sync();
      } catch (err) {
        uuidClaim.release();
        await handle?.close();
        // A file we made but could not finish would read as a damaged VHD;
        // take it away (an empty file that was there before stays).
        if (handle !== undefined && stat === undefined) await fsp.rm(path, { force: true }).catch(() => undefined);
        throw wrapError(err, 'BR_IO', `cannot create ${spec}`);
      }
      return VhdTarget.assemble(spec, path, handle, footer, uuidClaim, false, options.pageCache);
    }
    if (stat === undefined) throw new BlockrelayError('BR_FILE_NOT_FOUND', `${path} does not exist`, { details: { spec, path } });
    if (!stat.isFile()) throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${path} is not a regular file`, { details: { spec, path } });
    const handle = await openForTarget(path, readOnly ? 'r' : 'r+');
    try {
      const footer = await readFixedFooter(handle, stat.size, path);
      const uuidClaim = claimDiskUuid(footer.uniqueId, spec, !readOnly);
      return await VhdTarget.assemble(spec, path, handle, footer, uuidClaim, readOnly, options.pageCache);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** On create over an existing file: opens it if it is a valid fixed VHD with the asked unique id and size. */
  private static async openExistingIfOurs(
    path: string,
    spec: string,
    stat: fs.Stats,
    sizeBytes: number,
    diskUuid: string | undefined,
    pageCache: PageCachePolicy | undefined,
  ): Promise<VhdTarget | undefined> {
    if (diskUuid === undefined || !stat.isFile() || stat.size !== sizeBytes + VHD_FOOTER_SIZE_BYTES) return undefined;
    const handle = await openForTarget(path, 'r+');
    try {
      const footer = await readFixedFooter(handle, stat.size, path);
      if (footer.uniqueId.toLowerCase() !== diskUuid.toLowerCase()) {
        await handle.close();
        return undefined;
      }
      return await VhdTarget.assemble(spec, path, handle, footer, claimDiskUuid(footer.uniqueId, spec, true), false, pageCache);
    } catch (err) {
      await handle.close();
      if (err instanceof BlockrelayError && err.code.startsWith('BR_VHD_')) return undefined;
      throw err;
    }
  }

  protected override releaseOnClose(): void {
    this.uuidClaim.release();
  }
}

async function writeAll(handle: fsp.FileHandle, data: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await handle.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}
