import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { writeImagePair } from './image-pair';

const MiB = 1024 * 1024;
const tempDir = useTempDirs();
const servers: ChildProcess[] = [];

afterEach(() => {
  for (const s of servers.splice(0)) s.kill('SIGKILL');
});

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

async function waitForPort(port: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => {
        socket.destroy();
        resolve(true);
      });
      socket.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`qemu-nbd did not listen on ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(!requireTool('qemu-nbd') || !requireTool('qemu-img'))('blockrelay resync from an NBD export', () => {
  it('resyncs a raw target from a read-only qemu-nbd export of the source', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const dst = path.join(dir, 'target.img');
    const changed = writeImagePair(src, dst, 8 * MiB, 12, 61);
    const port = await freePort();
    // --persistent: the check for the port and the resync are two connections.
    const server = spawn('qemu-nbd', ['--read-only', '--persistent', '--format=raw', '--bind=127.0.0.1', `--port=${port}`, '--export-name=disk0', src], { stdio: 'ignore' });
    servers.push(server);
    await waitForPort(port, 10_000);
    const r = await runCli(['resync', `nbd://127.0.0.1:${port}/disk0`, `raw:${dst}`, '--json']);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).blocksSent).toBe(changed.length);
    expect(spawnSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, dst]).status).toBe(0);
  });
});
