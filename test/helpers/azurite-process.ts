import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';

/**
 * Starts the Azurite blob emulator from node_modules (never Docker) on
 * 127.0.0.1 and a free port, in memory. Free of vitest so benchmarks use it
 * too; tests use `useAzurite()` from `./azurite`.
 */

const REPO_ROOT = path.resolve(__dirname, '..', '..');
const AZURITE_BLOB_MAIN = path.join(REPO_ROOT, 'node_modules', 'azurite', 'dist', 'src', 'blob', 'main.js');

/** The emulator's well-known development account (public, documented by Microsoft). */
export const AZURITE_ACCOUNT_NAME = 'devstoreaccount1';
export const AZURITE_ACCOUNT_KEY = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';

const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 5_000;
/** Upper bound on Azurite's in-memory extent store, so a runaway test cannot eat the machine. */
const EXTENT_MEMORY_LIMIT_MB = 2048;
const START_ATTEMPTS = 3;

export interface AzuriteInstance {
  readonly port: number;
  /** `http://127.0.0.1:PORT/devstoreaccount1`: path-style, as Azurite serves accounts. */
  readonly blobEndpoint: string;
  /** A connection string for the development account on this instance. */
  readonly connectionString: string;
  /** Stops the emulator and removes its working directory. Idempotent. */
  stop(): Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

function waitForListening(child: ChildProcess, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let output = '';
    const timer = setTimeout(() => finish(new Error(`Azurite did not listen on port ${port} within ${START_TIMEOUT_MS} ms:\n${output}`)), START_TIMEOUT_MS);
    const onData = (chunk: Buffer): void => {
      output += chunk.toString();
      if (output.length > 64 * 1024) output = output.slice(-32 * 1024);
      if (output.includes('successfully listens on')) finish();
    };
    const onExit = (code: number | null): void => finish(new Error(`Azurite exited with ${code} before listening:\n${output}`));
    function finish(err?: Error): void {
      clearTimeout(timer);
      child.stdout?.off('data', onData);
      child.stderr?.off('data', onData);
      child.off('exit', onExit);
      // Keep draining the pipes so Azurite never blocks on a full one.
      child.stdout?.resume();
      child.stderr?.resume();
      if (err) reject(err);
      else resolve();
    }
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    child.on('exit', onExit);
  });
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

/** Starts one Azurite blob service; retries on a port race. */
export async function startAzurite(): Promise<AzuriteInstance> {
  let lastError: unknown;
  for (let attempt = 0; attempt < START_ATTEMPTS; attempt++) {
    const port = await freePort();
    // Azurite writes nothing with --inMemoryPersistence (which refuses
    // --location), but its working directory is a temp dir all the same.
    const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-azurite-'));
    const child = spawn(
      process.execPath,
      [
        AZURITE_BLOB_MAIN,
        '--inMemoryPersistence',
        '--extentMemoryLimit', String(EXTENT_MEMORY_LIMIT_MB),
        '--disableTelemetry',
        '--skipApiVersionCheck',
        '--silent',
        '--blobHost', '127.0.0.1',
        '--blobPort', String(port),
      ],
      { cwd: workDir, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    try {
      await waitForListening(child, port);
    } catch (err) {
      lastError = err;
      await stopChild(child);
      fs.rmSync(workDir, { recursive: true, force: true });
      continue;
    }
    const blobEndpoint = `http://127.0.0.1:${port}/${AZURITE_ACCOUNT_NAME}`;
    let stopped: Promise<void> | undefined;
    return {
      port,
      blobEndpoint,
      connectionString: `DefaultEndpointsProtocol=http;AccountName=${AZURITE_ACCOUNT_NAME};AccountKey=${AZURITE_ACCOUNT_KEY};BlobEndpoint=${blobEndpoint};`,
      stop() {
        stopped ??= stopChild(child).then(() => fs.rmSync(workDir, { recursive: true, force: true }));
        return stopped;
      },
    };
  }
  throw lastError;
}
