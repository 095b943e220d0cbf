import { spawn } from 'node:child_process';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { hangableDisk, MiB, useCleanups } from './native-tap-fixtures';

const tempDir = useTempDirs();
const cleanups = useCleanups();
const TSX_LOADER = pathToFileURL(path.join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;
const CHILD = path.join(__dirname, 'native-teardown-child.ts');

describe('native tap at environment teardown', () => {
  it.each([
    { stuck: 'write', what: "an export's writer thread in a WRITE" },
    { stuck: 'read', what: 'a connection thread in a READ' },
  ])('lives through $what on a hung disk that ends after its worker thread is gone', async ({ stuck }) => {
    const dir = tempDir();
    const disk = await hangableDisk(dir, 16 * MiB, cleanups);
    if (disk === undefined) return;
    cleanups.push(() => disk.recover());
    const child = spawn(process.execPath, ['--import', TSX_LOADER, CHILD, disk.path, dir, String(disk.serverPid), stuck], { stdio: ['ignore', 'pipe', 'pipe'] });
    cleanups.push(() => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('exit', (c, s) => resolve([c, s])));
    // Before: SIGSEGV (the addon's code unmapped with the worker's
    // environment), then SIGABRT (a post to, or release of, a thread-safe
    // function the teardown had freed); with a READ, the worker never got
    // to end (the server waited for the connection's socket).
    expect({ code, signal }, out).toEqual({ code: 0, signal: null });
    expect(out).toContain('SURVIVED');
  }, 30_000);
});
