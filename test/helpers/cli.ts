import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';

export const REPO_ROOT = path.resolve(__dirname, '..', '..');
/**
 * tsx is loaded into the one node process (`--import`), not through the tsx
 * CLI, which runs the script in a child: a SIGKILL sent to the pid a test
 * holds must reach blockrelay itself.
 */
const TSX_LOADER = pathToFileURL(path.join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;
const CLI = path.join(REPO_ROOT, 'src', 'daemon', 'cli.ts');

export interface CliResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs `blockrelay ARGS` from the TypeScript sources (through tsx), so tests
 * always exercise the code on disk without a build step.
 */
export function runCli(args: string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number; cwd?: string } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', TSX_LOADER, CLI, ...args], {
      cwd: options.cwd ?? REPO_ROOT,
      env: { ...process.env, ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => { stdout += d; });
    child.stderr.on('data', (d) => { stderr += d; });
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 120_000);
    child.on('error', reject);
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({ status, signal, stdout, stderr });
    });
  });
}

/** The command line that starts the CLI from sources, for tests that manage the child themselves. */
export function cliCommand(args: string[]): { command: string; args: string[] } {
  return { command: process.execPath, args: ['--import', TSX_LOADER, CLI, ...args] };
}

/** What `blockrelay source` prints once it serves (src/tap/source-command.ts SOURCE_READY_PREFIX). */
export interface SourceReady {
  readonly listen: string;
  readonly exports: Record<string, string>;
  readonly logDir: string;
  readonly control?: string;
}

/** A `blockrelay source` child, started from sources, once it is ready. */
export interface SourceCli {
  readonly child: ChildProcess;
  readonly ready: SourceReady;
  /** What it wrote to stderr so far (for failure messages). */
  stderr(): string;
  /** Sends SIGTERM and resolves with the exit status. */
  stop(): Promise<number | null>;
}

/** Starts `blockrelay source ARGS` and waits for its ready line; rejects if it exits first. */
export async function startSourceCli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<SourceCli> {
  const { command, args: argv } = cliCommand(['source', ...args]);
  const child = spawn(command, argv, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, LOG_LEVEL: 'warn', ...env } });
  let stderr = '';
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const ready = await new Promise<SourceReady>((resolve, reject) => {
    child.stderr!.on('data', (d) => {
      stderr += d;
      const m = /BLOCKRELAY_SOURCE_READY (.*)\n/.exec(stderr);
      if (m) resolve(JSON.parse(m[1]!) as SourceReady);
    });
    void exited.then(() => reject(new Error(`source exited before it was ready: ${stderr}`)));
  });
  return {
    child,
    ready,
    stderr: () => stderr,
    stop: () => {
      child.kill('SIGTERM');
      return exited;
    },
  };
}
