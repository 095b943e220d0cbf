import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runUntilSignalled } from '../../src/daemon/role-commands';
import { renderStatus } from '../../src/daemon/status-command';
import { cliCommand, runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { sendLog } from '../../src/transport/log-client';
import { DISK_SIZE, makeLog, prng, SECRET } from '../transport/transport-fixture';

describe('blockrelay master-target', () => {
  const tmp = useTempDirs();

  it('refuses a config with an unknown key, naming it', async () => {
    const dir = tmp();
    const file = path.join(dir, 'mt.json');
    fs.writeFileSync(file, JSON.stringify({ stateDir: dir, secret: SECRET, retension: {} }));
    const r = await runCli(['master-target', '--config', file]);
    expect(r.status).toBe(1);
    expect(r.stderr.trim()).toMatch(/^BR_CONFIG_INVALID: config key 'retension' is unknown/);
  });

  it('applies logs, then drains and exits 0 on SIGTERM', async () => {
    const dir = tmp();
    const file = path.join(dir, 'mt.json');
    const target = path.join(dir, 'disk0.img');
    fs.writeFileSync(file, JSON.stringify({ stateDir: path.join(dir, 'state'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${target}` }] }));
    const { command, args } = cliCommand(['master-target', '--config', file]);
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LOG_LEVEL: 'warn' } });
    let stderr = '';
    const url = await new Promise<string>((resolve, reject) => {
      child.stderr.on('data', (d) => {
        stderr += d;
        const m = /listening on (http:\/\/\S+)/.exec(stderr);
        if (m) resolve(m[1]!);
      });
      child.on('exit', () => reject(new Error(`exited early: ${stderr}`)));
    });
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(3);
    for (let seq = 1; seq <= 3; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
      await sendLog({ url, secret: SECRET }, log.envelope, log.file);
    }
    child.kill('SIGTERM');
    const status = await new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    expect(status).toBe(0);
    expect(fs.readFileSync(target).equals(model)).toBe(true);
    expect(fs.existsSync(path.join(dir, 'state', 'blockrelay.lock'))).toBe(false);
  });
});

describe('blockrelay status', () => {
  const tmp = useTempDirs();

  it("prints a role's disks and health, and one JSON document with --json", async () => {
    const { validateConfig } = await import('../../src/daemon/config');
    const { masterTargetFromConfig } = await import('../../src/transport/master-target');
    const { hrlLogOps } = await import('../../src/transport/hrl-log-ops');
    const { quiet } = await import('../transport/transport-fixture');
    const dir = tmp();
    const mt = masterTargetFromConfig(validateConfig({ stateDir: dir, listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'd.img')}` }] }), hrlLogOps, quiet());
    await mt.start();
    try {
      const text = await runCli(['status', '--url', mt.url]);
      expect(text.status).toBe(0);
      expect(text.stdout).toMatch(/master-target: 1 disk/);
      expect(text.stdout).toMatch(/disk0\s+OK/);
      const json = await runCli(['status', '--url', mt.url, '--json']);
      expect(JSON.parse(json.stdout)).toMatchObject({ role: 'master-target', disks: [{ diskId: 'disk0', health: 'OK' }] });
      const page = await (await fetch(mt.url)).text();
      expect(page).toContain('<title>blockrelay status</title>');
    } finally {
      await mt.stop();
    }
  });

  it('fails with BR_NET_UNREACHABLE when nothing answers', async () => {
    const r = await runCli(['status', '--url', 'http://127.0.0.1:9']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^BR_NET_UNREACHABLE: /);
  });
  it('bounds the stop after SIGTERM: a role that never stops is ended with status 1, named in the log', async () => {
    const lines: string[] = [];
    const logger = { info: () => undefined, warn: () => undefined, error: (_o: object, msg: string) => lines.push(msg) };
    const exits: number[] = [];
    const stderrWrite = process.stderr.write;
    process.stderr.write = (() => true) as typeof process.stderr.write;
    try {
      const running = runUntilSignalled({ drain: async () => undefined, stop: () => new Promise<void>(() => undefined) }, logger, { stopTimeoutMs: 50, exit: (status) => exits.push(status) });
      await new Promise((resolve) => setTimeout(resolve, 10));
      process.emit('SIGTERM');
      expect(await running).toBe(1);
      await new Promise((resolve) => setTimeout(resolve, 700));
    } finally {
      process.stderr.write = stderrWrite;
    }
    expect(lines.join('\n')).toContain('BR_ROLE_STOP_TIMEOUT');
    expect(exits).toEqual([1]);
  });
  it('renders a status document whose disks lack health or RPO', () => {
    const text = renderStatus({ role: 'source', disks: [{ diskId: 'disk0' } as never, { diskId: 'disk1', health: 'OK', rpoSeconds: 1.25, pendingBytes: 2048 }] });
    expect(text).toContain('disk0');
    expect(text).toMatch(/disk1\s+OK\s+RPO 1\.3 s/);
  });
});
