import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { cliCommand, runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { freePort } from '../helpers/net';
import { requireTool } from '../helpers/tools';


async function startDemo(dir: string, nbdPort: number): Promise<{ child: ChildProcess; manifest: { nbd: string; control: string; metrics: string }; stderr: () => string }> {
  fs.rmSync(path.join(dir, 'demo.json'), { force: true });
  const { command, args } = cliCommand(['demo', '--data', dir, '--size', String(64 * 1024 * 1024), '--nbd', `127.0.0.1:${nbdPort}`, '--interval-ms', '500']);
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d) => { stderr += d; });
  const deadline = Date.now() + 30_000;
  while (!fs.existsSync(path.join(dir, 'demo.json'))) {
    if (child.exitCode !== null) throw new Error(`demo exited early: ${stderr}`);
    if (Date.now() > deadline) throw new Error(`demo did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return { child, manifest: JSON.parse(fs.readFileSync(path.join(dir, 'demo.json'), 'utf8')), stderr: () => stderr };
}

function stop(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    child.on('exit', (code) => resolve(code));
    child.kill('SIGTERM');
  });
}

describe('blockrelay demo', () => {
  const tmp = useTempDirs();

  it('replicates fio writes through its NBD tap to the VMDK target, drains on SIGTERM, and resumes', async () => {
    if (!requireTool('fio') || !requireTool('qemu-img') || !requireTool('qemu-io')) return;
    const dir = tmp();
    const nbdPort = await freePort();
    const first = await startDemo(dir, nbdPort);
    expect(first.manifest.nbd).toBe(`nbd://127.0.0.1:${nbdPort}/disk0`);
    expect(first.manifest.metrics).toBe(`${first.manifest.control}/metrics`);
    for (const p of ['source/disk0.img', 'cache', 'target/disk0.vmdk', 'retention']) expect(fs.existsSync(path.join(dir, p))).toBe(true);
    // The layout is whole before any write: the target is a VMDK of the disk's size.
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', path.join(dir, 'target', 'disk0.vmdk')], { encoding: 'utf8' })) as { format: string; 'virtual-size': number };
    expect(info).toMatchObject({ format: 'vmdk', 'virtual-size': 64 * 1024 * 1024 });

    // Random writes at a rate the chain keeps up with (no overflow into resync).
    execFileSync('fio', ['--name=churn', '--ioengine=nbd', `--uri=${first.manifest.nbd}`, '--rw=randwrite', '--bsrange=4k-64k', '--size=64m', '--io_size=24m', '--iodepth=8', '--rate=12m', '--randseed=7'], { stdio: 'ignore', timeout: 60_000 });
    const tag = await runCli(['tag', '--url', first.manifest.control, '--app', '--name', 'after-fio', '--json']);
    expect(tag.status).toBe(0);
    expect(JSON.parse(tag.stdout)).toMatchObject({ name: 'after-fio', disks: ['disk0'] });
    const status = await (await fetch(`${first.manifest.control}/v1/status`)).json() as { disks: Array<{ diskId: string }> };
    expect(status.disks[0]?.diskId).toBe('disk0');
    expect(await (await fetch(first.manifest.metrics)).text()).toContain('blockrelay_applied_bytes_total');

    expect(await stop(first.child)).toBe(0);
    execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', path.join(dir, 'source', 'disk0.img'), path.join(dir, 'target', 'disk0.vmdk')]);
    execFileSync('qemu-img', ['check', path.join(dir, 'target', 'disk0.vmdk')]);
    const points = await runCli(['points', 'list', '--retention', path.join(dir, 'retention'), '--disk', 'disk0', '--json']);
    const list = JSON.parse(points.stdout) as Array<{ kind: string; name?: string }>;
    expect(list.some((p) => p.kind === 'app' && p.name === 'after-fio')).toBe(true);
    expect(list.length).toBeGreaterThan(2);

    // Started again on the same directory, it resumes where it stopped.
    const second = await startDemo(dir, nbdPort);
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1m 3m', second.manifest.nbd], { stdio: 'ignore', timeout: 30_000 });
    expect(await stop(second.child)).toBe(0);
    execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', path.join(dir, 'source', 'disk0.img'), path.join(dir, 'target', 'disk0.vmdk')]);
    const after = JSON.parse((await runCli(['points', 'list', '--retention', path.join(dir, 'retention'), '--disk', 'disk0', '--json'])).stdout) as unknown[];
    expect(after.length).toBeGreaterThan(list.length);
  }, 180_000);

  it('exits 1 with a coded line, leaving nothing running, when its NBD port is taken', async () => {
    const net = await import('node:net');
    const busy = net.createServer();
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
    const port = (busy.address() as import('node:net').AddressInfo).port;
    try {
      const r = await runCli(['demo', '--data', tmp(), '--size', String(16 * 1024 * 1024), '--nbd', `127.0.0.1:${port}`], { timeoutMs: 30_000 });
      expect(r.signal).toBeNull();
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/^BR_TAP_LISTEN: /m);
    } finally {
      busy.close();
    }
  });
});
