import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { BlockrelayError } from '../retry/blockrelay-error';
import { writeFileDurably } from '../platform/durable-file';
import { validateDiskId } from '../transport/transport-protocol';
import { diskRetentionPaths, RETENTION_MANIFEST_VERSION } from './retention-format';

/**
 * `DIR/<disk>/manifest.json`: what the retention side needs to know about a
 * disk without the master target's config. The retention hooks write it, so
 * `failover`, `export` and `commit` find the target, the state directory
 * (ledger) and the inbox (pending logs) from the retention directory alone.
 */
export interface DiskManifest {
  readonly version: 1;
  readonly diskId: string;
  /** The disk spec of the replication target (holds the newest point). */
  readonly targetSpec: string;
  readonly diskSizeBytes: number;
  /** The master target's state directory (sequence ledger, lock). */
  readonly stateDir: string;
  /** The master target's inbox of this disk: logs received but not applied yet. */
  readonly inboxDir: string;
  readonly windowHours: number;
  readonly group?: string;
}

/** `DIR/<disk>/failover.json`: present while the disk is failed over. */
export interface FailoverRecord {
  readonly version: 1;
  readonly diskId: string;
  readonly out: string;
  readonly pointId: string;
  readonly atMs: number;
  /**
   * False while the copy runs (written before it, so a re-run may overwrite
   * its output), true once the output is whole and flushed. A record
   * without it predates the field and is complete.
   */
  readonly complete?: boolean;
}

/** Whether a failover record says its copy finished. */
export function failoverComplete(record: FailoverRecord): boolean {
  return record.complete !== false;
}

async function readJson(file: string, what: string): Promise<unknown> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new BlockrelayError('BR_IO', `reading ${what} ${file}: ${(err as Error).message}`, { cause: err });
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new BlockrelayError('BR_RETENTION_MANIFEST_INVALID', `${what} ${file} is not valid JSON: ${(err as Error).message}`, { cause: err, details: { file } });
  }
}

function isManifest(v: unknown, diskId: string): v is DiskManifest {
  const m = v as Partial<DiskManifest>;
  return typeof m === 'object' && m !== null && m.version === RETENTION_MANIFEST_VERSION && m.diskId === diskId && typeof m.targetSpec === 'string' && Number.isSafeInteger(m.diskSizeBytes) && typeof m.stateDir === 'string' && typeof m.inboxDir === 'string' && Number.isInteger(m.windowHours) && (m.group === undefined || typeof m.group === 'string');
}

/** Reads a disk's manifest; BR_RETENTION_DISK_UNKNOWN if the directory holds no history for it. */
export async function readManifest(retentionDir: string, diskId: string): Promise<DiskManifest> {
  const file = diskRetentionPaths(retentionDir, validateDiskId(diskId)).manifest;
  const value = await readJson(file, 'retention manifest');
  if (value === undefined) {
    throw new BlockrelayError('BR_RETENTION_DISK_UNKNOWN', `retention directory ${retentionDir} holds no history for disk ${diskId} (no ${file})`, { details: { disk: diskId, dir: retentionDir } });
  }
  if (!isManifest(value, diskId)) throw new BlockrelayError('BR_RETENTION_MANIFEST_INVALID', `retention manifest ${file} is malformed`, { details: { file } });
  return value;
}

export async function writeManifest(retentionDir: string, manifest: DiskManifest): Promise<void> {
  const paths = diskRetentionPaths(retentionDir, manifest.diskId);
  await fsp.mkdir(paths.root, { recursive: true });
  await writeFileDurably(paths.manifest, `${JSON.stringify(manifest, null, 2)}\n`);
}

/** Disks with history in a retention directory. */
export function listRetentionDisks(retentionDir: string): string[] {
  if (!fs.existsSync(retentionDir)) return [];
  return fs
    .readdirSync(retentionDir, { withFileTypes: true })
    .filter((e) => e.isDirectory() && fs.existsSync(diskRetentionPaths(retentionDir, e.name).manifest))
    .map((e) => e.name)
    .sort();
}

export async function readFailoverRecord(retentionDir: string, diskId: string): Promise<FailoverRecord | undefined> {
  const file = diskRetentionPaths(retentionDir, diskId).failover;
  const value = (await readJson(file, 'failover record')) as Partial<FailoverRecord> | undefined;
  if (value === undefined) return undefined;
  if (value.version !== 1 || value.diskId !== diskId || typeof value.out !== 'string' || typeof value.pointId !== 'string' || !Number.isSafeInteger(value.atMs) || (value.complete !== undefined && typeof value.complete !== 'boolean')) {
    throw new BlockrelayError('BR_RETENTION_MANIFEST_INVALID', `failover record ${file} is malformed`, { details: { file } });
  }
  return value as FailoverRecord;
}

export async function writeFailoverRecord(retentionDir: string, record: FailoverRecord): Promise<void> {
  await writeFileDurably(diskRetentionPaths(retentionDir, record.diskId).failover, `${JSON.stringify(record, null, 2)}\n`);
}

/** The master target's applied sequence number of the disk (its ledger), or null if unknown. */
export function readAppliedSeq(stateDir: string, diskId: string): number | null {
  try {
    const ledger = JSON.parse(fs.readFileSync(`${stateDir}/disks/${validateDiskId(diskId)}.json`, 'utf8')) as { appliedSeq?: unknown };
    return Number.isSafeInteger(ledger.appliedSeq) ? (ledger.appliedSeq as number) : null;
  } catch {
    return null;
  }
}
