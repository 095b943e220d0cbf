import { corrupt, SECTOR_BYTES } from './vmdk-format';

/**
 * The VMDK text descriptor ("Virtual Disk Format 5.0", "The Descriptor
 * File"): header keys, extent lines and the disk database (`ddb.*`). It is
 * embedded in a monolithicSparse file and stands alone in front of a
 * monolithicFlat one.
 */
export type ExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS';
export type ExtentType = 'FLAT' | 'SPARSE' | 'ZERO' | 'VMFS' | 'VMFSSPARSE' | 'VMFSRDM' | 'VMFSRAW';

export interface DescriptorExtent {
  readonly access: ExtentAccess;
  readonly sectors: number;
  readonly type: ExtentType;
  /** File name relative to the descriptor's directory; absent for ZERO. */
  readonly fileName: string | undefined;
  /** Start of the extent's data in its file, in sectors (flat extents). */
  readonly offsetSectors: number;
}

export interface VmdkDescriptor {
  readonly version: number;
  /** Content ID, changed when the disk is first written after open. */
  readonly cid: number;
  /** CID of the parent; 0xffffffff means no parent. */
  readonly parentCid: number;
  readonly createType: string;
  readonly parentFileNameHint: string | undefined;
  readonly extents: readonly DescriptorExtent[];
  /** `ddb.*` keys (without quotes), in file order. */
  readonly ddb: ReadonlyMap<string, string>;
}

export const NO_PARENT_CID = 0xffffffff;
/** Largest descriptor text we parse: VMware's are a few hundred bytes. */
export const MAX_DESCRIPTOR_BYTES = 1024 * 1024;

const ACCESS = new Set(['RW', 'RDONLY', 'NOACCESS']);
const TYPES = new Set(['FLAT', 'SPARSE', 'ZERO', 'VMFS', 'VMFSSPARSE', 'VMFSRDM', 'VMFSRAW']);
const EXTENT_LINE = /^(\S+)\s+(\d+)\s+(\S+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$/;
const KEY_LINE = /^([A-Za-z][\w.]*)\s*=\s*(.*?)\s*$/;

function unquote(v: string): string {
  return v.length >= 2 && v.startsWith('"') && v.endsWith('"') ? v.slice(1, -1) : v;
}

/**
 * Parses descriptor text. `baseByteOffset` is where the text starts in its
 * file, so damage is reported at its real byte offset. Unknown header keys
 * are kept out of the model but tolerated; malformed lines are refused.
 */
export function parseDescriptor(raw: Buffer, file: string, baseByteOffset = 0): VmdkDescriptor {
  if (raw.length > MAX_DESCRIPTOR_BYTES) throw corrupt(file, baseByteOffset, `descriptor of ${raw.length} bytes is larger than ${MAX_DESCRIPTOR_BYTES}`);
  // An embedded descriptor is NUL-padded to its reserved sectors.
  const nul = raw.indexOf(0);
  const text = raw.subarray(0, nul < 0 ? raw.length : nul).toString('latin1');
  const keys = new Map<string, string>();
  const ddb = new Map<string, string>();
  const extents: DescriptorExtent[] = [];
  let at = 0;
  for (const rawLine of text.split('\n')) {
    const lineOffset = baseByteOffset + at;
    at += rawLine.length + 1;
    const line = rawLine.replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#')) continue;
    const ext = EXTENT_LINE.exec(line);
    if (ext !== null && ACCESS.has(ext[1]!)) {
      const type = ext[3]!;
      if (!TYPES.has(type)) throw corrupt(file, lineOffset, `unknown extent type '${type}'`);
      if (type !== 'ZERO' && ext[4] === undefined) throw corrupt(file, lineOffset, `extent line names no file`);
      const sectors = Number(ext[2]);
      const offsetSectors = ext[5] === undefined ? 0 : Number(ext[5]);
      if (!Number.isSafeInteger(sectors) || !Number.isSafeInteger(offsetSectors)) throw corrupt(file, lineOffset, 'extent size or offset out of range');
      extents.push({ access: ext[1] as ExtentAccess, sectors, type: type as ExtentType, fileName: ext[4], offsetSectors });
      continue;
    }
    const kv = KEY_LINE.exec(line);
    if (kv === null) throw corrupt(file, lineOffset, `malformed descriptor line '${line.slice(0, 60)}'`);
    const key = kv[1]!;
    const value = unquote(kv[2]!);
    if (key.startsWith('ddb.')) ddb.set(key, value);
    else keys.set(key, value);
  }
  const hex = (name: string, required: boolean): number => {
    const v = keys.get(name);
    if (v === undefined) {
      if (required) throw corrupt(file, baseByteOffset, `descriptor has no ${name}`);
      return NO_PARENT_CID;
    }
    if (!/^[0-9a-fA-F]{1,8}$/.test(v)) throw corrupt(file, baseByteOffset, `descriptor ${name} '${v}' is not a 32-bit hex number`);
    return parseInt(v, 16);
  };
  const versionText = keys.get('version');
  if (versionText === undefined || !/^\d+$/.test(versionText)) throw corrupt(file, baseByteOffset, 'descriptor has no numeric version= line');
  const createType = keys.get('createType');
  if (createType === undefined) throw corrupt(file, baseByteOffset, 'descriptor has no createType');
  if (extents.length === 0) throw corrupt(file, baseByteOffset, 'descriptor lists no extents');
  return {
    version: Number(versionText),
    cid: hex('CID', true),
    parentCid: hex('parentCID', false),
    createType,
    parentFileNameHint: keys.get('parentFileNameHint'),
    extents,
    ddb,
  };
}

function hex8(n: number): string {
  return n.toString(16).padStart(8, '0');
}

/** Renders a descriptor the way VMware lays one out. */
export function renderDescriptor(d: VmdkDescriptor): string {
  const lines = [
    '# Disk DescriptorFile',
    `version=${d.version}`,
    'encoding="UTF-8"',
    `CID=${hex8(d.cid)}`,
    `parentCID=${hex8(d.parentCid)}`,
    `createType="${d.createType}"`,
    '',
    '# Extent description',
    ...d.extents.map((e) => `${e.access} ${e.sectors} ${e.type}${e.fileName === undefined ? '' : ` "${e.fileName}"`}${e.type === 'FLAT' ? ` ${e.offsetSectors}` : ''}`),
    '',
    '# The Disk Data Base',
    '#DDB',
    '',
    ...[...d.ddb].map(([k, v]) => `${k} = "${v}"`),
    '',
  ];
  return lines.join('\n');
}

/** The disk database blockrelay writes: IDE geometry as qemu and VMware Workstation compute it, and the disk's UUID. */
export function defaultDdb(capacitySectors: number, uuid: string): Map<string, string> {
  const heads = 16;
  const sectorsPerTrack = 63;
  const cylinders = Math.min(Math.floor(capacitySectors / (heads * sectorsPerTrack)), 16383);
  return new Map([
    ['ddb.virtualHWVersion', '4'],
    ['ddb.geometry.cylinders', String(cylinders)],
    ['ddb.geometry.heads', String(heads)],
    ['ddb.geometry.sectors', String(sectorsPerTrack)],
    ['ddb.adapterType', 'ide'],
    ['ddb.uuid', toVmwareUuid(uuid)],
  ]);
}

/** `0123abcd-...` → VMware's `01 23 ab cd ...-...` form of ddb.uuid. */
export function toVmwareUuid(uuid: string): string {
  const hexDigits = uuid.toLowerCase().replace(/[^0-9a-f]/g, '');
  const bytes = hexDigits.match(/../g) ?? [];
  return `${bytes.slice(0, 8).join(' ')}-${bytes.slice(8, 16).join(' ')}`;
}

/** VMware's ddb.uuid → the standard 8-4-4-4-12 form, or undefined if it is not 16 bytes of hex. */
export function fromVmwareUuid(value: string | undefined): string | undefined {
  if (value === undefined) return undefined;
  const h = value.toLowerCase().replace(/[\s-]/g, '');
  if (!/^[0-9a-f]{32}$/.test(h)) return undefined;
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** A random content ID that is never the "no parent" marker. */
export function randomCid(random: () => number = Math.random): number {
  return Math.floor(random() * 0xfffffffe);
}

/** Sectors a descriptor text needs when embedded. */
export function descriptorSectorsNeeded(text: string): number {
  return Math.ceil(Buffer.byteLength(text, 'utf8') / SECTOR_BYTES);
}

const CID_LINE = /^([ \t]*CID[ \t]*=[ \t]*)[0-9a-fA-F]{1,8}/m;

/**
 * The descriptor text with its CID line set to `cid`, everything else byte
 * for byte as the writing tool left it (unknown keys, comments, line ends).
 * Undefined when the text has no CID line.
 */
export function replaceCid(text: string, cid: number): string | undefined {
  if (!CID_LINE.test(text)) return undefined;
  return text.replace(CID_LINE, `$1${cid.toString(16).padStart(8, '0')}`);
}
