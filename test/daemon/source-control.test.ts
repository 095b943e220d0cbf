import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runCli, startSourceCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';

describe('blockrelay source --control', () => {
  const tmp = useTempDirs();

  it('serves status and metrics, and takes an app-consistent point through blockrelay tag with the quiesce hook', async () => {
    if (!requireTool('qemu-io')) return;
    const dir = tmp();
    const disk = path.join(dir, 'disk0.img');
    fs.writeFileSync(disk, Buffer.alloc(0));
    fs.truncateSync(disk, 16 * 1024 * 1024);
    const hook = path.join(dir, 'hook.sh');
    fs.writeFileSync(hook, `#!/bin/sh\necho "$1 $BLOCKRELAY_DISKS $BLOCKRELAY_TAG" >> ${path.join(dir, 'phases')}\n`, { mode: 0o755 });
    const logDir = path.join(dir, 'logs');
    const source = await startSourceCli(['--disk', `disk0=raw:${disk}`, '--listen', '127.0.0.1:0', '--log-dir', logDir, '--control', '127.0.0.1:0', '--quiesce-hook', hook, '--group', 'db', '--interval-ms', '600000']);
    const ready = { ...source.ready, control: source.ready.control! };
    try {
      execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 64k', ready.exports.disk0!], { stdio: 'ignore' });
      const tag = await runCli(['tag', '--url', ready.control, '--group', 'db', '--app', '--name', 'nightly', '--json']);
      expect(tag.status).toBe(0);
      expect(JSON.parse(tag.stdout)).toMatchObject({ name: 'nightly', disks: ['disk0'] });
      expect(fs.readFileSync(path.join(dir, 'phases'), 'utf8')).toBe('freeze disk0 nightly\nthaw disk0 nightly\n');
      const sidecars = fs.readdirSync(logDir).filter((n) => n.endsWith('.hrl.json'));
      expect(sidecars.map((n) => JSON.parse(fs.readFileSync(path.join(logDir, n), 'utf8')).appTag)).toContain('nightly');

      const wrongGroup = await runCli(['tag', '--url', ready.control, '--group', 'web', '--app']);
      expect(wrongGroup.status).toBe(1);
      expect(wrongGroup.stderr).toMatch(/^BR_DISK_UNKNOWN: .*group web is not protected here/);
      const status = await runCli(['status', '--url', ready.control]);
      expect(status.stdout).toMatch(/source: 1 disk/);
      expect(status.stdout).toMatch(/disk0\s+OK/);
      expect(await (await fetch(`${ready.control}/metrics`)).text()).toContain('blockrelay_');
    } finally {
      expect(await source.stop()).toBe(0);
    }
  });
});
