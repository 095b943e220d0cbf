import type * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import type { AllocationExtent, DiskTarget, DiskTargetCapabilities } from './disk-target';
import type { FileSpan } from './file-span';
import { checkOpen, checkRequest } from './request-bounds';

/**
 * The first step of opening a file-backed target: refuses creating
 * read-only, then stats `path`, which may be missing (undefined) when the
 * caller is about to create it.
 */
export async function statForOpen(path: string, spec: string, creating: boolean, readOnly: boolean): Promise<fs.Stats | undefined> {
  if (creating && readOnly) throw new BlockrelayError('BR_USAGE', `cannot create ${spec} read-only`);
  try {
    return await fsp.stat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw wrapError(err, 'BR_IO', `cannot stat ${path}`);
    return undefined;
  }
}

/**
 * Opens a file-backed target's file; `wx` flags (create) refuse a name that
 * appeared since statForOpen found none.
 */
export async function openForTarget(path: string, flags: string): Promise<fsp.FileHandle> {
  try {
    return await fsp.open(path, flags);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${path} appeared while creating it`, { cause: err, details: { path } });
    }
    throw wrapError(err, 'BR_IO', `cannot open ${path}`);
  }
}

/**
 * A DiskTarget whose bytes are one FileSpan: a raw file or block device, or
 * a fixed VHD's data before its footer. Every request is checked (bounds,
 * alignment, read-only, closed) and then carried out by the span; the
 * subclasses only open the file and say what surrounds the span.
 */
export abstract class FileSpanTarget implements DiskTarget {
  abstract readonly spec: string;
  abstract readonly diskUuid: string | undefined;
  protected closed = false;
  private caps: DiskTargetCapabilities;

  protected constructor(
    protected readonly span: FileSpan,
    capabilities: Omit<DiskTargetCapabilities, 'discard'>,
  ) {
    this.caps = { ...capabilities, discard: span.punchesHoles };
  }

  /** What this open target can do; `discard` turns false if the filesystem refuses a punch later. */
  get capabilities(): DiskTargetCapabilities {
    if (this.caps.discard !== this.span.punchesHoles) this.caps = { ...this.caps, discard: this.span.punchesHoles };
    return this.caps;
  }

  get sizeBytes(): number {
    return this.span.sizeBytes;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'read', offset, length);
    // Every byte is either read or zero-filled, so the buffer need not be
    // cleared first (a measurable cost when a copy reads a whole disk).
    const out = Buffer.allocUnsafe(length);
    await this.span.readInto(out, 0, offset, length);
    return out;
  }

  /** Reads and hashes natively on the thread pool (see DiskTarget.hashBlocks); a file shortened behind our back reads as zeroes, as in read(). */
  async hashBlocks(offset: number, length: number, blockSizeBytes: number, into?: Buffer): Promise<Buffer> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'read', offset, length);
    return this.span.hashBlocks(offset, length, blockSizeBytes, into);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'write', offset, data.length);
    await this.span.write(data, 0, offset, data.length);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'writeZeroes', offset, length);
    await this.span.zero(offset, length);
  }

  /** Same as writeZeroes: on a file that can punch holes both free the space. */
  async discard(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'discard', offset, length);
    await this.span.zero(offset, length);
  }

  async flush(): Promise<void> {
    checkOpen(this.closed, this.spec);
    if (this.caps.readOnly) return;
    await this.span.datasync();
  }

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'extents', offset, length);
    for await (const e of this.span.extents(offset, length)) {
      // A walk resumed after close() stops, even where its next run is already known.
      checkOpen(this.closed, this.spec);
      yield e;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.caps.readOnly) await this.span.datasync();
    } finally {
      this.closed = true;
      this.releaseOnClose();
      await this.span.close();
    }
  }

  /** Called once by close() after the last flush, before the descriptor goes (a VHD lets its disk id go). */
  protected releaseOnClose(): void {}
}
