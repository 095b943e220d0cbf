import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/daemon/config';
import { ROLE_THREADPOOL_SIZE } from '../../src/daemon/thread-pool';
import { parseDiskSpec } from '../../src/targets/disk-spec';
import { hasTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';

const deployDir = path.join(__dirname, '..', '..', 'docs', 'deploy');
const example = (name: string): string => path.join(deployDir, name);

describe('deployment examples in docs/deploy', () => {
  const tmp = useTempDirs();

  it('the master target example is valid, with TLS, retention and VMDK targets on the datastore', () => {
    const config = loadConfig(example('master-target.json'), {});
    expect(config.tls).toBeDefined();
    expect(config.forward).toBeUndefined();
    expect(config.retention).toMatchObject({ windowHours: 24, appConsistentIntervalMinutes: 60 });
    expect(config.disks.length).toBeGreaterThan(0);
    for (const disk of config.disks) expect(parseDiskSpec(disk.target).kind).toMatch(/^vmdk/);
  });

  it('the Azure process server example is valid, with page-blob targets and no forward', () => {
    const config = loadConfig(example('process-server-azure.json'), {});
    expect(config.forward).toBeUndefined();
    expect(config.cache?.dir).toBeDefined();
    expect(config.disks.length).toBeGreaterThan(0);
    for (const disk of config.disks) expect(parseDiskSpec(disk.target).kind).toBe('blob');
  });

  it('the forwarding process server example is valid, forwarding over https with a bandwidth limit', () => {
    const config = loadConfig(example('process-server-forward.json'), {});
    expect(config.tls).toBeDefined();
    expect(config.disks).toEqual([]);
    expect(config.forward?.url).toMatch(/^https:\/\//);
    expect(config.forward?.bandwidthBytesPerSecond).toBeGreaterThan(0);
  });

  it('takes the secrets from the environment the systemd units load, as the README says', () => {
    const config = loadConfig(example('process-server-forward.json'), {
      BLOCKRELAY_SECRET: 'from-the-environment-file-0001',
      BLOCKRELAY_FORWARD__SECRET: 'from-the-environment-file-0002',
    });
    expect(config.secret).toBe('from-the-environment-file-0001');
    expect(config.forward?.secret).toBe('from-the-environment-file-0002');
  });

  const units = ['blockrelay-master-target.service', 'blockrelay-process-server.service'];

  it('the systemd units run the documented command lines with a stop bound above the 60 s drain', () => {
    for (const unit of units) {
      const text = fs.readFileSync(example(unit), 'utf8');
      const role = unit.replace(/^blockrelay-/, '').replace(/\.service$/, '');
      expect(text).toContain(`ExecStart=/usr/bin/env node --initial-old-space-size=256 /opt/blockrelay/dist/daemon/cli.js ${role} --config /etc/blockrelay/${role}.json`);
      expect(text).toMatch(/^Type=simple$/m);
      // The pool size the CLI would default to anyway, stated where operators look, and io_uring off.
      expect(text).toMatch(new RegExp(`^Environment=UV_THREADPOOL_SIZE=${ROLE_THREADPOOL_SIZE}$`, 'm'));
      expect(text).toMatch(/^Environment=UV_USE_IO_URING=0$/m);
      expect(text).toMatch(/^KillSignal=SIGTERM$/m);
      expect(Number(/^TimeoutStopSec=(\d+)$/m.exec(text)?.[1])).toBeGreaterThan(60);
      expect(text).toMatch(/^ProtectSystem=full$/m);
      expect(text).toMatch(/^ReadWritePaths=.*\/var\/lib\/blockrelay/m);
    }
  });

  // systemd-analyze is not among CI's installs (the systemd package is
  // heavy), so this check runs where it is present and is skipped elsewhere.
  it.skipIf(!hasTool('systemd-analyze'))('systemd-analyze verify accepts the units without a warning', () => {
    const verify = (file: string) => spawnSync('systemd-analyze', ['verify', file], { encoding: 'utf8', timeout: 30_000 });
    for (const unit of units) {
      const result = verify(example(unit));
      expect({ unit, status: result.status, stderr: result.stderr }).toEqual({ unit, status: 0, stderr: '' });
    }
    // The check can fail: a misspelt directive is reported on stderr.
    const broken = path.join(tmp(), 'broken.service');
    fs.writeFileSync(broken, fs.readFileSync(example(units[0]!), 'utf8').replace('KillSignal=SIGTERM', 'KillSignal=SIGTERMX'));
    expect(verify(broken).stderr).toContain('SIGTERMX');
  });
});
