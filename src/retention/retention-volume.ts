import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import { parseDiskSpec } from '../targets/disk-spec';

/** One mount from /proc/self/mountinfo. */
export interface MountInfo {
  readonly mountPoint: string;
  readonly fsType: string;
  /** Per-mount options and superblock options together (e.g. `ro`, `rw`). */
  readonly options: readonly string[];
}

/** The facts validation reads from the system; tests replace them. */
export interface VolumeProbe {
  /** st_dev of a path (which must exist). */
  deviceOf(p: string): number;
  mounts(): MountInfo[];
  /** statfs: total and available bytes of the file system holding `p`. */
  capacity(p: string): { totalBytes: number; availableBytes: number };
  writable(p: string): boolean;
  realpath(p: string): string;
}

/** Unescapes the octal escapes (`\040` for a space) mountinfo uses in paths. */
function unescapeMountPath(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(Number.parseInt(oct, 8)));
}

/** Parses /proc/self/mountinfo (proc(5)): fields, a `-` separator, then type, source, super options. */
export function parseMountInfo(text: string): MountInfo[] {
  const out: MountInfo[] = [];
  for (const line of text.split('\n')) {
    const fields = line.trim().split(' ');
    const sep = fields.indexOf('-');
    if (sep < 6 || fields.length < sep + 3) continue;
    const options = [...fields[5]!.split(','), ...(fields[sep + 3] ?? '').split(',')].filter((o) => o !== '');
    out.push({ mountPoint: unescapeMountPath(fields[4]!), fsType: fields[sep + 1]!, options });
  }
  return out;
}

export const systemVolumeProbe: VolumeProbe = {
  deviceOf: (p) => fs.statSync(p).dev,
  mounts: () => parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8')),
  capacity: (p) => {
    const s = fs.statfsSync(p);
    return { totalBytes: s.blocks * s.bsize, availableBytes: s.bavail * s.bsize };
  },
  writable: (p) => {
    try {
      fs.accessSync(p, fs.constants.W_OK);
      return true;
    } catch {
      return false;
    }
  },
  realpath: (p) => fs.realpathSync(p),
};

/** The mount holding `p`: the longest mount point that is a prefix of it. */
export function mountOf(mounts: readonly MountInfo[], realPath: string): MountInfo | undefined {
  let best: MountInfo | undefined;
  for (const m of mounts) {
    const prefix = m.mountPoint.endsWith('/') ? m.mountPoint : `${m.mountPoint}/`;
    if (realPath === m.mountPoint || realPath.startsWith(prefix) || m.mountPoint === '/') {
      if (best === undefined || m.mountPoint.length >= best.mountPoint.length) best = m;
    }
  }
  return best;
}

const FAT_TYPES = new Set(['vfat', 'msdos', 'fat', 'umsdos']);

export interface RetentionVolumeInput {
  /** The retention directory; created if missing. */
  readonly dir: string;
  /** Directories on the cache/install volume: the state dir (holds the inbox), the cache dir, the install dir. */
  readonly excludedDirs: readonly { readonly what: string; readonly dir: string }[];
  /** Configured replication target specs; none may lie under `dir`. */
  readonly targetSpecs: readonly string[];
  /**
   * Skip the shared-volume check: only for `blockrelay demo`, whose layout
   * (DESIGN.md) puts cache, targets and retention under one data directory.
   */
  readonly allowSharedVolume?: boolean;
}

/** The directory blockrelay runs from (its volume is the install volume). */
export const INSTALL_DIR = path.resolve(__dirname, '..', '..');

function isUnder(child: string, parent: string): boolean {
  const rel = path.relative(parent, child);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/**
 * Refuses, with coded errors, a retention volume that is the cache or
 * install volume, holds a replication target, is FAT/FAT32, is read-only or
 * has zero capacity. The journal must survive what kills the cache volume,
 * needs durable renames, and must never be mistaken for a target.
 */
export function validateRetentionVolume(input: RetentionVolumeInput, probe: VolumeProbe = systemVolumeProbe): { realDir: string } {
  try {
    fs.mkdirSync(input.dir, { recursive: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EROFS' || code === 'EACCES' || code === 'EPERM') {
      throw new BlockrelayError('BR_RETENTION_VOLUME_READ_ONLY', `retention directory ${input.dir} cannot be created: ${(err as Error).message}`, { cause: err, details: { dir: input.dir } });
    }
    throw wrapError(err, 'BR_IO', `creating retention directory ${input.dir}`);
  }
  const realDir = probe.realpath(input.dir);
  const details = { dir: input.dir };
  const mount = mountOf(probe.mounts(), realDir);
  if (mount !== undefined && FAT_TYPES.has(mount.fsType)) {
    throw new BlockrelayError('BR_RETENTION_VOLUME_FAT', `retention directory ${input.dir} is on a ${mount.fsType} (FAT) file system at ${mount.mountPoint}`, { details: { ...details, fsType: mount.fsType } });
  }
  if ((mount !== undefined && mount.options.includes('ro')) || !probe.writable(realDir)) {
    throw new BlockrelayError('BR_RETENTION_VOLUME_READ_ONLY', `retention directory ${input.dir} is read-only${mount?.options.includes('ro') ? ` (${mount.mountPoint} is mounted ro)` : ''}`, { details });
  }
  const { totalBytes } = probe.capacity(realDir);
  if (totalBytes <= 0) {
    throw new BlockrelayError('BR_RETENTION_VOLUME_NO_CAPACITY', `retention directory ${input.dir} is on a file system of zero capacity`, { details });
  }
  const dev = probe.deviceOf(realDir);
  for (const excluded of input.allowSharedVolume === true ? [] : input.excludedDirs) {
    let other: number;
    try {
      other = probe.deviceOf(excluded.dir);
    } catch {
      continue; // A directory that does not exist yet shares no volume we can name.
    }
    if (other === dev) {
      throw new BlockrelayError('BR_RETENTION_VOLUME_SHARED', `retention directory ${input.dir} is on the same volume as the ${excluded.what} (${excluded.dir}); the retention volume must be a volume of its own`, { details: { ...details, shared: excluded.dir } });
    }
  }
  for (const spec of input.targetSpecs) {
    const parsed = parseDiskSpec(spec);
    if (parsed.kind === 'blob' || parsed.kind === 'nbd') continue;
    const abs = path.resolve(parsed.path);
    let real = abs;
    try {
      real = probe.realpath(path.dirname(abs));
      real = path.join(real, path.basename(abs));
    } catch {
      // Not created yet: compare the path as written.
    }
    if (isUnder(real, realDir) || isUnder(abs, path.resolve(input.dir))) {
      throw new BlockrelayError('BR_RETENTION_VOLUME_HOLDS_TARGET', `replication target ${spec} lies under the retention directory ${input.dir}`, { details: { ...details, target: spec } });
    }
  }
  return { realDir };
}
