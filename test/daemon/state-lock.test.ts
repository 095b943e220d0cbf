import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { StateLock } from '../../src/daemon/state-lock';
import { REPO_ROOT } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const TSX_LOADER = pathToFileURL(path.join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;
const RACER = path.join(__dirname, 'state-lock-racer.ts');

/** Starts a racer; resolves with what it printed once it exits. */
function racer(dir: string, goFile: string, holdMs: number): { output: Promise<string>; pid: number } {
  const child = spawn(process.execPath, ['--import', TSX_LOADER, RACER, dir, goFile, String(holdMs)], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  return { pid: child.pid!, output: new Promise((resolve) => child.on('close', () => resolve(out.trim()))) };
}

describe('state lock', () => {
  it('lets exactly one of several instances starting together over a dead owner\'s lock in', async () => {
    const dir = tempDir();
    // A killed owner's lock: a pid that cannot be running.
    fs.writeFileSync(path.join(dir, 'blockrelay.lock'), '2147483646\n');
    const goFile = path.join(dir, 'go');
    const racers = Array.from({ length: 6 }, () => racer(dir, goFile, 1500));
    // Every racer is loaded and polling before the go.
    await new Promise((resolve) => setTimeout(resolve, 4000));
    fs.writeFileSync(goFile, '');
    const outputs = await Promise.all(racers.map((r) => r.output));
    expect(outputs.filter((o) => o === 'won'), outputs.join(',')).toHaveLength(1);
    expect(outputs.filter((o) => o === 'BR_LOCKED')).toHaveLength(5);
    expect(fs.existsSync(path.join(dir, 'blockrelay.lock'))).toBe(false);
  }, 30_000);

  it('refuses while a live process holds it, naming it, and is free the moment that process is killed', async () => {
    const dir = tempDir();
    const goFile = path.join(dir, 'go');
    fs.writeFileSync(goFile, '');
    const holder = spawn(process.execPath, ['--import', TSX_LOADER, RACER, dir, goFile, '60000'], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve) => holder.stdout.once('data', () => resolve()));
    const lock = new StateLock(dir);
    expect(() => lock.acquire()).toThrow(expect.objectContaining({ code: 'BR_LOCKED', details: expect.objectContaining({ pid: holder.pid }) }));
    const gone = new Promise((resolve) => holder.on('close', resolve));
    holder.kill('SIGKILL');
    await gone;
    // The killed holder's file is still there, naming it, but holds nothing.
    expect(fs.readFileSync(lock.file, 'utf8').trim()).toBe(String(holder.pid));
    lock.acquire();
    expect(fs.readFileSync(lock.file, 'utf8').trim()).toBe(String(process.pid));
    lock.release();
    expect(fs.existsSync(lock.file)).toBe(false);
  }, 30_000);
});
