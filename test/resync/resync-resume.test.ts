import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockHasher } from '../../src/resync/block-hasher';
import { decodeState } from '../../src/resync/resync-state-format';
import { REPO_ROOT, runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { writeImagePair } from './image-pair';
import { seededRandom } from './seeded-random';

const MiB = 1024 * 1024;
const tempDir = useTempDirs();

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The saved cursor, or undefined while no state file exists. */
function savedCursor(statePath: string, hasher: BlockHasher): number | undefined {
  if (!fs.existsSync(statePath)) return undefined;
  return decodeState(fs.readFileSync(statePath), statePath, hasher).cursorBytes;
}

describe.skipIf(!requireTool('qemu-img'))('interrupted resync (SIGKILL)', () => {
  it('resumes after being killed at random points and converges without starting over', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const dst = path.join(dir, 'target.img');
    const statePath = path.join(dir, 'resync.state');
    const sizeBytes = 64 * MiB;
    writeImagePair(src, dst, sizeBytes, 400, 77);
    const hasher = await BlockHasher.create();
    const random = seededRandom(2026);
    // Slow reads (16 MiB/s, 4 s a pass) so kills land mid-way; checkpoints every 100 ms.
    const args = ['resync', `raw:${src}`, `raw:${dst}`, '--state', statePath, '--max-read-rate', String(16 * MiB), '--checkpoint-ms', '100', '--json'];

    const cursors: number[] = [];
    for (let kills = 0; kills < 3;) {
      // One process (node with the tsx loader), not the tsx CLI, which runs
      // the program in a grandchild that SIGKILL of the parent would miss.
      const child = spawn(process.execPath, ['--import', 'tsx', path.join(REPO_ROOT, 'src', 'daemon', 'cli.ts'), ...args], { cwd: REPO_ROOT, stdio: 'ignore' });
      const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
      let ended = false;
      void exited.then(() => { ended = true; });
      // Wait for this run to save progress beyond what the last one saved, then kill it a random moment later.
      const before = savedCursor(statePath, hasher) ?? 0;
      const deadline = Date.now() + 30_000;
      while (!ended && (savedCursor(statePath, hasher) ?? 0) <= before && Date.now() < deadline) await sleep(20);
      await sleep(Math.floor(random() * 400));
      if (ended) break; // it finished before the kill: nothing left to interrupt
      child.kill('SIGKILL');
      await exited;
      kills++;
      const cursor = savedCursor(statePath, hasher);
      expect(cursor).toBeDefined();
      cursors.push(cursor!);
    }
    expect(cursors).toHaveLength(3);
    // Progress only grows from one attempt to the next.
    for (let i = 1; i < cursors.length; i++) expect(cursors[i]).toBeGreaterThan(cursors[i - 1]);
    expect(cursors[2]).toBeLessThan(sizeBytes);

    const last = await runCli(args, { timeoutMs: 30_000 });
    expect(last.status, last.stderr).toBe(0);
    const result = JSON.parse(last.stdout) as Record<string, number>;
    expect(result.resumedFromBytes).toBe(cursors[2]);
    expect(result.blocksCompared).toBe((sizeBytes - cursors[2]) / 4096);
    expect(result.blocksCompared).toBeLessThan(sizeBytes / 4096);
    expect(fs.existsSync(statePath)).toBe(false);
    const cmp = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, dst], { encoding: 'utf8' });
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
  });
});
