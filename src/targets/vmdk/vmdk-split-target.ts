import * as path from 'node:path';
import { BlockrelayError } from '../../retry/blockrelay-error';
import type { AllocationExtent, DiskTarget, DiskTargetCapabilities, PageCachePolicy } from '../disk-target';
import type { DiskUuidClaim } from '../disk-uuid-registry';
import { checkOpen, checkRequest } from '../request-bounds';
import { DescriptorCidBump } from './vmdk-content-id';
import { fromVmwareUuid, type VmdkDescriptor } from './vmdk-descriptor';
import { VmdkExtentMap, type PlacedExtent } from './vmdk-extent-map';
import { corrupt, SECTOR_BYTES } from './vmdk-format';
import { VmdkSparseTarget } from './vmdk-sparse-target';

interface SplitExtent extends PlacedExtent {
  readonly target: VmdkSparseTarget;
}

/**
 * A VMDK whose descriptor lists several hosted sparse extents, e.g. VMware
 * Workstation's default twoGbMaxExtentSparse ("split into 2 GB files"):
 * `disk.vmdk` + `disk-s001.vmdk`, `disk-s002.vmdk`, ... Each extent is a
 * sparse extent of its own (see VmdkSparseTarget, which also handles its
 * unclean flag and crash order); this target routes requests by range.
 * blockrelay opens these but never creates them.
 */
export class VmdkSplitTarget implements DiskTarget {
  readonly capabilities: DiskTargetCapabilities;
  readonly diskUuid: string | undefined;
  readonly sizeBytes: number;
  private closed = false;
  private readonly map: VmdkExtentMap<SplitExtent>;
  /** The first change of content in a session gives the descriptor a new CID (see vmdk-content-id.ts). */
  private readonly cid: DescriptorCidBump;

  private constructor(
    readonly spec: string,
    descriptorFile: string,
    parts: readonly SplitExtent[],
    readonly descriptor: VmdkDescriptor,
    readOnly: boolean,
    private readonly claim: DiskUuidClaim | undefined,
  ) {
    this.map = new VmdkExtentMap(parts);
    this.cid = new DescriptorCidBump(descriptorFile, descriptor.cid);
    this.sizeBytes = this.map.sizeBytes;
    this.capabilities = { sparse: true, discard: false, alignmentBytes: SECTOR_BYTES, readOnly };
    this.diskUuid = fromVmwareUuid(descriptor.ddb.get('ddb.uuid'));
  }

  /** Opens every SPARSE extent the descriptor lists; each must hold at least the sectors the descriptor gives it. */
  static async open(file: string, descriptor: VmdkDescriptor, spec: string, readOnly: boolean, claim?: DiskUuidClaim, pageCache: PageCachePolicy = 'keep'): Promise<VmdkSplitTarget> {
    const parts: SplitExtent[] = [];
    try {
      let start = 0;
      for (const e of descriptor.extents) {
        if (e.type !== 'SPARSE') throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${file}: ${e.type} extents cannot be mixed with SPARSE ones`, { details: { file } });
        if (e.access !== 'RW' && !readOnly) throw new BlockrelayError('BR_TARGET_READ_ONLY', `${file}: extent ${e.fileName} is ${e.access}; open it read-only`, { details: { file } });
        const extentFile = path.resolve(path.dirname(file), e.fileName!);
        const target = await VmdkSparseTarget.open(extentFile, `${spec} (extent ${e.fileName})`, readOnly, undefined, pageCache);
        const length = e.sectors * SECTOR_BYTES;
        parts.push({ start, length, target });
        if (target.sizeBytes < length) throw corrupt(extentFile, 12, `extent capacity ${target.sizeBytes} bytes is less than the ${length} bytes the descriptor gives it`);
        start += length;
      }
      return new VmdkSplitTarget(spec, file, parts, descriptor, readOnly, claim);
    } catch (err) {
      for (const p of parts) await p.target.close().catch(() => undefined);
      throw err;
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'read', offset, length);
    const out = Buffer.alloc(length);
    for (const p of this.map.pieces(offset, length)) (await p.extent.target.read(p.inExtent, p.length)).copy(out, p.at - offset);
    return out;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'write', offset, data.length);
    await this.cid.ensure();
    for (const p of this.map.pieces(offset, data.length)) await p.extent.target.write(p.inExtent, data.subarray(p.at - offset, p.at - offset + p.length));
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'writeZeroes', offset, length);
    await this.cid.ensure();
    for (const p of this.map.pieces(offset, length)) await p.extent.target.writeZeroes(p.inExtent, p.length);
  }

  async discard(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'discard', offset, length);
    await this.cid.ensure();
    for (const p of this.map.pieces(offset, length)) await p.extent.target.discard(p.inExtent, p.length);
  }

  async flush(): Promise<void> {
    checkOpen(this.closed, this.spec);
    for (const p of this.map.extents) await p.target.flush();
  }

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'extents', offset, length);
    let pending: { offset: number; length: number; zero: boolean } | undefined;
    for (const p of this.map.pieces(offset, length)) {
      for await (const e of p.extent.target.extents(p.inExtent, p.length)) {
        const shifted = { offset: e.offset - p.inExtent + p.at, length: e.length, zero: e.zero };
        if (pending !== undefined && pending.zero === shifted.zero) {
          pending.length += shifted.length;
          continue;
        }
        if (pending !== undefined) yield pending;
        pending = shifted;
      }
    }
    if (pending !== undefined) yield pending;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    let first: unknown;
    for (const p of this.map.extents) {
      try {
        await p.target.close();
      } catch (err) {
        first ??= err;
      }
    }
    this.claim?.release();
    if (first !== undefined) throw first;
  }
}
