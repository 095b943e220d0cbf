import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROLE_THREADPOOL_SIZE, defaultThreadPoolSize } from '../../src/daemon/thread-pool';
import { REPO_ROOT } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';

/**
 * tsx's CommonJS hook (`--require`), not its ESM loader: the probe then
 * loads the CLI the way the built `dist/daemon/cli.js` loads, by
 * synchronous require, in order.
 */
const TSX_CJS = path.join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'cjs', 'index.cjs');
const CLI = path.join(REPO_ROOT, 'src', 'daemon', 'cli.ts');
/** How long a write and fsync of a healthy file may take before the probe calls it stalled (generous: the test machine is shared and its disk busy). */
const STALL_MS = 5000;

/**
 * The child: optionally loads the CLI entry first (as `blockrelay ROLE`
 * does), then holds `hung` pool threads with reads of FIFOs nobody writes
 * (each blocks in open(2) on a pool thread, as a read from a dead datastore
 * does), then writes and fsyncs another file, the way a healthy disk's log
 * is made durable, and reports whether that finished within STALL_MS.
 */
function probeScript(withCli: boolean): string {
  // CommonJS, as the built CLI (dist/daemon/cli.js) runs: modules load synchronously, in order.
  return `${withCli ? `import ${JSON.stringify(CLI)};\n` : ''}
import * as fs from 'node:fs';
import * as path from 'node:path';
async function main(): Promise<void> {
const [dir, hungArg] = process.argv.slice(2) as [string, string];
const hung = Number(hungArg);
const fifos = Array.from({ length: hung }, (_, i) => path.join(dir, 'hung-' + i + '.fifo'));
const reads = fifos.map((f) => fs.promises.readFile(f).catch(() => undefined));
const started = Date.now();
const healthy = (async () => {
  await new Promise((r) => setTimeout(r, 200));
  const t0 = Date.now();
  const h = await fs.promises.open(path.join(dir, 'healthy.log'), 'w');
  await h.write(Buffer.alloc(4096, 1), 0, 4096, 0);
  await h.sync();
  await h.close();
  return Date.now() - t0;
})();
const timeout = new Promise<undefined>((r) => setTimeout(() => r(undefined), ${STALL_MS} + 200));
const ms = await Promise.race([healthy, timeout]);
// Release the hung readers (a writer appears, closes: they read EOF) so the pool can shut down.
// A read still queued behind a full pool has no reader yet (ENXIO): retry it once threads free up.
for (const f of fifos) {
  for (let attempt = 0; ; attempt++) {
    try {
      fs.closeSync(fs.openSync(f, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK));
      break;
    } catch (err) {
      if ((err as { code?: string }).code !== 'ENXIO' || attempt >= 200) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
await Promise.all(reads);
if (ms === undefined) await healthy;
process.stdout.write(JSON.stringify({ completedMs: ms ?? null, pool: process.env.UV_THREADPOOL_SIZE ?? null, elapsedMs: Date.now() - started }) + '\\n');
}
void main();
`;
}

interface Probe {
  /** Milliseconds the healthy write and fsync took, or null when it had not finished within STALL_MS. */
  completedMs: number | null;
  pool: string | null;
}

describe('libuv thread pool: a hung disk and the others', () => {
  const tmp = useTempDirs();

  async function probe(hung: number, options: { withCli: boolean; pool?: string }): Promise<Probe> {
    const dir = tmp();
    for (let i = 0; i < hung; i++) {
      const fifo = path.join(dir, `hung-${i}.fifo`);
      const made = spawnSyncMkfifo(fifo);
      expect(made).toBe(0);
    }
    const script = path.join(dir, 'probe.cts');
    fs.writeFileSync(script, probeScript(options.withCli));
    // TSX_DISABLE_CACHE: tsx writes its transform cache with asynchronous
    // fs calls, which start the pool (at 4) before the CLI's first module
    // runs; the built CLI under plain node has no such writes.
    const env: NodeJS.ProcessEnv = { ...process.env, UV_USE_IO_URING: '0', TSX_DISABLE_CACHE: '1' };
    delete env.UV_THREADPOOL_SIZE;
    if (options.pool !== undefined) env.UV_THREADPOOL_SIZE = options.pool;
    return new Promise((resolve, reject) => {
      const child = spawn(process.execPath, ['--require', TSX_CJS, script, dir, String(hung)], { env, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      child.stdout.on('data', (d) => { out += d; });
      child.stderr.on('data', (d) => { err += d; });
      const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
      child.on('error', reject);
      child.on('close', (status) => {
        clearTimeout(timer);
        if (status !== 0) return reject(new Error(`probe exited ${status}: ${err}`));
        resolve(JSON.parse(out.trim()) as Probe);
      });
    });
  }

  it('without the CLI entry (libuv default, 4 threads) four hung reads stall every other file fsync', async () => {
    const stalled = await probe(4, { withCli: false });
    expect(stalled).toMatchObject({ completedMs: null, pool: null });
    // The same fsync with three hung reads goes through: the pool, not the disk, was the limit.
    const free = await probe(3, { withCli: false });
    expect(free.completedMs).not.toBeNull();
  }, 50_000);

  it(`the CLI entry starts the pool with ${ROLE_THREADPOOL_SIZE} threads before anything uses it`, async () => {
    // Five hung reads: what one hung sparse VMDK target can hold (readMany's 4 reads and a writeback sync).
    const oneHungDisk = await probe(5, { withCli: true });
    expect(oneHungDisk.pool).toBe(String(ROLE_THREADPOOL_SIZE));
    expect(oneHungDisk.completedMs).not.toBeNull();
    // And the bound is real: as many hung reads as threads stall the rest again.
    expect((await probe(ROLE_THREADPOOL_SIZE, { withCli: true })).completedMs).toBeNull();
  }, 55_000);

  it('an operator-set UV_THREADPOOL_SIZE wins over the default', async () => {
    const probed = await probe(6, { withCli: true, pool: '6' });
    expect(probed).toMatchObject({ completedMs: null, pool: '6' });
    expect((await probe(5, { withCli: true, pool: '6' })).completedMs).not.toBeNull();
  }, 50_000);

  it('defaultThreadPoolSize sets the default only where nothing is set', () => {
    const unset: NodeJS.ProcessEnv = {};
    expect(defaultThreadPoolSize(unset)).toBe('16');
    expect(unset.UV_THREADPOOL_SIZE).toBe('16');
    const blank: NodeJS.ProcessEnv = { UV_THREADPOOL_SIZE: ' ' };
    expect(defaultThreadPoolSize(blank)).toBe('16');
    const operator: NodeJS.ProcessEnv = { UV_THREADPOOL_SIZE: '64' };
    expect(defaultThreadPoolSize(operator)).toBe('64');
    expect(operator.UV_THREADPOOL_SIZE).toBe('64');
  });
});

function spawnSyncMkfifo(file: string): number | null {
  // node has no mkfifo; coreutils' is on every machine the tests run on.
  return require('node:child_process').spawnSync('mkfifo', [file]).status as number | null;
}
