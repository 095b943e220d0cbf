import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, expect } from 'vitest';
import { requireTool } from '../helpers/tools';
import { RawPeer } from './nbd-fixtures';
import { NbdServer } from '../../src/tap/nbd-server';
import { RawTarget } from '../../src/targets/raw/raw-target';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { HrlLogFile } from '../../src/tracking/hrl-reader';

/**
 * Fixtures for the native data path (native/tap-transmission.cc): a
 * writable raw disk tracked by a real ChangeTracker, served so that READ and
 * WRITE go to a native thread per connection after the handshake.
 */

export const MiB = 1024 * 1024;
export const NATIVE_TAP_SIZE_BYTES = 8 * MiB;

export interface NativeTap {
  readonly dir: string;
  readonly server: NbdServer;
  readonly target: RawTarget;
  readonly tracker: ChangeTracker;
  readonly imagePath: string;
  readonly port: number;
  readonly uri: string;
  readonly warnings: string[];
}

/** Cleanups run after each test, newest first (see useCleanups). */
export type Cleanups = (() => Promise<void> | void)[];

/**
 * A list of cleanups drained after each test of the calling file, newest
 * first. Every cleanup runs even when one fails (a mounted disk and its
 * servers must go); the first failure fails the test.
 */
export function useCleanups(): Cleanups {
  const cleanups: Cleanups = [];
  afterEach(async () => {
    const failures: unknown[] = [];
    for (const c of cleanups.splice(0).reverse()) await Promise.resolve().then(c).catch((err: unknown) => failures.push(err));
    if (failures.length > 0) throw failures[0];
  });
  return cleanups;
}

export async function nativeTap(
  dir: string,
  cleanups: Cleanups,
  options: { sizeBytes?: number; maxBlockBytes?: number; overflowRatio?: number; imagePath?: string } = {},
): Promise<NativeTap> {
  const sizeBytes = options.sizeBytes ?? NATIVE_TAP_SIZE_BYTES;
  const imagePath = options.imagePath ?? path.join(dir, 'disk0.img');
  const target = options.imagePath === undefined ? await RawTarget.open(imagePath, { create: { sizeBytes } }) : await RawTarget.open(imagePath);
  const tracker = await ChangeTracker.open({ dir: path.join(dir, 'logs'), diskId: 'disk0', diskSizeBytes: sizeBytes, persistIntervalMs: 0, overflowRatio: options.overflowRatio ?? 10 });
  const warnings: string[] = [];
  const server = new NbdServer({
    exports: [{ name: 'disk0', readOnly: false, source: target, recorder: tracker }],
    warn: (m) => warnings.push(m),
    ...(options.maxBlockBytes === undefined ? {} : { maxBlockBytes: options.maxBlockBytes, limits: { maxBufferedBytes: options.maxBlockBytes + 64 * 1024 } }),
  });
  const { port } = await server.listen('127.0.0.1', 0);
  let closed = false;
  cleanups.push(async () => {
    if (closed) return;
    closed = true;
    await server.close(2000);
    await tracker.close().catch(() => undefined);
    await target.close();
  });
  expect(server.findExport('disk0')!.native, 'the export takes the native data path').toBeDefined();
  return { dir, server, target, tracker, imagePath, port, uri: `nbd://127.0.0.1:${port}/disk0`, warnings };
}

export async function peer(port: number, cleanups: Cleanups): Promise<RawPeer> {
  const p = await RawPeer.connect(port);
  cleanups.push(() => p.destroy());
  return p;
}

export async function waitIdle(server: NbdServer, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (server.connectionCount > 0) {
    if (Date.now() > deadline) throw new Error(`${server.connectionCount} connections never ended`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Seals the active log and returns every logged write, in log order, with its data. */
export async function loggedWrites(t: NativeTap): Promise<{ offset: number; data: Buffer }[]> {
  const sealed = await t.tracker.rotate();
  const out: { offset: number; data: Buffer }[] = [];
  for (const log of t.tracker.sealedLogs()) {
    const file = await HrlLogFile.open(log.path);
    try {
      const verified = await file.verify();
      for await (const e of file.entries(verified)) out.push({ offset: e.byteOffset, data: Buffer.from(await file.readPayload(e, 0, e.dataLength)) });
    } finally {
      await file.close();
    }
  }
  expect(sealed).toBeDefined();
  return out;
}

/** Applies every sealed log to a zeroed copy and expects the tapped disk. */
export async function expectLogsRebuildDisk(t: NativeTap): Promise<void> {
  await t.tracker.rotate();
  const copyPath = path.join(t.dir, 'copy.img');
  const copy = await RawTarget.open(copyPath, { create: { sizeBytes: t.target.sizeBytes } });
  try {
    await applyHrlLogs(copy, t.tracker.sealedLogs().map((l) => l.path));
  } finally {
    await copy.close();
  }
  expect(fs.readFileSync(copyPath).equals(fs.readFileSync(t.imagePath))).toBe(true);
}

/** The shared seeded generator (mulberry32), under the name these tests use. */
export { prng as seededRandom } from '../helpers/prng';

/**
 * A disk that can really hang: a raw image served by qemu-nbd and mounted as
 * a file through nbdfuse (FUSE). While qemu-nbd is stopped (SIGSTOP) every
 * write to the file blocks in the kernel, as on a dead storage path.
 */
export interface HangableDisk {
  /** The FUSE file to open as the disk. */
  readonly path: string;
  /** Writes to the file block from now on. */
  hang(): void;
  /** Blocked writes complete. */
  recover(): void;
  /** The pid of the qemu-nbd process (for a watchdog that resumes it from outside). */
  readonly serverPid: number;
}

/**
 * Mounts a `sizeBytes` raw image as a hangable disk under `dir`, or returns
 * undefined where this machine cannot (no /dev/fuse); missing tools fail in CI.
 */
export async function hangableDisk(dir: string, sizeBytes: number, cleanups: Cleanups): Promise<HangableDisk | undefined> {
  if (!requireTool('qemu-nbd') || !requireTool('nbdfuse')) return undefined;
  if (!fs.existsSync('/dev/fuse')) return undefined;
  const image = path.join(dir, 'backing.img');
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, sizeBytes);
  const sock = path.join(dir, 'qemu-nbd.sock');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const children: ChildProcess[] = [];
  const qemu = spawn('qemu-nbd', ['-f', 'raw', '-k', sock, '--persistent', image], { stdio: 'ignore' });
  children.push(qemu);
  let mounted = false;
  cleanups.push(async () => {
    if (qemu.pid !== undefined) process.kill(qemu.pid, 'SIGCONT');
    if (mounted) {
      try {
        execFileSync('umount', [mnt], { stdio: 'ignore' });
      } catch {
        execFileSync('umount', ['-l', mnt], { stdio: 'ignore' });
      }
    }
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
    await Promise.all(children.map((c) => (c.exitCode === null && c.signalCode === null ? new Promise((r) => c.once('exit', r)) : undefined)));
  });
  await waitFor(() => fs.existsSync(sock), 'qemu-nbd socket');
  const fuse = spawn('nbdfuse', [path.join(mnt, 'disk'), '--unix', sock], { stdio: 'ignore' });
  children.push(fuse);
  mounted = true;
  const file = path.join(mnt, 'disk');
  await waitFor(() => fs.existsSync(file) && fs.statSync(file).size === sizeBytes, 'nbdfuse mount');
  const pid = qemu.pid!;
  return {
    path: file,
    serverPid: pid,
    hang: () => process.kill(pid, 'SIGSTOP'),
    recover: () => process.kill(pid, 'SIGCONT'),
  };
}

async function waitFor(check: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`${what} did not come up`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
