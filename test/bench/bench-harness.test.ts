import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { Summary } from '../../bench/report';
import { useTempDirs } from '../helpers/tmp';

const repoDir = path.join(__dirname, '..', '..');
const tsx = path.join(repoDir, 'node_modules', '.bin', 'tsx');

/** Small benches that each misbehave in one way the harness must survive. */
const FAKE_BENCHES: Record<string, string> = {
  // Left a result behind in an earlier run, writes nothing now.
  aged: `process.exit(0);`,
  broken: `process.stderr.write('something went wrong\\nBR_TEST_BROKEN: the bench broke\\n'); process.exit(3);`,
  fast: `
    import * as fs from 'node:fs';
    import * as path from 'node:path';
    const quick = process.argv.includes('--quick');
    const result = { bench: 'fast', quick, peer: 'a plain loop', ratios: { 'fast vs plain loop': 2.5 }, figures: { 'loop ms': 12, quick } };
    fs.mkdirSync(path.join(__dirname, 'results'), { recursive: true });
    fs.writeFileSync(path.join(__dirname, 'results', 'fast.json'), JSON.stringify(result));
    console.log(JSON.stringify(result));`,
  notool: `
    import { execFileSync } from 'node:child_process';
    execFileSync('blockrelay-no-such-tool', ['--version']);`,
  selfskip: `process.stderr.write('needs /dev/kvm\\n'); process.exit(77);`,
  // Starts a helper process and never finishes: the harness must end both.
  slow: `
    import { spawn } from 'node:child_process';
    import * as fs from 'node:fs';
    import * as path from 'node:path';
    const helper = spawn('sleep', ['300'], { stdio: 'ignore' });
    fs.writeFileSync(path.join(__dirname, 'slow-helper.pid'), String(helper.pid));
    setInterval(() => {}, 1000);`,
};

/** Running, as opposed to gone or a zombie (an init that does not reap leaves those). */
function running(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

describe('bench harness (bench/run.ts)', () => {
  const tmp = useTempDirs();

  it('reports failures, skips, missing tools and timeouts in the doc, ends what a timed-out bench started, and reads only fresh results', () => {
    const benchDir = tmp();
    for (const [name, source] of Object.entries(FAKE_BENCHES)) fs.writeFileSync(path.join(benchDir, `${name}.bench.ts`), source);
    fs.mkdirSync(path.join(benchDir, 'results'));
    const agedResult = path.join(benchDir, 'results', 'aged.json');
    fs.writeFileSync(agedResult, JSON.stringify({ ratios: { old: 9 } }));
    fs.utimesSync(agedResult, new Date('2026-01-01'), new Date('2026-01-01'));
    const docFile = path.join(benchDir, 'benchmarks.md');

    const started = Date.now();
    const run = spawnSync(tsx, [path.join(repoDir, 'bench', 'run.ts'), '--quick', '--budget-seconds', '20', '--bench-dir', benchDir, '--doc', docFile], { cwd: repoDir, encoding: 'utf8', timeout: 45_000 });
    const tookMs = Date.now() - started;
    expect(run.status, run.stderr).toBe(0);
    // The 20 s budget holds, plus start-up, the 2 s kill grace and 1 s output drain.
    expect(tookMs).toBeLessThan(30_000);

    const summary = JSON.parse(fs.readFileSync(path.join(benchDir, 'results', 'summary.json'), 'utf8')) as Summary;
    const byName = new Map(summary.benches.map((b) => [b.name, b]));
    expect(summary.benches.map((b) => b.name)).toEqual(['aged', 'broken', 'fast', 'notool', 'selfskip', 'slow']);
    expect(byName.get('aged')).toMatchObject({ status: 'failed', reason: 'exited 0 but wrote no result JSON' });
    expect(byName.get('broken')).toMatchObject({ status: 'failed', reason: 'exit status 3: BR_TEST_BROKEN: the bench broke' });
    expect(byName.get('fast')).toMatchObject({ status: 'ok', result: { ratios: { 'fast vs plain loop': 2.5 }, figures: { 'loop ms': 12, quick: true }, peer: 'a plain loop' } });
    expect(byName.get('notool')).toMatchObject({ status: 'skipped', reason: 'tool blockrelay-no-such-tool missing' });
    expect(byName.get('selfskip')).toMatchObject({ status: 'skipped', reason: 'needs /dev/kvm' });
    expect(byName.get('slow')).toMatchObject({ status: 'timeout' });
    expect(summary.quick).toBe(true);
    expect(summary.machine.node).toBe(process.version);
    expect(summary.machine.commit).toMatch(/^[0-9a-f]{7,}$/);

    const helperPid = Number(fs.readFileSync(path.join(benchDir, 'slow-helper.pid'), 'utf8'));
    expect(running(helperPid)).toBe(false);

    const doc = fs.readFileSync(docFile, 'utf8');
    expect(doc).toContain('| fast | ok | 2.50× (fast vs plain loop) |');
    expect(doc).toContain('| notool | skipped: tool blockrelay-no-such-tool missing |');
    expect(doc).toMatch(/\| slow \| timeout: no result within \d+ s \|/);
    expect(run.stdout).toBe(doc);
  });
});
