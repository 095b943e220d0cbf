import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach } from 'vitest';
import { validateConfig, type BlockrelayConfig } from '../../src/daemon/config';
import { retentionHooksFromConfig, type RetentionHooks, type RetentionHooksOptions } from '../../src/retention/retention-hooks';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { hashFile } from '../../src/transport/log-spool';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import type { LogEnvelope } from '../../src/transport/transport-protocol';
import { FAST_RETRY, quiet, SECRET } from '../transport/transport-fixture';

/**
 * The retention volume must not share a device with the state directory or
 * the install directory (both on the root file system here), so tests keep
 * retention directories on /dev/shm, a tmpfs of its own.
 */
export const RETENTION_BASE = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();

/** Fresh retention directories on their own volume, removed after each test. */
export function useRetentionDirs(): () => string {
  const made: string[] = [];
  afterEach(() => {
    for (const dir of made.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
  });
  return () => {
    const dir = fs.mkdtempSync(path.join(RETENTION_BASE, 'blockrelay-retention-'));
    made.push(dir);
    return dir;
  };
}

export const DISK_BYTES = 4 * 1024 * 1024;
export const BASE_TIME_MS = Date.UTC(2026, 10, 21, 6, 0, 0);

export { prng } from '../helpers/prng';

export interface LogSpec {
  readonly seq: number;
  readonly cutTimeMs: number;
  readonly appTag?: string;
  readonly cutId?: string;
  readonly group?: string;
  /** Writes per log (each up to 16 KiB, some overlapping within the log). */
  readonly writes?: number;
  /** Bytes of the disk the writes fall in (default: all of it). */
  readonly region?: { readonly offset: number; readonly length: number };
}

/**
 * Writes a sealed [MS-HRL] log of distinct random patterns (some writes
 * overlapping earlier ones in the same log), applying them to `model`.
 */
export async function makePatternLog(dir: string, diskId: string, spec: LogSpec, model: Buffer, rand: () => number): Promise<{ file: string; envelope: LogEnvelope }> {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${diskId}-${String(spec.seq).padStart(6, '0')}.hrl`);
  const writer = await HrlWriter.create(file);
  const writes = spec.writes ?? 24;
  for (let i = 0; i < writes; i++) {
    const length = 512 * (1 + Math.floor(rand() * 32));
    const region = spec.region ?? { offset: 0, length: model.length };
    const offset = region.offset + Math.floor(rand() * ((region.length - length) / 512)) * 512;
    const data = Buffer.alloc(length);
    for (let j = 0; j < length; j += 4) data.writeUInt32LE(Math.floor(rand() * 2 ** 32), j);
    await writer.append(offset, data);
    data.copy(model, offset);
  }
  await writer.seal();
  const { xxhash64, sizeBytes } = await hashFile(file);
  return {
    file,
    envelope: { diskId, seq: spec.seq, xxhash64, logLength: sizeBytes, cutTimeMs: spec.cutTimeMs, cutId: spec.cutId ?? `cut-${spec.seq}`, group: spec.group, appTag: spec.appTag, diskSizeBytes: model.length },
  };
}

export interface RetentionSetup {
  readonly dir: string;
  readonly retentionDir: string;
  readonly config: BlockrelayConfig;
  readonly configFile: string;
  readonly targetSpec: (diskId: string) => string;
}

/** A master target config with a retention volume; targets are raw files (or VMDK with `kind`). */
export function retentionSetup(dir: string, retentionDir: string, disks: string[] = ['disk0'], kind: 'raw' | 'vmdk' = 'raw', windowHours = 24): RetentionSetup {
  const targetSpec = (diskId: string): string => `${kind}:${path.join(dir, 'targets', `${diskId}.${kind === 'raw' ? 'img' : 'vmdk'}`)}`;
  fs.mkdirSync(path.join(dir, 'targets'), { recursive: true });
  const raw = {
    stateDir: path.join(dir, 'mt'),
    listen: '127.0.0.1:0',
    secret: SECRET,
    log: { level: 'silent' },
    retention: { dir: retentionDir, windowHours },
    disks: disks.map((id) => ({ id, target: targetSpec(id) })),
  };
  const configFile = path.join(dir, 'mt.json');
  fs.writeFileSync(configFile, JSON.stringify(raw));
  return { dir, retentionDir, config: validateConfig(raw), configFile, targetSpec };
}

/**
 * Starts an in-process master target with the retention hooks of its
 * config. A simulated clock in `extra` drives only the hooks (window
 * pruning); the master target's retry timers keep real time.
 */
export async function startMasterTarget(setup: RetentionSetup, extra: Partial<RetentionHooksOptions> = {}): Promise<{ mt: ApplyingHop; hooks: RetentionHooks }> {
  const hooks = retentionHooksFromConfig(setup.config, extra)!;
  const mt = masterTargetFromConfig(setup.config, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY, hooks });
  await mt.start();
  return { mt, hooks };
}

export async function sendAll(mt: ApplyingHop, logs: readonly { file: string; envelope: LogEnvelope }[]): Promise<void> {
  for (const log of logs) await sendLog({ url: mt.url, secret: SECRET }, log.envelope, log.file);
}

export function sameBytes(actual: Buffer, expected: Buffer): boolean {
  if (actual.length !== expected.length) return false;
  return actual.equals(expected);
}
