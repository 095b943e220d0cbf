import type * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { nativeFileExtents } from '../../platform/file-extents';
import { BlockrelayError, wrapError } from '../../retry/blockrelay-error';
import { xxh64 } from '../../tracking/dirty-map';
import type { AllocationExtent, DiskTarget, DiskTargetCapabilities, PageCachePolicy } from '../disk-target';
import type { DiskUuidClaim } from '../disk-uuid-registry';
import { FileSpan } from '../file-span';
import { checkOpen, checkRequest } from '../request-bounds';
import { DescriptorCidBump } from './vmdk-content-id';
import { defaultDdb, fromVmwareUuid, NO_PARENT_CID, randomCid, renderDescriptor, type VmdkDescriptor } from './vmdk-descriptor';
import { VmdkExtentMap, type PlacedExtent } from './vmdk-extent-map';
import { corrupt, SECTOR_BYTES } from './vmdk-format';

interface FlatExtent extends PlacedExtent {
  /** The extent's bytes in its file. */
  readonly span: FileSpan;
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
 *
 * Each extent is a FileSpan, as a raw disk is: data files are created
 * sparse, `extents()` reports their holes, and `writeZeroes` and `discard`
 * punch holes where the filesystem can.
 */
export class VmdkFlatTarget implements DiskTarget {
  private caps: DiskTargetCapabilities;
  readonly diskUuid: string | undefined;
  readonly sizeBytes: number;
  private closed = false;
  private readonly map: VmdkExtentMap<FlatExtent>;
  /** The first change of content in a session gives the descriptor a new CID (see vmdk-content-id.ts). */
  private readonly cid: DescriptorCidBump;

  private constructor(
    readonly spec: string,
    descriptorFile: string,
    extents: readonly FlatExtent[],
    readonly descriptor: VmdkDescriptor,
    readOnly: boolean,
    private readonly claim: DiskUuidClaim | undefined,
  ) {
    this.map = new VmdkExtentMap(extents);
    this.cid = new DescriptorCidBump(descriptorFile, descriptor.cid);
    this.sizeBytes = this.map.sizeBytes;
    this.caps = { sparse: true, discard: this.punchesHoles(), alignmentBytes: SECTOR_BYTES, readOnly };
    this.diskUuid = fromVmwareUuid(descriptor.ddb.get('ddb.uuid'));
  }

  /** What this open target can do; `discard` is true while every extent can punch holes. */
  get capabilities(): DiskTargetCapabilities {
    const discard = this.punchesHoles();
    if (this.caps.discard !== discard) this.caps = { ...this.caps, discard };
    return this.caps;
  }

  private punchesHoles(): boolean {
    return this.map.extents.every((e) => e.span.punchesHoles);
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
  static async open(file: string, descriptor: VmdkDescriptor, spec: string, readOnly: boolean, claim?: DiskUuidClaim, pageCache: PageCachePolicy = 'keep'): Promise<VmdkFlatTarget> {
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
        let stat: fs.Stats;
        try {
          stat = await handle.stat();
        } catch (err) {
          await handle.close();
          throw wrapError(err, 'BR_IO', `${file}: cannot stat extent ${dataFile}`);
        }
        const regularFile = stat.isFile();
        const punchHoles = !readOnly && regularFile && (await FileSpan.probePunching(handle, stat.size, nativeFileExtents));
        const span = new FileSpan({
          path: dataFile,
          handle,
          fileOffsetBytes: fileOffset,
          sizeBytes: length,
          regularFile,
          punchHoles,
          punchAlignBytes: SECTOR_BYTES,
          // Another extent may follow in the same file: never cut a file's tail.
          ownsFileTail: false,
          ops: nativeFileExtents,
          shortReadError: (at) => corrupt(dataFile, at, 'flat extent ends early'),
          pageCache,
        });
        opened.push({ start, length, span });
        if (regularFile && stat.size < fileOffset + length) throw corrupt(dataFile, stat.size, `flat extent is truncated: ${stat.size} bytes, descriptor needs ${fileOffset + length}`);
        start += length;
      }
      if (start === 0) throw corrupt(file, 0, 'descriptor describes an empty disk');
      return new VmdkFlatTarget(spec, file, opened, descriptor, readOnly, claim);
    } catch (err) {
      for (const e of opened) await e.span.close();
      throw err;
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'read', offset, length);
    const out = Buffer.allocUnsafe(length);
    for (const p of this.map.pieces(offset, length)) await p.extent.span.readInto(out, p.at - offset, p.inExtent, p.length);
    return out;
  }

  /**
   * Reads and hashes natively on the thread pool (see DiskTarget.hashBlocks).
   * A block straddling two extents is read and hashed whole here instead.
   */
  async hashBlocks(offset: number, length: number, blockSizeBytes: number, into?: Buffer): Promise<Buffer> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'read', offset, length);
    if (into !== undefined && into.length < length) throw new RangeError(`hashBlocks: into holds ${into.length} bytes, ${length} needed`);
    const parts: Buffer[] = [];
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const p = this.map.pieces(at, end - at).next().value!;
      // Whole blocks that lie in this extent go to the span; a block crossing into the next extent is read whole.
      const whole = p.length === end - at ? p.length : Math.floor(p.length / blockSizeBytes) * blockSizeBytes;
      if (whole > 0) {
        parts.push(await p.extent.span.hashBlocks(p.inExtent, whole, blockSizeBytes, into?.subarray(at - offset, at - offset + whole)));
        at += whole;
        continue;
      }
      const n = Math.min(blockSizeBytes, end - at);
      const block = await this.read(at, n);
      if (into !== undefined) block.copy(into, at - offset);
      const hash = Buffer.alloc(8);
      hash.writeBigUInt64LE(xxh64(block));
      parts.push(hash);
      at += n;
    }
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'write', offset, data.length);
    await this.cid.ensure();
    for (const p of this.map.pieces(offset, data.length)) await p.extent.span.write(data, p.at - offset, p.inExtent, p.length);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'writeZeroes', offset, length);
    if (length === 0) return;
    await this.cid.ensure();
    for (const p of this.map.pieces(offset, length)) await p.extent.span.zero(p.inExtent, p.length);
  }

  /** Same as writeZeroes: where the data files can punch holes both free the space. */
  async discard(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'discard', offset, length);
    await this.writeZeroes(offset, length);
  }

  async flush(): Promise<void> {
    checkOpen(this.closed, this.spec);
    if (this.caps.readOnly) return;
    for (const e of this.map.extents) await e.span.datasync();
  }

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'extents', offset, length);
    for (const p of this.map.pieces(offset, length)) {
      for await (const e of p.extent.span.extents(p.inExtent, p.length)) {
        checkOpen(this.closed, this.spec);
        yield { offset: p.extent.start + e.offset, length: e.length, zero: e.zero };
      }
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.caps.readOnly) for (const e of this.map.extents) await e.span.datasync();
    } finally {
      this.claim?.release();
      for (const e of this.map.extents) await e.span.close();
    }
  }
}
