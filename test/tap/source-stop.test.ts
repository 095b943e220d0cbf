import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/tap/nbd-client';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { StateLock } from '../../src/daemon/state-lock';
import { PROCESS_SERVER_SECRET_ENV } from '../../src/tap/source-command';
import { runCli, startSourceCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { hangableDisk, MiB, useCleanups } from './native-tap-fixtures';

const tempDir = useTempDirs();
const cleanups = useCleanups();

const STOP_TIMEOUT_MS = 3000;

/** A hangable disk0 and a healthy disk1 of 16 MiB, and a log dir; undefined where no hangable disk can be made here. */
async function hungAndHealthy(dir: string): Promise<{ hung: NonNullable<Awaited<ReturnType<typeof hangableDisk>>>; healthy: string; logDir: string } | undefined> {
  const hung = await hangableDisk(dir, 16 * MiB, cleanups);
  if (hung === undefined) return undefined;
  cleanups.push(() => hung.recover());
  const healthy = path.join(dir, 'disk1.img');
  fs.writeFileSync(healthy, Buffer.alloc(0));
  fs.truncateSync(healthy, 16 * MiB);
  return { hung, healthy, logDir: path.join(dir, 'logs') };
}

/** `blockrelay source ARGS --stop-timeout-ms STOP_TIMEOUT_MS`, killed at cleanup if still running; with its NBD host and port. */
async function startSource(args: string[], env?: Record<string, string>): Promise<{ src: Awaited<ReturnType<typeof startSourceCli>>; host: string; port: number }> {
  const src = await startSourceCli([...args, '--stop-timeout-ms', String(STOP_TIMEOUT_MS)], env);
  cleanups.push(() => {
    if (src.child.exitCode === null && src.child.signalCode === null) src.child.kill('SIGKILL');
  });
  const at = src.ready.listen.lastIndexOf(':');
  return { src, host: src.ready.listen.slice(0, at), port: Number(src.ready.listen.slice(at + 1)) };
}

/**
 * Sends SIGTERM and waits for the BR_TAP_STOP_TIMEOUT line; checks it came
 * within the bound (plus the moment the line takes to arrive).
 */
async function stopAndAwaitTimeoutLine(src: Awaited<ReturnType<typeof startSourceCli>>): Promise<{ line: string; startedMs: number; exited: Promise<number | null> }> {
  const startedMs = Date.now();
  const exited = new Promise<number | null>((resolve) => {
    if (src.child.exitCode !== null) resolve(src.child.exitCode);
    else src.child.once('exit', (code) => resolve(code));
  });
  src.child.kill('SIGTERM');
  let line: string | undefined;
  while (line === undefined && Date.now() - startedMs < STOP_TIMEOUT_MS + 5000) {
    await new Promise((r) => setTimeout(r, 50));
    line = src.stderr().split('\n').find((l) => l.startsWith('BR_TAP_STOP_TIMEOUT'));
  }
  expect(line, src.stderr()).toBeDefined();
  expect(Date.now() - startedMs).toBeLessThan(STOP_TIMEOUT_MS + 2000);
  return { line: line!, startedMs, exited };
}

describe('blockrelay source stop with a hung disk', () => {
  it('reports within --stop-timeout-ms what a hung disk left undone, seals the healthy disk, and exits 1', async () => {
    const disks = await hungAndHealthy(tempDir());
    if (disks === undefined) return;
    const { hung, healthy, logDir } = disks;
    const { src, host, port } = await startSource(['--disk', `disk0=raw:${hung.path}`, '--disk', `disk1=raw:${healthy}`, '--listen', '127.0.0.1:0', '--log-dir', logDir, '--interval-ms', String(24 * 60 * 60 * 1000)]);
    const c0 = await NbdClient.connect({ host, port, exportName: 'disk0' });
    const c1 = await NbdClient.connect({ host, port, exportName: 'disk1' });
    cleanups.push(() => c0.close().catch(() => undefined));
    cleanups.push(() => c1.close().catch(() => undefined));
    await c0.write(0, Buffer.alloc(65536, 0x11));
    await c1.write(0, Buffer.alloc(65536, 0x55));
    await c1.flush();
    hung.hang();
    const stuck = c0.write(65536, Buffer.alloc(65536, 0x22)).catch(() => undefined);
    // The export's writer is now in the disk write, which never returns.
    await new Promise((r) => setTimeout(r, 300));

    const { line, exited } = await stopAndAwaitTimeoutLine(src);
    expect(line).toContain('not flushed and closed: disk disk0;');
    expect(line).toContain('a write still stuck in disk disk0');
    expect(line).not.toMatch(/not sealed for disk[^;]*disk1/);
    // The process lives on while the disk hangs, maybe with a write still to
    // land: the state lock stays, so a second instance is refused rather than
    // recovering the log dir under that write.
    const lockFile = path.join(logDir, 'blockrelay.lock');
    expect(fs.readFileSync(lockFile, 'utf8').trim()).toBe(String(src.child.pid));
    const second = await runCli(['source', '--disk', `disk1=raw:${healthy}`, '--listen', '127.0.0.1:0', '--log-dir', logDir], { timeoutMs: 20_000 });
    expect(second.status, second.stderr).not.toBe(0);
    expect(second.stderr).toContain('BR_LOCKED');
    // A thread in a write the hung disk already took cannot be ended, not
    // even by SIGKILL, until the disk answers; then the process exits at once
    // with the failure status (before, a pending close kept it running).
    hung.recover();
    await stuck;
    expect(await exited).toBe(1);
    // Once the old process is gone its lock is stale and taken over.
    const lock = new StateLock(logDir);
    lock.acquire();
    lock.release();
    // The healthy disk's log was sealed as its last one.
    const names = fs.readdirSync(logDir);
    expect(names.filter((n) => n.startsWith('disk1-') && n.endsWith('.hrl'))).toHaveLength(1);
    expect(names.filter((n) => n.startsWith('disk1-') && n.endsWith('.hrl.open'))).toHaveLength(0);

    // The next start finds the hung disk's first write in a log (sealed at
    // the stop or recovered now).
    const tracker = await ChangeTracker.open({ dir: logDir, diskId: 'disk0', diskSizeBytes: 16 * MiB, persistIntervalMs: 0 });
    try {
      expect(tracker.sealedLogs().length).toBeGreaterThan(0);
    } finally {
      await tracker.close({ seal: false });
    }
  }, 30_000);
});

describe('blockrelay source stop with a READ and a WRITE stuck in a hung disk', () => {
  it('spends one NBD grace for both, leaving the time to seal the healthy disk', async () => {
    const disks = await hungAndHealthy(tempDir());
    if (disks === undefined) return;
    const { hung, healthy, logDir } = disks;
    const { src, host, port } = await startSource(['--disk', `disk0=raw:${hung.path}`, '--disk', `disk1=raw:${healthy}`, '--listen', '127.0.0.1:0', '--log-dir', logDir, '--interval-ms', String(24 * 60 * 60 * 1000)]);
    const writer = await NbdClient.connect({ host, port, exportName: 'disk0' });
    const reader = await NbdClient.connect({ host, port, exportName: 'disk0' });
    const c1 = await NbdClient.connect({ host, port, exportName: 'disk1' });
    for (const c of [writer, reader, c1]) cleanups.push(() => c.close().catch(() => undefined));
    await c1.write(0, Buffer.alloc(65536, 0x55));
    await c1.flush();
    hung.hang();
    const stuckWrite = writer.write(65536, Buffer.alloc(65536, 0x22)).catch(() => undefined);
    // Never read or written before, so not cached: the read waits on the disk.
    const stuckRead = reader.read(12 * MiB, 65536).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 300));

    const { line, startedMs, exited } = await stopAndAwaitTimeoutLine(src);
    // Past the NBD step within the bound: the healthy disk's log is sealed.
    expect(line).not.toContain("waiting at step 'nbd'");
    expect(line).not.toMatch(/not sealed for disk[^;]*disk1/);
    hung.recover();
    await Promise.all([stuckWrite, stuckRead]);
    expect(await exited).toBe(1);
    const names = fs.readdirSync(logDir);
    expect(names.filter((n) => n.startsWith('disk1-') && n.endsWith('.hrl'))).toHaveLength(1);
    expect(names.filter((n) => n.startsWith('disk1-') && n.endsWith('.hrl.open'))).toHaveLength(0);
  }, 30_000);
});

describe('blockrelay source stop with a process server that never answers', () => {
  it('reports a resync and an upload stuck on the peer within --stop-timeout-ms and exits 1', async () => {
    const dir = tempDir();
    // A peer that takes every request and never answers it (a hung process server).
    const held: http.ServerResponse[] = [];
    const seen: string[] = [];
    const peer = http.createServer((req, res) => {
      seen.push(`${req.method} ${req.url}`);
      req.resume();
      held.push(res);
    });
    await new Promise<void>((r) => peer.listen(0, '127.0.0.1', r));
    cleanups.push(async () => {
      for (const res of held) res.destroy();
      peer.closeAllConnections();
      await new Promise((r) => peer.close(r));
    });
    const disk = path.join(dir, 'disk0.img');
    fs.writeFileSync(disk, Buffer.alloc(0));
    fs.truncateSync(disk, 16 * MiB);
    const logDir = path.join(dir, 'logs');
    const { src, host, port } = await startSource(
      ['--disk', `disk0=raw:${disk}`, '--listen', '127.0.0.1:0', '--log-dir', logDir, '--interval-ms', '500', '--control', '127.0.0.1:0', '--process-server', `http://127.0.0.1:${(peer.address() as AddressInfo).port}`],
      { [PROCESS_SERVER_SECRET_ENV]: 'a-shared-secret-of-enough-length' },
    );
    const c0 = await NbdClient.connect({ host, port, exportName: 'disk0' });
    cleanups.push(() => c0.close().catch(() => undefined));
    await c0.write(0, Buffer.alloc(65536, 0x33));
    await c0.flush();
    const started = await fetch(`${src.ready.control!}/v1/disks/disk0/resync`, { method: 'POST' });
    expect(started.status, await started.text()).toBe(202);
    // A log is cut and its upload waits on the peer, and so does the resync.
    const uploading = (): boolean => seen.some((r) => /^PUT \/v1\/disks\/disk0\/logs\//.test(r));
    for (let waitedMs = 0; !uploading() && waitedMs < 10_000; waitedMs += 50) await new Promise((r) => setTimeout(r, 50));
    expect(uploading(), seen.join(', ')).toBe(true);
    const resync = (await (await fetch(`${src.ready.control!}/v1/disks/disk0/resync`)).json()) as { state: string };
    expect(resync.state).toBe('running');

    const { line, startedMs, exited } = await stopAndAwaitTimeoutLine(src);
    expect(line).toContain('the resync of disk disk0 still waits');
    expect(line).toContain('every active log sealed');
    expect(await exited).toBe(1);
    expect(Date.now() - startedMs).toBeLessThan(STOP_TIMEOUT_MS + 3000);
  }, 30_000);
});
