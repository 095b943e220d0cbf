import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { runCli, startSourceCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { callJson } from '../../src/transport/log-client';
import { prng, SECRET, startHops } from './transport-fixture';


describe('blockrelay source --process-server', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it('ships every sealed log; after SIGTERM the master target holds the protected disk', async () => {
    if (!requireTool('qemu-io')) return;
    const dir = tmp();
    const { mt, ps, stop } = await startHops(dir, `vmdk:${path.join(dir, 'target.vmdk')}`);
    cleanup.push(stop);

    const disk = path.join(dir, 'disk0.img');
    fs.writeFileSync(disk, Buffer.alloc(0));
    fs.truncateSync(disk, 32 * 1024 * 1024);
    const source = await startSourceCli(['--disk', `disk0=raw:${disk}`, '--listen', '127.0.0.1:0', '--log-dir', path.join(dir, 'logs'), '--process-server', ps.url, '--interval-ms', '300'], { BLOCKRELAY_SECRET: SECRET });
    const ready = source.ready;
    const uri = ready.exports.disk0!;
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 1m', '-c', 'write -P 0x22 5m 512k', uri], { stdio: 'ignore' });
    await new Promise((r) => setTimeout(r, 700));
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 10m 64k', '-c', 'write -z 0 4k', uri], { stdio: 'ignore' });
    expect(await source.stop()).toBe(0);
    await ps.drain();
    await mt.drain();
    await stop();
    cleanup.pop();
    execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', disk, path.join(dir, 'target.vmdk')]);
    expect(fs.readdirSync(path.join(dir, 'logs')).filter((n) => n.endsWith('.hrl'))).toEqual([]);
  }, 120_000);

  it('runs an operator\'s networked resync from the control API onto a target that differs, while the tap keeps writing', async () => {
    if (!requireTool('qemu-io')) return;
    const dir = tmp();
    const size = 16 * 1024 * 1024;
    // A first sync onto an existing disk: the target holds old content everywhere.
    const rand = prng(31);
    const sourceBytes = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4) sourceBytes.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
    const targetBytes = Buffer.from(sourceBytes);
    for (let block = 0; block < size / 4096; block += 7) targetBytes.fill(0xee, block * 4096, block * 4096 + 4096);
    const targetFile = path.join(dir, 'target.img');
    fs.writeFileSync(targetFile, targetBytes);
    const disk = path.join(dir, 'disk0.img');
    fs.writeFileSync(disk, sourceBytes);
    const { mt, ps, stop } = await startHops(dir, `raw:${targetFile}`);
    cleanup.push(stop);
    const controlSecret = 'control-secret-0123456789';
    const source = await startSourceCli(['--disk', `disk0=raw:${disk}`, '--listen', '127.0.0.1:0', '--log-dir', path.join(dir, 'logs'), '--process-server', ps.url, '--control', '127.0.0.1:0', '--interval-ms', '300'], { BLOCKRELAY_SECRET: SECRET, BLOCKRELAY_CONTROL_SECRET: controlSecret });
    const ready = { ...source.ready, control: source.ready.control! };
    const api = { url: ready.control, secret: controlSecret };
    expect(await callJson(api, 'POST', '/v1/disks/disk0/resync')).toMatchObject({ diskId: 'disk0', state: 'running' });
    // Writes go on during the resync; they travel as logs after it.
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 1m 256k', '-c', 'write -P 0x55 9m 64k', ready.exports.disk0!], { stdio: 'ignore' });
    let state: { state: string; result?: { blocksSent: number } } = { state: 'running' };
    for (let i = 0; i < 300 && state.state === 'running'; i++) {
      await new Promise((r) => setTimeout(r, 100));
      state = (await callJson(api, 'GET', '/v1/disks/disk0/resync')) as typeof state;
    }
    expect(state.state, source.stderr()).toBe('done');
    expect(state.result!.blocksSent).toBeGreaterThan(0);
    expect(await source.stop()).toBe(0);
    await ps.drain();
    await mt.drain();
    await stop();
    cleanup.pop();
    expect(fs.readFileSync(targetFile).equals(fs.readFileSync(disk))).toBe(true);
  }, 120_000);

  it('refuses --process-server without the shared secret in BLOCKRELAY_SECRET', async () => {
    const dir = tmp();
    const env = { ...process.env };
    delete env.BLOCKRELAY_SECRET;
    const r = await runCli(['source', '--disk', `disk0=raw:${path.join(dir, 'x.img')}`, '--listen', '127.0.0.1:0', '--log-dir', dir, '--process-server', 'http://127.0.0.1:1'], { env });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^BR_USAGE: --process-server needs the process server's shared secret/);
  });
});
