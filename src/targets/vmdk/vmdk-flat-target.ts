import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BlockrelayError, wrapError } from '../../retry/blockrelay-error';
import type { AllocationExtent, DiskTarget, DiskTargetCapabilities } from '../disk-target';
import type { DiskUuidClaim } from '../disk-uuid-registry';
import { checkOpen, checkRequest } from '../request-bounds';
import { bumpDescriptorFileCid } from './vmdk-content-id';
import { defaultDdb, fromVmwareUuid, NO_PARENT_CID, randomCid, renderDescriptor, type VmdkDescriptor } from './vmdk-descriptor';
import { corrupt, SECTOR_BYTES } from './vmdk-format';

/** Largest zero buffer written at once by writeZeroes. */
const ZERO_CHUNK_BYTES = 1024 * 1024;

interface FlatExtent {
  /** Disk byte offset where this extent starts. */
  readonly start: number;
  readonly length: number;
  readonly file: string;
  readonly handle: fsp.FileHandle;
  /** Byte offset of the extent's data in its file. */
  readonly fileOffset: number;
}

/** `disk.vmdk` → `disk-flat.vmdk`, the name VMware and qemu give the data file. */
export function flatExtentName(descriptorFile: string): string {
  const base = path.basename(descriptorFile).replace(/\.vmdk$/i, '');
  return `${base}-flat.vmdk`;
}

/**
 * A VMDK whose data is raw: a text descriptor listing FLAT (or ESX VMFS)
 * extents, e.g. monolithicFlat (`disk.vmdk` + `disk-flat.vmdk`) or
 * twoGbMaxExtentFlat. The extents are concatenated in descriptor order.
 * No metadata is written after creation, so there is no unclean state.
 */
export class VmdkFlatTarget implements DiskTarget {
  readonly capabilities: DiskTargetCapabilities;
  readonly diskUuid: string | undefined;
  readonly sizeBytes: number;
  private closed = false;
  /** The first change of content in a session gives the descriptor a new CID (see vmdk-content-id.ts). */
  private cidBump: Promise<void> | undefined;

  private constructor(
    readonly spec: string,
    private readonly descriptorFile: string,
    private readonly extentList: readonly FlatExtent[],
    readonly descriptor: VmdkDescriptor,
    readOnly: boolean,
    private readonly claim: DiskUuidClaim | undefined,
  ) {
    this.sizeBytes = extentList.reduce((n, e) => n + e.length, 0);
    this.capabilities = { sparse: true, discard: false, alignmentBytes: SECTOR_BYTES, readOnly };
    this.diskUuid = fromVmwareUuid(descriptor.ddb.get('ddb.uuid'));
  }

  /** Writes `disk-flat.vmdk` (sparse, all zeroes) and then the descriptor `file`; neither may exist. */
  static async createImage(file: string, sizeBytes: number, diskUuid: string): Promise<void> {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SECTOR_BYTES !== 0) {
      throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `a flat VMDK must be a positive multiple of 512 bytes, not ${sizeBytes}`, { details: { file, sizeBytes } });
    }
    const capacitySectors = sizeBytes / SECTOR_BYTES;
    const dataName = flatExtentName(file);
    const dataFile = path.join(path.dirname(file), dataName);
    const text = renderDescriptor({
      version: 1,
      cid: randomCid(),
      parentCid: NO_PARENT_CID,
      createType: 'monolithicFlat',
      parentFileNameHint: undefined,
      extents: [{ access: 'RW', sectors: capacitySectors, type: 'FLAT', fileName: dataName, offsetSectors: 0 }],
      ddb: defaultDdb(capacitySectors, diskUuid),
    });
    const made: string[] = [];
    try {
      for (const [name, fill] of [[dataFile, async (h: fsp.FileHandle) => h.truncate(sizeBytes)], [file, async (h: fsp.FileHandle) => { await h.writeFile(text); }]] as const) {
        const handle = await fsp.open(name, 'wx');
        made.push(name);
        try {
          await fill(handle);
          await handle.datasync();
        } finally {
          await handle.close();
        }
      }
    } catch (err) {
      for (const name of made) await fsp.rm(name, { force: true });
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `cannot create ${file}: ${(err as Error).message}`, { cause: err, details: { file } });
      }
      throw wrapError(err, 'BR_IO', `cannot create ${file}`);
    }
  }

  /** Opens the extents a parsed descriptor lists; refuses kinds of extent this target cannot serve. */
  static async open(file: string, descriptor: VmdkDescriptor, spec: string, readOnly: boolean, claim?: DiskUuidClaim): Promise<VmdkFlatTarget> {
    const opened: FlatExtent[] = [];
    try {
      let start = 0;
      for (const e of descriptor.extents) {
        if (e.type !== 'FLAT' && e.type !== 'VMFS') {
          throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${file}: ${e.type} extents are not supported in a flat VMDK`, { details: { file } });
        }
        if (e.access !== 'RW' && !readOnly) {
          throw new BlockrelayError('BR_TARGET_READ_ONLY', `${file}: extent ${e.fileName} is ${e.access}; open it read-only`, { details: { file } });
        }
        const dataFile = path.resolve(path.dirname(file), e.fileName!);
        let handle: fsp.FileHandle;
        try {
          handle = await fsp.open(dataFile, readOnly ? 'r' : 'r+');
        } catch (err) {
          throw wrapError(err, 'BR_IO', `${file}: cannot open extent ${dataFile}`);
        }
        const length = e.sectors * SECTOR_BYTES;
        const fileOffset = e.offsetSectors * SECTOR_BYTES;
        opened.push({ start, length, file: dataFile, handle, fileOffset });
        const size = (await handle.stat()).size;
        if (size < fileOffset + length) throw corrupt(dataFile, size, `flat extent is truncated: ${size} bytes, descriptor needs ${fileOffset + length}`);
        start += length;
      }
      if (start === 0) throw corrupt(file, 0, 'descriptor describes an empty disk');
      return new VmdkFlatTarget(spec, file, opened, descriptor, readOnly, claim);
    } catch (err) {
      for (const e of opened) await e.handle.close();
      throw err;
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'read', offset, length);
    const out = Buffer.alloc(length);
    for (const p of this.pieces(offset, length)) {
      let done = 0;
      while (done < p.length) {
        const { bytesRead } = await this.io(p.extent, () => p.extent.handle.read(out, p.at - offset + done, p.length - done, p.position + done), 'read');
        if (bytesRead === 0) throw corrupt(p.extent.file, p.position + done, 'flat extent ends early');
        done += bytesRead;
      }
    }
    return out;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'write', offset, data.length);
    await this.bumpCid();
    for (const p of this.pieces(offset, data.length)) {
      let done = 0;
      while (done < p.length) {
        const { bytesWritten } = await this.io(p.extent, () => p.extent.handle.write(data, p.at - offset + done, p.length - done, p.position + done), 'write');
        done += bytesWritten;
      }
    }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'writeZeroes', offset, length);
    const zeroes = Buffer.alloc(Math.min(length, ZERO_CHUNK_BYTES));
    for (let at = offset; at < offset + length; at += zeroes.length) {
      const n = Math.min(zeroes.length, offset + length - at);
      await this.write(at, zeroes.subarray(0, n));
    }
  }

  /** Raw data cannot give blocks back without fallocate; the range is zeroed instead. */
  async discard(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'discard', offset, length);
    await this.writeZeroes(offset, length);
  }

  async flush(): Promise<void> {
    checkOpen(this.closed, this.spec);
    if (this.capabilities.readOnly) return;
    for (const e of this.extentList) await this.io(e, () => e.handle.datasync(), 'flush');
  }

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'extents', offset, length);
    if (length > 0) yield { offset, length, zero: false };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.capabilities.readOnly) for (const e of this.extentList) await this.io(e, () => e.handle.datasync(), 'flush');
    } finally {
      this.claim?.release();
      for (const e of this.extentList) await e.handle.close();
    }
  }

  /** Once per session; a failed attempt is retried by the next write. */
  private bumpCid(): Promise<void> {
    this.cidBump ??= bumpDescriptorFileCid(this.descriptorFile, this.descriptor.cid).catch((err: unknown) => {
      this.cidBump = undefined;
      throw err;
    });
    return this.cidBump;
  }

  private *pieces(offset: number, length: number): Generator<{ extent: FlatExtent; at: number; position: number; length: number }> {
    const end = offset + length;
    for (const e of this.extentList) {
      const from = Math.max(offset, e.start);
      const to = Math.min(end, e.start + e.length);
      if (from < to) yield { extent: e, at: from, position: e.fileOffset + (from - e.start), length: to - from };
    }
  }

  private async io<T>(extent: FlatExtent, op: () => Promise<T>, what: string): Promise<T> {
    try {
      return await op();
    } catch (err) {
      throw wrapError(err, 'BR_IO', `${what} on ${extent.file} failed`);
    }
  }
}
