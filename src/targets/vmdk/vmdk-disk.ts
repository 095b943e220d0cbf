import { randomUUID } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BlockrelayError, wrapError } from '../../retry/blockrelay-error';
import type { DiskTarget, OpenOptions } from '../disk-target';
import { claimDiskUuid } from '../disk-uuid-registry';
import { fromVmwareUuid, MAX_DESCRIPTOR_BYTES, NO_PARENT_CID, parseDescriptor, type VmdkDescriptor } from './vmdk-descriptor';
import { flatExtentName, VmdkFlatTarget } from './vmdk-flat-target';
import { corrupt, SECTOR_BYTES, SPARSE_MAGIC } from './vmdk-format';
import { VmdkSparseTarget } from './vmdk-sparse-target';
import { VmdkSplitTarget } from './vmdk-split-target';

export type VmdkSubformat = 'monolithicSparse' | 'monolithicFlat';

/** What a VMDK file is, read without opening it for I/O. */
export interface VmdkIdentity {
  readonly layout: 'sparse' | 'flat' | 'split';
  readonly descriptor: VmdkDescriptor | undefined;
  readonly sizeBytes: number;
  readonly diskUuid: string | undefined;
}

/** Sibling files read when looking for children of a disk (bounds the scan of a big datastore directory). */
const MAX_SIBLINGS_SCANNED = 1000;
/** VMDK3 (`COWD`) magic, little-endian. */
const COWD_MAGIC = 0x44574f43;

/** Tells a sparse extent from a text descriptor and reads its identity; damage and foreign formats are coded errors. */
export async function probeVmdk(file: string): Promise<VmdkIdentity> {
  let handle: fsp.FileHandle;
  try {
    handle = await fsp.open(file, 'r');
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot open ${file}`);
  }
  let head: Buffer;
  let size: number;
  try {
    size = (await handle.stat()).size;
    head = Buffer.alloc(Math.min(size, MAX_DESCRIPTOR_BYTES));
    await handle.read(head, 0, head.length, 0);
  } finally {
    await handle.close();
  }
  if (head.length >= 4 && head.readUInt32LE(0) === SPARSE_MAGIC) {
    const { header, descriptor } = await VmdkSparseTarget.probe(file);
    return { layout: 'sparse', descriptor, sizeBytes: header.capacitySectors * SECTOR_BYTES, diskUuid: fromVmwareUuid(descriptor?.ddb.get('ddb.uuid')) };
  }
  if (head.length >= 4 && head.readUInt32LE(0) === COWD_MAGIC) {
    throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${file} is a VMDK3 (COWD) image, which is not supported`, { details: { file } });
  }
  // A text descriptor is small and holds no NUL byte except as trailing
  // padding (qemu pads a rewritten descriptor to a sector); anything else
  // without the KDMV magic is not a VMDK we can read.
  const nul = head.indexOf(0);
  const binary = nul >= 0 && head.subarray(nul).some((b) => b !== 0);
  if (size > MAX_DESCRIPTOR_BYTES || binary || !head.subarray(0, nul < 0 ? head.length : nul).includes('createType')) {
    throw corrupt(file, 0, size < 4 ? 'file is too short to be a VMDK' : 'bad magic: neither a KDMV sparse extent nor a VMDK text descriptor');
  }
  const descriptor = parseDescriptor(head, file, 0);
  const kinds = new Set(descriptor.extents.map((e) => e.type));
  if ([...kinds].every((k) => k === 'FLAT' || k === 'VMFS')) {
    return { layout: 'flat', descriptor, sizeBytes: descriptor.extents.reduce((n, e) => n + e.sectors * SECTOR_BYTES, 0), diskUuid: fromVmwareUuid(descriptor.ddb.get('ddb.uuid')) };
  }
  if ([...kinds].every((k) => k === 'SPARSE')) {
    return { layout: 'split', descriptor, sizeBytes: descriptor.extents.reduce((n, e) => n + e.sectors * SECTOR_BYTES, 0), diskUuid: fromVmwareUuid(descriptor.ddb.get('ddb.uuid')) };
  }
  throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `${file}: createType "${descriptor.createType}" with ${[...kinds].join('/')} extents is not supported (sparse, split sparse and flat VMDKs are)`, { details: { file } });
}

/**
 * Refuses to write a disk another VMDK in the same directory names as its
 * parent (`parentFileNameHint`): writing a snapshot's base corrupts the
 * snapshot. Unreadable siblings are skipped: they cannot be our children.
 */
async function refuseIfParent(file: string): Promise<void> {
  const dir = path.dirname(path.resolve(file));
  const self = path.resolve(file);
  let names: string[];
  try {
    names = (await fsp.readdir(dir)).filter((n) => n.toLowerCase().endsWith('.vmdk')).slice(0, MAX_SIBLINGS_SCANNED);
  } catch {
    return;
  }
  for (const name of names) {
    const sibling = path.join(dir, name);
    if (sibling === self) continue;
    let hint: string | undefined;
    try {
      hint = (await probeVmdk(sibling)).descriptor?.parentFileNameHint;
    } catch {
      continue;
    }
    if (hint !== undefined && path.resolve(dir, hint) === self) {
      throw new BlockrelayError('BR_TARGET_IS_PARENT', `${file} is the parent of ${sibling} (a snapshot); refusing to write it`, { details: { file, child: sibling } });
    }
  }
}

async function exists(file: string): Promise<boolean> {
  try {
    await fsp.lstat(file);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw wrapError(err, 'BR_IO', `cannot stat ${file}`);
  }
}

function normaliseUuid(uuid: string): string {
  const h = uuid.toLowerCase().replace(/-/g, '');
  if (!/^[0-9a-f]{32}$/.test(h)) throw new BlockrelayError('BR_USAGE', `disk uuid '${uuid}' is not 16 bytes of hex`);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * Opens or creates a VMDK. Creating over an existing disk is refused
 * (BR_TARGET_NAME_CONFLICT, ASR 78052) unless it is ours: the same ddb.uuid
 * and size as asked, so a master target that restarts reopens its disk.
 * Opening refuses snapshot children and, for writing, snapshot parents, and
 * claims the disk's uuid for this process.
 */
export async function openVmdk(file: string, options: OpenOptions, subformat: VmdkSubformat, spec: string): Promise<DiskTarget> {
  const readOnly = options.readOnly === true;
  const create = options.create;
  if (create !== undefined) {
    if (readOnly) throw new BlockrelayError('BR_USAGE', `cannot create ${spec} read-only`);
    const uuid = normaliseUuid(create.diskUuid ?? randomUUID());
    if (await exists(file)) {
      let ours = false;
      try {
        const id = await probeVmdk(file);
        ours = create.diskUuid !== undefined && id.diskUuid === uuid && id.sizeBytes === create.sizeBytes;
      } catch {
        ours = false;
      }
      if (!ours) throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${file} already exists and is not this disk (uuid ${uuid}, ${create.sizeBytes} bytes); refusing to create over it`, { details: { spec, file } });
    } else if (subformat === 'monolithicFlat') {
      const dataFile = path.join(path.dirname(file), flatExtentName(file));
      if (await exists(dataFile)) throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${dataFile} already exists; refusing to create ${spec} over it`, { details: { spec, file: dataFile } });
      await VmdkFlatTarget.createImage(file, create.sizeBytes, uuid);
    } else {
      await VmdkSparseTarget.createImage(file, create.sizeBytes, uuid);
    }
  }
  const id = await probeVmdk(file);
  if (id.descriptor !== undefined && id.descriptor.parentCid !== NO_PARENT_CID) {
    throw new BlockrelayError('BR_TARGET_HAS_PARENT', `${file} is a snapshot child (parentCID ${id.descriptor.parentCid.toString(16)}${id.descriptor.parentFileNameHint === undefined ? '' : `, parent ${id.descriptor.parentFileNameHint}`}); the target must have no snapshots`, { details: { spec, file } });
  }
  if (!readOnly) await refuseIfParent(file);
  const claim = id.diskUuid === undefined ? undefined : claimDiskUuid(id.diskUuid, spec, !readOnly);
  try {
    if (id.layout === 'sparse') return await VmdkSparseTarget.open(file, spec, readOnly, claim, options.pageCache);
    if (id.layout === 'split') return await VmdkSplitTarget.open(file, id.descriptor!, spec, readOnly, claim, options.pageCache);
    return await VmdkFlatTarget.open(file, id.descriptor!, spec, readOnly, claim, options.pageCache);
  } catch (err) {
    claim?.release();
    throw err;
  }
}
