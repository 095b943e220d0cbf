import { BlockrelayError } from '../retry/blockrelay-error';
import type { DiskTarget, OpenOptions } from './disk-target';
import { RawTarget } from './raw/raw-target';
import { openVmdk } from './vmdk/vmdk-disk';
import { VhdTarget } from './vhd/vhd-target';
import { PageBlobTarget } from './blob/page-blob-target';
import { NbdDiskTarget } from '../tap/nbd-disk-target';

/**
 * Disk specs, parsed in one place (DESIGN.md "Outward contracts"):
 * `raw:PATH`, `vmdk:PATH`, `vmdk-flat:PATH`, `vhd:PATH`, `blob:URL`,
 * `nbd://HOST:PORT/EXPORT`.
 */
export type DiskSpec =
  | { readonly kind: 'raw' | 'vmdk' | 'vmdk-flat' | 'vhd'; readonly spec: string; readonly path: string }
  | { readonly kind: 'blob'; readonly spec: string; readonly url: string }
  | { readonly kind: 'nbd'; readonly spec: string; readonly host: string; readonly port: number; readonly exportName: string };

export type DiskKind = DiskSpec['kind'];

const PATH_KINDS = ['raw', 'vmdk', 'vmdk-flat', 'vhd'] as const;

/** The default NBD port (IANA), used when an nbd:// spec names none. */
const NBD_DEFAULT_PORT = 10809;

function invalid(spec: string, why: string): BlockrelayError {
  return new BlockrelayError('BR_TARGET_SPEC_INVALID', `bad disk spec '${spec}': ${why}; expected raw:PATH, vmdk:PATH, vmdk-flat:PATH, vhd:PATH, blob:URL or nbd://HOST:PORT/EXPORT`, { details: { spec } });
}

/** Parses a disk spec; throws BR_TARGET_SPEC_INVALID naming what is wrong. */
export function parseDiskSpec(spec: string): DiskSpec {
  if (spec.startsWith('nbd://')) {
    let url: URL;
    try {
      url = new URL(spec);
    } catch {
      throw invalid(spec, 'not a URL');
    }
    if (url.hostname === '') throw invalid(spec, 'no host');
    const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port);
    let exportName: string;
    try {
      exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
    } catch {
      throw invalid(spec, 'the export name has a malformed %-escape');
    }
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    return { kind: 'nbd', spec, host, port, exportName };
  }
  const colon = spec.indexOf(':');
  if (colon <= 0) throw invalid(spec, 'no kind prefix');
  const kind = spec.slice(0, colon);
  const rest = spec.slice(colon + 1);
  if (kind === 'blob') {
    if (!/^https?:\/\/[^/]+\/.+/.test(rest)) throw invalid(spec, 'blob: needs an http(s) URL with a path');
    return { kind: 'blob', spec, url: rest };
  }
  if ((PATH_KINDS as readonly string[]).includes(kind)) {
    if (rest === '') throw invalid(spec, 'empty path');
    if (rest.includes('\0')) throw invalid(spec, 'path holds a NUL byte');
    return { kind: kind as (typeof PATH_KINDS)[number], spec, path: rest };
  }
  throw invalid(spec, `unknown kind '${kind}'`);
}

/**
 * Opens (or with `options.create`, creates) the disk a spec names. The one
 * place every command turns a spec into a DiskTarget.
 */
export async function openDisk(spec: string, options: OpenOptions = {}): Promise<DiskTarget> {
  const parsed = parseDiskSpec(spec);
  switch (parsed.kind) {
    case 'raw':
      return RawTarget.open(parsed.path, options, spec);
    case 'vmdk':
      return openVmdk(parsed.path, options, 'monolithicSparse', spec);
    case 'vmdk-flat':
      return openVmdk(parsed.path, options, 'monolithicFlat', spec);
    case 'vhd':
      return VhdTarget.open(parsed.path, options, spec);
    case 'blob':
      return PageBlobTarget.open(parsed.url, options);
    case 'nbd':
      return NbdDiskTarget.open(parsed.host, parsed.port, parsed.exportName, options, spec);
  }
}
