import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { retentionHooksFromConfig } from '../../src/retention/retention-hooks';
import { mountOf, parseMountInfo, systemVolumeProbe, validateRetentionVolume, type MountInfo, type VolumeProbe } from '../../src/retention/retention-volume';
import { runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { SECRET } from '../transport/transport-fixture';
import { RETENTION_BASE, useRetentionDirs } from './retention-fixture';

const MOUNTINFO = [
  '27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard',
  '25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684092k',
  '90 27 8:17 / /mnt/usb\\040stick rw,relatime - vfat /dev/sdb1 rw,fmask=0022',
  '91 27 8:33 / /mnt/ro rw,relatime - xfs /dev/sdc1 ro,attr2',
  '92 27 8:49 / /mnt/retention rw,relatime - xfs /dev/sdd1 rw,attr2',
].join('\n');

/** A probe over a fake mount table: the device of a path is its mount's index. */
function fakeProbe(overrides: Partial<VolumeProbe> = {}): VolumeProbe {
  const mounts = parseMountInfo(MOUNTINFO);
  return {
    mounts: () => mounts,
    deviceOf: (p) => mounts.indexOf(mountOf(mounts, p)!),
    capacity: () => ({ totalBytes: 1 << 30, availableBytes: 1 << 29 }),
    writable: () => true,
    realpath: (p) => p,
    ...overrides,
  };
}

describe('retention volume validation', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();

  it('parses mountinfo, unescaping paths and merging mount and super options', () => {
    const mounts = parseMountInfo(MOUNTINFO);
    expect(mounts[2]).toEqual<MountInfo>({ mountPoint: '/mnt/usb stick', fsType: 'vfat', options: ['rw', 'relatime', 'rw', 'fmask=0022'] });
    expect(mounts[3]!.options).toContain('ro');
    expect(mountOf(mounts, '/mnt/usb stick/history')!.fsType).toBe('vfat');
    expect(mountOf(mounts, '/mnt/usbx')!.mountPoint).toBe('/');
    expect(parseMountInfo('garbage\n\n1 2 3')).toEqual([]);
  });

  it('refuses the cache/install volume, a volume holding a target, FAT, read-only and zero capacity, with coded errors', () => {
    const dir = tmp();
    const base = { excludedDirs: [{ what: 'state directory', dir: '/var/lib/blockrelay' }], targetSpecs: ['vmdk:/datastore/disk0.vmdk', 'blob:https://acct.blob.core.windows.net/c/b'] };
    // Fake paths must exist for mkdir: validate under a temp dir, but the probe decides the volume facts.
    const at = (p: string): string => path.join(dir, p);
    const probeAt = (overrides: Partial<VolumeProbe> = {}): VolumeProbe => {
      const inner = fakeProbe(overrides);
      return { ...inner, realpath: (p) => (p.startsWith(dir) ? p.slice(dir.length) || '/' : p), deviceOf: (p) => inner.deviceOf(p.startsWith(dir) ? p.slice(dir.length) || '/' : p) };
    };
    expect(validateRetentionVolume({ ...base, dir: at('/mnt/retention/h') }, probeAt())).toEqual({ realDir: '/mnt/retention/h' });
    expect(() => validateRetentionVolume({ ...base, dir: at('/srv/history') }, probeAt())).toThrow(expect.objectContaining({ code: 'BR_RETENTION_VOLUME_SHARED', details: expect.objectContaining({ shared: '/var/lib/blockrelay' }) }));
    expect(() => validateRetentionVolume({ ...base, dir: at('/mnt/usb stick/h') }, probeAt())).toThrow(expect.objectContaining({ code: 'BR_RETENTION_VOLUME_FAT' }));
    expect(() => validateRetentionVolume({ ...base, dir: at('/mnt/ro/h') }, probeAt())).toThrow(expect.objectContaining({ code: 'BR_RETENTION_VOLUME_READ_ONLY' }));
    expect(() => validateRetentionVolume({ ...base, dir: at('/mnt/retention/h') }, probeAt({ writable: () => false }))).toThrow(expect.objectContaining({ code: 'BR_RETENTION_VOLUME_READ_ONLY' }));
    expect(() => validateRetentionVolume({ ...base, dir: at('/mnt/retention/h') }, probeAt({ capacity: () => ({ totalBytes: 0, availableBytes: 0 }) }))).toThrow(expect.objectContaining({ code: 'BR_RETENTION_VOLUME_NO_CAPACITY' }));
    const holding = { ...base, targetSpecs: [`raw:${at('/mnt/retention/h/disks/d0.img')}`] };
    expect(() => validateRetentionVolume({ ...holding, dir: at('/mnt/retention/h') }, probeAt())).toThrow(expect.objectContaining({ code: 'BR_RETENTION_VOLUME_HOLDS_TARGET' }));
  });

  it('accepts a volume of its own and refuses the state directory volume on this machine', () => {
    const dir = tmp();
    const own = retentionTmp();
    const state = path.join(dir, 'state');
    fs.mkdirSync(state);
    const shared = fs.statSync(dir).dev === fs.statSync(RETENTION_BASE).dev;
    if (!shared) expect(validateRetentionVolume({ dir: own, excludedDirs: [{ what: 'state directory', dir: state }], targetSpecs: [] }, systemVolumeProbe).realDir).toBe(fs.realpathSync(own));
    expect(() => validateRetentionVolume({ dir: path.join(dir, 'retention'), excludedDirs: [{ what: 'state directory', dir: state }], targetSpecs: [] }, systemVolumeProbe)).toThrow(expect.objectContaining({ code: 'BR_RETENTION_VOLUME_SHARED' }));
    const config = validateConfig({ stateDir: state, secret: SECRET, retention: { dir: path.join(dir, 'retention') }, disks: [] });
    expect(() => retentionHooksFromConfig(config)).toThrow(expect.objectContaining({ code: 'BR_RETENTION_VOLUME_SHARED' }));
    // The demo keeps everything under one data directory on purpose.
    expect(retentionHooksFromConfig(config, { allowSharedVolume: true })?.options.dir).toBe(path.join(dir, 'retention'));
    expect(retentionHooksFromConfig(validateConfig({ stateDir: state, secret: SECRET, disks: [] }))).toBeUndefined();
  });

  it('blockrelay master-target refuses to start on an invalid retention volume', async () => {
    const dir = tmp();
    const configFile = path.join(dir, 'mt.json');
    fs.writeFileSync(configFile, JSON.stringify({ stateDir: path.join(dir, 'state'), listen: '127.0.0.1:0', secret: SECRET, retention: { dir: path.join(dir, 'retention') }, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'retention', 'disk0.img')}` }] }));
    const run = await runCli(['master-target', '--config', configFile], { timeoutMs: 30_000 });
    expect(run.status).toBe(1);
    expect(run.stderr).toMatch(/^BR_RETENTION_VOLUME_(SHARED|HOLDS_TARGET): /m);
  });
});
