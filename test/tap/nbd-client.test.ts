import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { runConformanceSuite } from '../targets/conformance';
import { run } from './nbd-fixtures';
import { NbdClient } from '../../src/tap/nbd-client';
import { NbdDiskTarget } from '../../src/tap/nbd-disk-target';
import { NbdServer } from '../../src/tap/nbd-server';
import { RawTarget } from '../../src/targets/raw/raw-target';
import { openDisk } from '../../src/targets/disk-spec';

const tempDir = useTempDirs();
const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** Serves a fresh raw image over the tap's NBD server; the server outlives the targets the suite closes. */
async function serveRaw(sizeBytes: number): Promise<{ port: number; imagePath: string }> {
  const imagePath = path.join(tempDir(), 'served.img');
  const raw = await RawTarget.open(imagePath, { create: { sizeBytes } });
  const server = new NbdServer({ exports: [{ name: 'disk0', readOnly: false, source: raw }] });
  const { port } = await server.listen('127.0.0.1', 0);
  cleanups.push(async () => {
    await server.close(1000);
    await raw.close();
  });
  return { port, imagePath };
}

runConformanceSuite('nbd (tap server over raw)', {
  create: async (sizeBytes) => {
    const { port } = await serveRaw(sizeBytes);
    return NbdDiskTarget.open('127.0.0.1', port, 'disk0');
  },
  reopen: async (t, { readOnly }) => {
    const url = new URL(t.spec);
    return NbdDiskTarget.open(url.hostname, Number(url.port), 'disk0', { readOnly });
  },
});

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

async function startQemuNbd(args: string[], port: number): Promise<ChildProcess> {
  const child = spawn('qemu-nbd', ['--persistent', '--bind=127.0.0.1', `--port=${port}`, ...args], { stdio: 'ignore' });
  cleanups.push(async () => {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
  });
  for (let i = 0; i < 100; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port }, () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) return child;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('qemu-nbd did not start');
}

describe('NBD client', () => {
  it.runIf(requireTool('qemu-nbd') && requireTool('qemu-io'))('reads and writes an export served by qemu-nbd', async () => {
    const image = path.join(tempDir(), 'q.img');
    fs.writeFileSync(image, Buffer.alloc(4 * 1024 * 1024));
    const port = await freePort();
    await startQemuNbd(['-f', 'raw', '--export-name=q', image], port);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 4096 8192', `nbd://127.0.0.1:${port}/q`]);
    const client = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'q' });
    expect(client.sizeBytes).toBe(4 * 1024 * 1024);
    expect((await client.read(4096, 8192)).every((b) => b === 0x42)).toBe(true);
    await client.write(1024 * 1024, Buffer.alloc(65536, 0x77), { fua: true });
    await client.flush();
    await client.close();
    const bytes = fs.readFileSync(image);
    expect(bytes.subarray(1024 * 1024, 1024 * 1024 + 65536).every((b) => b === 0x77)).toBe(true);
  });

  it('splits requests longer than the advertised maximum block size', async () => {
    const imagePath = path.join(tempDir(), 'big.img');
    const raw = await RawTarget.open(imagePath, { create: { sizeBytes: 8 * 1024 * 1024 } });
    const server = new NbdServer({ exports: [{ name: 'd', readOnly: false, source: raw }], maxBlockBytes: 1024 * 1024, limits: { maxBufferedBytes: 4 * 1024 * 1024 } });
    const { port } = await server.listen('127.0.0.1', 0);
    cleanups.push(async () => {
      await server.close(1000);
      await raw.close();
    });
    const client = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'd' });
    expect(client.blockSizes.maximumBytes).toBe(1024 * 1024);
    const data = Buffer.alloc(5 * 1024 * 1024 + 100);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    await client.write(1000, data);
    expect((await client.read(1000, data.length)).equals(data)).toBe(true);
    await client.close();
  });

  it('names the export in BR_NBD_EXPORT_UNKNOWN and the error value of a failed request', async () => {
    const { port } = await serveRaw(1024 * 1024);
    await expect(NbdClient.connect({ host: '127.0.0.1', port, exportName: 'nope' })).rejects.toMatchObject({ code: 'BR_NBD_EXPORT_UNKNOWN' });
    const client = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'disk0' });
    await expect(client.read(1024 * 1024 - 10, 20)).rejects.toMatchObject({ code: 'BR_NBD_OUT_OF_RANGE', message: expect.stringContaining('EINVAL') });
    await expect(client.write(1024 * 1024, Buffer.alloc(1))).rejects.toMatchObject({ message: expect.stringContaining('ENOSPC') });
    // The connection survives refused requests.
    expect((await client.read(0, 10)).length).toBe(10);
    await client.close();
  });

  it('opens nbd://HOST:PORT/EXPORT disk specs through openDisk, read-only when asked', async () => {
    const { port, imagePath } = await serveRaw(1024 * 1024);
    fs.writeFileSync(imagePath, Buffer.alloc(1024 * 1024, 0x3c));
    const t = await openDisk(`nbd://127.0.0.1:${port}/disk0`, { readOnly: true });
    expect(t.sizeBytes).toBe(1024 * 1024);
    expect(t.capabilities.readOnly).toBe(true);
    expect((await t.read(4096, 512)).every((b) => b === 0x3c)).toBe(true);
    await expect(t.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'BR_TARGET_READ_ONLY' });
    await t.close();
  });

  it('refuses to connect to something that is not an NBD server with BR_NBD_PROTOCOL', async () => {
    const server = net.createServer((s) => s.end('HTTP/1.1 400 Bad Request\r\n\r\n'));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    cleanups.push(() => new Promise((r) => server.close(() => r())));
    const { port } = server.address() as net.AddressInfo;
    await expect(NbdClient.connect({ host: '127.0.0.1', port, exportName: 'x' })).rejects.toMatchObject({ code: expect.stringMatching(/^BR_NBD_(PROTOCOL|CONNECTION)$/) });
  });
});
