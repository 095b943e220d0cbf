import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadConfig, validateConfig } from '../../src/daemon/config';
import { envName } from '../../src/daemon/config-schema';
import { useTempDirs } from '../helpers/tmp';

const minimal = { stateDir: '/var/lib/blockrelay', secret: 'a-secret-of-enough-length' };

function refusal(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect((err as { code?: string }).code).toBe('BR_CONFIG_INVALID');
    return (err as Error).message;
  }
  throw new Error('expected the config to be refused');
}

describe('config', () => {
  const tmp = useTempDirs();

  it('fills defaults for everything not given', () => {
    const c = validateConfig(minimal);
    expect(c.listen).toBe('127.0.0.1:9440');
    expect(c.rpoThresholdSeconds).toBe(900);
    expect(c.log.level).toBe('info');
    expect(c.disks).toEqual([]);
    expect(c.retention).toBeUndefined();
    expect(validateConfig({ ...minimal, retention: {} }).retention).toEqual({ dir: '/mnt/retention/', windowHours: 24, appConsistentIntervalMinutes: 60 });
  });

  it('refuses an unknown key, naming it and the known ones', () => {
    const msg = refusal(() => validateConfig({ ...minimal, retention: { windowHour: 3 } }));
    expect(msg).toContain("config key 'retention.windowHour' is unknown");
    expect(msg).toContain('windowHours');
  });

  it('refuses an out-of-range value, naming the key, what was expected and what arrived', () => {
    const msg = refusal(() => validateConfig({ ...minimal, rpoThresholdSeconds: 5 }));
    expect(msg).toBe("config key 'rpoThresholdSeconds': expected a whole number from 10 to 604800, got 5 (number)");
  });

  it('refuses a missing required key', () => {
    expect(refusal(() => validateConfig({ secret: minimal.secret }))).toBe("config key 'stateDir': expected a string of 1 to 4096 characters, got nothing (the key is required)");
  });

  it('refuses a short secret, a bad listen address and a bad enum', () => {
    expect(refusal(() => validateConfig({ ...minimal, secret: 'short' }))).toContain("'secret'");
    expect(refusal(() => validateConfig({ ...minimal, listen: 'localhost' }))).toContain('expected HOST:PORT');
    expect(refusal(() => validateConfig({ ...minimal, log: { level: 'loud' } }))).toContain('one of "fatal"');
  });

  it('refuses disk ids with path separators and duplicates, and more than 60 disks', () => {
    expect(refusal(() => validateConfig({ ...minimal, disks: [{ id: '../etc', target: 'raw:/x' }] }))).toContain("'disks[0].id'");
    expect(refusal(() => validateConfig({ ...minimal, disks: [{ id: 'a', target: 'raw:/x' }, { id: 'a', target: 'raw:/y' }] }))).toContain('appears twice');
    const many = Array.from({ length: 61 }, (_, i) => ({ id: `d${i}`, target: `raw:/d${i}` }));
    expect(refusal(() => validateConfig({ ...minimal, disks: many }))).toContain('at most 60 items');
  });

  it('applies environment overrides with type conversion', () => {
    expect(envName('retention.windowHours')).toBe('BLOCKRELAY_RETENTION__WINDOW_HOURS');
    const c = validateConfig({ ...minimal, retention: {} }, { BLOCKRELAY_RETENTION__WINDOW_HOURS: '48', BLOCKRELAY_LOG__LEVEL: 'debug', HOME: '/root' });
    expect(c.retention?.windowHours).toBe(48);
    expect(c.log.level).toBe('debug');
  });

  it('refuses a bad environment override and an unknown BLOCKRELAY_ variable', () => {
    expect(refusal(() => validateConfig(minimal, { BLOCKRELAY_RPO_THRESHOLD_SECONDS: 'soon' }))).toContain("'rpoThresholdSeconds (from BLOCKRELAY_RPO_THRESHOLD_SECONDS)'");
    expect(refusal(() => validateConfig(minimal, { BLOCKRELAY_RETENSION__DIR: '/x' }))).toContain('BLOCKRELAY_RETENSION__DIR names no config key');
  });

  it('loads a file and refuses one that is not JSON', () => {
    const dir = tmp();
    const good = path.join(dir, 'good.json');
    fs.writeFileSync(good, JSON.stringify(minimal));
    expect(loadConfig(good, {}).stateDir).toBe('/var/lib/blockrelay');
    const bad = path.join(dir, 'bad.json');
    fs.writeFileSync(bad, '{ stateDir: ');
    expect(refusal(() => loadConfig(bad, {}))).toContain('is not valid JSON');
  });
});
