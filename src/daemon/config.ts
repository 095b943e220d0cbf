import * as fs from 'node:fs';
import { BlockrelayError } from '../retry/blockrelay-error';
import { HEALTH_DEFAULTS } from '../retry/health';
import { envName, field, parseShape, scalarPaths, type InferShape } from './config-schema';
import { DISK_ID_PATTERN } from '../platform/disk-id';

/** The product's documented limit of disks attached to one master target. */
export const MAX_DISKS_PER_MASTER_TARGET = 60;

/** HOST:PORT, with IPv6 hosts in brackets. */
export const HOST_PORT_PATTERN = /^(?:[^\s:[\]]+|\[[0-9a-fA-F:]+\]):\d{1,5}$/;

/**
 * The daemon's configuration (`blockrelay process-server|master-target
 * --config FILE`). Every key, its range and its default is here, in one
 * place; docs/operations.md describes them for operators.
 */
export const CONFIG_SHAPE = {
  /** Where the role keeps its state (lock file, sequence numbers, status). */
  stateDir: field.string(),
  /** Address the role's HTTP API listens on. */
  listen: field.string({ default: '127.0.0.1:9440', pattern: HOST_PORT_PATTERN, what: 'HOST:PORT' }),
  /** Shared secret every API call carries; at least 16 characters. */
  secret: field.string({ minLength: 16, maxLength: 1024, what: 'a shared secret of 16 to 1024 characters' }),
  tls: field.object(
    {
      certFile: field.string(),
      keyFile: field.string(),
      caFile: field.string({ optional: true }),
    },
    { optional: true },
  ),
  log: field.object({
    level: field.enumOf(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], { default: 'info' }),
  }),
  rpoThresholdSeconds: field.integer({ min: 10, max: 7 * 86_400, default: HEALTH_DEFAULTS.rpoThresholdMs / 1000 }),
  /** Master target, process server: one log's apply (or forward) running longer warns APPLY_STALLED. */
  applyStallSeconds: field.integer({ min: 1, max: 7 * 86_400, default: HEALTH_DEFAULTS.applyStallMs / 1000 }),
  /** Process server: the spool on the cache volume. */
  cache: field.object(
    {
      dir: field.string(),
      maxBytes: field.integer({ min: 64 * 1024 * 1024, default: 64 * 1024 ** 3 }),
    },
    { optional: true },
  ),
  /** Process server: the master target logs are forwarded to. */
  forward: field.object(
    {
      url: field.string({ pattern: /^https?:\/\/[^\s]+$/, what: 'an http(s) URL' }),
      secret: field.string({ minLength: 16, maxLength: 1024, what: 'a shared secret of 16 to 1024 characters' }),
      bandwidthBytesPerSecond: field.integer({ min: 0, default: 0 }),
      /**
       * Forward a log while it still arrives from the source (off by default:
       * it pays where the process server has cores of its own, and slowed
       * logs down with the whole chain on two shared cores; docs/transport.md).
       */
      cutThrough: field.boolean({ default: false }),
      /** A forward that makes no progress for this long is abandoned and retried. */
      timeoutSeconds: field.integer({ min: 1, max: 3600, default: 60 }),
      /** CA certificate(s) that sign the master target's TLS certificate (https forward URL). */
      caFile: field.string({ optional: true }),
    },
    { optional: true },
  ),
  /** Master target: history kept on the retention volume. */
  retention: field.object(
    {
      dir: field.string({ default: '/mnt/retention/' }),
      windowHours: field.integer({ min: 1, max: 24 * 365, default: 24 }),
      appConsistentIntervalMinutes: field.integer({ min: 1, max: 24 * 60, default: 60 }),
    },
    { optional: true },
  ),
  disks: field.array(
    field.object({
      id: field.string({ pattern: DISK_ID_PATTERN, what: 'a disk id of 1 to 64 letters, digits, ".", "_" or "-"' }),
      target: field.string({ what: 'a disk spec such as vmdk:/datastore/disk0.vmdk or blob:URL' }),
    }),
    { maxItems: MAX_DISKS_PER_MASTER_TARGET, default: [] },
  ),
};

export type BlockrelayConfig = InferShape<typeof CONFIG_SHAPE>;

/** BLOCKRELAY_* variables that are not config overrides (read by commands directly). */
const NON_CONFIG_ENV = new Set(['BLOCKRELAY_CONTROL_SECRET']);

/**
 * Validates a parsed config with environment overrides applied
 * (`BLOCKRELAY_RETENTION__WINDOW_HOURS=48`). Unknown `BLOCKRELAY_*` variables
 * are refused too: a typo must not be silently ignored.
 */
export function validateConfig(input: unknown, env: NodeJS.ProcessEnv = {}): BlockrelayConfig {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) {
    throw new BlockrelayError('BR_CONFIG_INVALID', 'the config must be a JSON object');
  }
  const merged = structuredClone(input) as Record<string, unknown>;
  const byEnv = new Map(scalarPaths(CONFIG_SHAPE).map((p) => [envName(p.path), p]));
  for (const [name, text] of Object.entries(env)) {
    if (!name.startsWith('BLOCKRELAY_') || text === undefined || NON_CONFIG_ENV.has(name)) continue;
    const target = byEnv.get(name);
    if (target === undefined) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `environment variable ${name} names no config key; known: ${[...byEnv.keys()].join(', ')}`, { details: { key: name } });
    }
    const value = target.field.fromEnv!(text, `${target.path} (from ${name})`);
    setPath(merged, target.path, value);
  }
  const config = parseShape(CONFIG_SHAPE, merged);
  const ids = new Set<string>();
  for (const [i, disk] of config.disks.entries()) {
    if (ids.has(disk.id)) throw new BlockrelayError('BR_CONFIG_INVALID', `config key 'disks[${i}].id': disk id '${disk.id}' appears twice`, { details: { key: `disks[${i}].id` } });
    ids.add(disk.id);
  }
  return config;
}

/** Reads and validates a JSON config file. */
export function loadConfig(file: string, env: NodeJS.ProcessEnv = process.env): BlockrelayConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new BlockrelayError('BR_CONFIG_INVALID', `cannot read config file ${file}: ${(err as Error).message}`, { cause: err });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new BlockrelayError('BR_CONFIG_INVALID', `config file ${file} is not valid JSON: ${(err as Error).message}`, { cause: err });
  }
  return validateConfig(parsed, env);
}

function setPath(target: Record<string, unknown>, path: string, value: unknown): void {
  const parts = path.split('.');
  let node = target;
  for (const part of parts.slice(0, -1)) {
    const next = node[part];
    if (typeof next !== 'object' || next === null || Array.isArray(next)) node[part] = {};
    node = node[part] as Record<string, unknown>;
  }
  node[parts[parts.length - 1]!] = value;
}
