import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { STOP_SIGNALS_FORCED_STATUS, untilStopSignal } from '../../src/daemon/stop-signals';
import { cliCommand, REPO_ROOT } from '../helpers/cli';
import { freePort } from '../helpers/net';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';

/** Starts a child and resolves once `DIR/demo.json` exists. */
async function startUntilDemoJson(command: string, args: string[], dir: string, options: { cwd?: string } = {}): Promise<{ child: ChildProcess; stderr: () => string; exited: Promise<number | null> }> {
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'], ...options });
  let stderr = '';
  child.stderr!.on('data', (d) => { stderr += d; });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const deadline = Date.now() + 60_000;
  while (!fs.existsSync(path.join(dir, 'demo.json'))) {
    if (child.exitCode !== null) throw new Error(`exited early: ${stderr}`);
    if (Date.now() > deadline) throw new Error(`did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return { child, stderr: () => stderr, exited };
}

function portOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
  });
}

describe('stop signals', () => {
  const tmp = useTempDirs();
  const children: ChildProcess[] = [];
  afterEach(() => {
    for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  });

  it('starts the stop at the first signal, tells the next two, and ends the process at the one after', async () => {
    const told: Array<[NodeJS.Signals, number]> = [];
    const exits: number[] = [];
    const stop = untilStopSignal((s, remaining) => told.push([s, remaining]), (status) => exits.push(status));
    // What node passes a signal listener: the signal's name.
    const send = (signal: NodeJS.Signals): boolean => (process.emit as (event: string, arg: string) => boolean)(signal, signal);
    try {
      send('SIGINT');
      expect(await stop.signal).toBe('SIGINT');
      send('SIGTERM');
      send('SIGINT');
      expect(told).toEqual([['SIGTERM', 2], ['SIGINT', 1]]);
      expect(exits).toEqual([]);
      send('SIGINT');
      expect(exits).toEqual([STOP_SIGNALS_FORCED_STATUS]);
    } finally {
      stop.release();
    }
    expect(process.listenerCount('SIGINT')).toBe(0);
  });

  it('lets the demo finish its drain when a second SIGINT comes (a second Ctrl-C)', async () => {
    if (!requireTool('qemu-io') || !requireTool('qemu-img')) return;
    const dir = tmp();
    const nbdPort = await freePort();
    const { command, args } = cliCommand(['demo', '--data', dir, '--size', String(64 * 1024 * 1024), '--nbd', `127.0.0.1:${nbdPort}`]);
    const demo = await startUntilDemoJson(command, args, dir);
    children.push(demo.child);
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 8M', `nbd://127.0.0.1:${nbdPort}/disk0`], { stdio: 'ignore' });
    demo.child.kill('SIGINT');
    await new Promise((r) => setTimeout(r, 50));
    demo.child.kill('SIGINT');
    expect(await demo.exited).toBe(0);
    expect(demo.stderr()).toMatch(/SIGINT: already draining/);
    expect(demo.stderr()).toMatch(/drained: applied up to log/);
    execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', path.join(dir, 'source', 'disk0.img'), path.join(dir, 'target', 'disk0.vmdk')]);
  });

  it('npm start: SIGTERM to npm reaches the demo, which drains and exits 0, leaving nothing running', async () => {
    // npm start runs the built CLI (dist/, made by npm install's prepare).
    if (!fs.existsSync(path.join(REPO_ROOT, 'dist', 'daemon', 'cli.js'))) return;
    const dir = tmp();
    const nbdPort = await freePort();
    // Arguments after `--` follow the script's own: the later --data wins.
    const npm = await startUntilDemoJson('npm', ['start', '--silent', '--', '--data', dir, '--nbd', `127.0.0.1:${nbdPort}`, '--size', String(64 * 1024 * 1024)], dir, { cwd: REPO_ROOT });
    children.push(npm.child);
    try {
      npm.child.kill('SIGTERM');
      expect(await npm.exited).toBe(0);
      expect(npm.stderr()).toMatch(/SIGTERM: draining/);
      expect(await portOpen(nbdPort)).toBe(false);
    } finally {
      // The failure this guards against leaves the demo running on its own.
      spawnSync('pkill', ['-KILL', '-f', '--', `--data ${dir}`]);
    }
  });
});
