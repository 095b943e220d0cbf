import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli';
import { freePort, waitForPort } from '../helpers/net';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { writeImagePair } from './image-pair';

const MiB = 1024 * 1024;
const tempDir = useTempDirs();
const servers: ChildProcess[] = [];

afterEach(() => {
  for (const s of servers.splice(0)) s.kill('SIGKILL');
});

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
    await waitForPort(port, 10_000, 'qemu-nbd');
    const r = await runCli(['resync', `nbd://127.0.0.1:${port}/disk0`, `raw:${dst}`, '--json']);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).blocksSent).toBe(changed.length);
    expect(spawnSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, dst]).status).toBe(0);
  });
});
