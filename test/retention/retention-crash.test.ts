import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { failover, loadPoints } from '../../src/retention/failover';
import { PointCatalog } from '../../src/retention/recovery-points';
import { diskRetentionPaths } from '../../src/retention/retention-format';
import { getDiskState, sendLog } from '../../src/transport/log-client';
import type { LogEnvelope } from '../../src/transport/transport-protocol';
import { REPO_ROOT } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { SECRET } from '../transport/transport-fixture';
import { makePatternLog, prng, retentionSetup, useRetentionDirs } from './retention-fixture';

const DISK = 8 * 1024 * 1024;
const LOGS = 16;

/** Starts `blockrelay master-target --config FILE`; resolves with its URL once it listens. */
function startChild(configFile: string): Promise<{ child: ChildProcess; url: string }> {
  // The CLI through `--import tsx` runs in this one process: through tsx's own CLI it would run in a
  // grandchild that a SIGKILL of the parent leaves running.
  const child = spawn(process.execPath, ['--import', 'tsx', path.join(REPO_ROOT, 'src', 'daemon', 'cli.ts'), 'master-target', '--config', configFile], { cwd: REPO_ROOT, stdio: ['ignore', 'ignore', 'pipe'] });
  let text = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`master target did not start: ${text}`)), 30_000);
    child.stderr!.on('data', (d: Buffer) => {
      text += d.toString();
      const m = /master-target listening on (\S+)/.exec(text);
      if (m) {
        clearTimeout(timer);
        resolve({ child, url: m[1]! });
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`master target exited ${code}: ${text}`));
    });
  });
}

/** The master target's applied sequence number (its disk state answer carries it beside nextSeq). */
async function appliedSeq(peer: { url: string; secret: string }): Promise<number | null> {
  return ((await getDiskState(peer, 'disk0')) as unknown as { appliedSeq: number | null }).appliedSeq;
}

function killed(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
}

describe('retention across a SIGKILL of the master target', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const children: ChildProcess[] = [];
  afterEach(async () => {
    for (const c of children.splice(0)) {
      if (c.exitCode === null && c.signalCode === null) {
        c.kill('SIGKILL');
        await killed(c);
      }
    }
  });

  it('rebuilds every point exactly after kills while journaling and applying', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const rand = prng(2024);
    const model = Buffer.alloc(DISK);
    const images: Buffer[] = [];
    const logs: Array<{ file: string; envelope: LogEnvelope }> = [];
    const t0 = Date.now() - 2 * 3_600_000;
    for (let seq = 1; seq <= LOGS; seq++) {
      // Large logs (about 2 MiB of writes each) so journaling and applying take long enough to be interrupted.
      logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: t0 + seq * 60_000, writes: 128, ...(seq % 7 === 0 ? { appTag: `app-${seq}` } : {}) }, model, rand));
      images.push(Buffer.from(model));
    }

    const kills = [120, 60, 250, 30, 180];
    // Journaling and applying are fast enough now that all five kills can
    // land between logs; then more rounds follow (bounded) until one lands
    // inside a log, so the test always exercises an interrupted apply.
    const maxRounds = 20;
    let round = 0;
    let interrupted = 0;
    const history = diskRetentionPaths(retentionDir, 'disk0');
    for (;;) {
      const { child, url } = await startChild(setup.configFile);
      children.push(child);
      const peer = { url, secret: SECRET };
      const state = await getDiskState(peer, 'disk0');
      const from = state.nextSeq ?? 1;
      const sending = (async () => {
        for (let seq = from; seq <= LOGS; seq++) await sendLog(peer, logs[seq - 1]!.envelope, logs[seq - 1]!.file);
      })().catch(() => undefined);
      if (round < kills.length || (interrupted === 0 && round < maxRounds && from <= LOGS)) {
        await new Promise((r) => setTimeout(r, kills[round % kills.length]! + Math.floor(rand() * 100)));
        child.kill('SIGKILL');
        await killed(child);
        await sending;
        // Evidence the kill interrupted a log: a pre-image (complete or temp) with no apply record after it.
        const journalNames = fs.existsSync(history.journalDir) ? fs.readdirSync(history.journalDir) : [];
        const contents = await new PointCatalog(history.catalog, 'disk0').read(null);
        if (contents.pending !== undefined || journalNames.some((n) => n.endsWith('.tmp'))) interrupted++;
        round++;
        continue;
      }
      await sending;
      for (let i = 0; i < 600; i++) {
        if ((await appliedSeq(peer)) === LOGS) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(await appliedSeq(peer)).toBe(LOGS);
      child.kill('SIGTERM');
      await killed(child);
      break;
    }

    expect(interrupted).toBeGreaterThan(0);
    expect(fs.readFileSync(setup.targetSpec('disk0').slice('raw:'.length)).equals(model)).toBe(true);
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => p.seq)).toEqual(Array.from({ length: LOGS }, (_, i) => i + 1));
    expect(points.filter((p) => p.kind === 'app').map((p) => p.name)).toEqual(['app-7', 'app-14']);
    for (const p of points) {
      const out = `raw:${path.join(dir, `p${p.seq}.img`)}`;
      await failover({ retentionDir, diskId: 'disk0', point: p.id, out });
      expect(fs.readFileSync(out.slice(4)).equals(images[p.seq - 1]!), `point ${p.id}`).toBe(true);
      fs.rmSync(out.slice(4));
    }
  }, 120_000);
});
