/**
 * The bench harness: `npm run bench -- [--quick] [--only a,b] [--budget-seconds N]
 * [--bench-dir DIR] [--doc FILE]` (the last two for testing the harness itself).
 *
 * Discovers every `bench/*.bench.ts`, runs each as its own child process
 * (`tsx bench/NAME.bench.ts [--quick]`) one after another (two shared cores:
 * benches in parallel would measure each other), within one time budget,
 * then writes `bench/results/summary.json` and `docs/benchmarks.md`. Benches
 * that were quick in the last run go first, so what they leave of the budget
 * goes to the long ones.
 *
 * A bench that fails, times out or needs a missing tool is reported as such;
 * it never stops the harness. A bench skips itself by exiting with status 77
 * (the automake convention) or by writing a result with a `skipped` reason;
 * a child that dies on `spawn X ENOENT` is reported as "skipped: tool X
 * missing" too.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { judgeGoal, normaliseResult, renderMarkdown, runOrder, slotMs, type BenchRun, type Machine, type Summary } from './report';

const repoDir = path.dirname(__dirname);

/** `--quick` must finish in under two minutes in all, harness included. */
const QUICK_BUDGET_MS = 110_000;
const FULL_BUDGET_MS = 60 * 60_000;
/** Per-bench caps: a quick bench is meant to take under ~30 s. */
const QUICK_CAP_MS = 45_000;
const FULL_CAP_MS = 15 * 60_000;
/** After SIGTERM, a bench's process group gets this long before SIGKILL. */
const KILL_GRACE_MS = 2_000;
/** After a bench exits, how long its pipes may stay open before the harness stops reading. */
const OUTPUT_DRAIN_MS = 1_000;
/** Output kept per stream per child (the tail), to bound memory. */
const MAX_OUTPUT_CHARS = 256 * 1024;
/** The exit status a bench uses to say it skipped itself. */
const SKIP_EXIT_STATUS = 77;

interface Options {
  quick: boolean;
  only: Set<string> | undefined;
  budgetMs: number;
  /** Where the benches are; their results go to its `results/` folder. */
  benchDir: string;
  docFile: string;
}

function parseOptions(argv: string[]): Options {
  const quick = argv.includes('--quick');
  const value = (flag: string): string | undefined => {
    const i = argv.indexOf(flag);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const only = value('--only');
  const budget = value('--budget-seconds');
  const budgetMs = budget === undefined ? (quick ? QUICK_BUDGET_MS : FULL_BUDGET_MS) : Number(budget) * 1000;
  if (!Number.isFinite(budgetMs) || budgetMs <= 0) throw new Error(`--budget-seconds wants a positive number, got ${budget}`);
  return {
    quick,
    only: only === undefined ? undefined : new Set(only.split(',')),
    budgetMs,
    benchDir: path.resolve(value('--bench-dir') ?? __dirname),
    docFile: path.resolve(value('--doc') ?? path.join(repoDir, 'docs', 'benchmarks.md')),
  };
}

/** Every `*.bench.ts` beside this file, in name order. */
export function discoverBenches(dir: string = __dirname): string[] {
  return fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.bench.ts'))
    .map((f) => f.slice(0, -'.bench.ts'.length))
    .sort();
}

function git(args: string[]): string {
  try {
    return execFileSync('git', args, { cwd: repoDir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return '';
  }
}

function describeMachine(): Machine {
  let cpuModel = os.cpus()[0]?.model ?? 'unknown';
  try {
    const match = /^model name\s*:\s*(.+)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
    if (match) cpuModel = match[1]!.trim();
  } catch {
    // Not Linux: os.cpus() names the model too.
  }
  return {
    cpuModel,
    cores: os.cpus().length,
    memoryBytes: os.totalmem(),
    loadAverage1m: os.loadavg()[0] ?? 0,
    node: process.version,
    commit: git(['rev-parse', '--short', 'HEAD']) || 'unknown',
    dirty: git(['status', '--porcelain', '--untracked-files=no']) !== '',
    date: new Date().toISOString(),
  };
}

/** The tsx launcher: the project's own, else through npx. */
function tsxCommand(): [string, string[]] {
  const local = path.join(repoDir, 'node_modules', '.bin', 'tsx');
  return fs.existsSync(local) ? [local, []] : ['npx', ['tsx']];
}

interface ChildOutcome {
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  stdout: string;
  stderr: string;
  durationMs: number;
}

function runChild(file: string, args: string[], timeoutMs: number): Promise<ChildOutcome> {
  const [command, prefix] = tsxCommand();
  const started = performance.now();
  return new Promise((resolve) => {
    // Own process group, so a timeout also ends what the bench started
    // (qemu-nbd, Azurite, fio).
    const child = spawn(command, [...prefix, file, ...args], { cwd: repoDir, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
      stdout = (stdout + chunk).slice(-MAX_OUTPUT_CHARS);
    });
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
      stderr = (stderr + chunk).slice(-MAX_OUTPUT_CHARS);
      process.stderr.write(chunk);
    });
    const killGroup = (signal: NodeJS.Signals): void => {
      try {
        if (child.pid !== undefined) process.kill(-child.pid, signal);
      } catch {
        // Already gone.
      }
    };
    let killTimer: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup('SIGTERM');
      killTimer = setTimeout(() => killGroup('SIGKILL'), KILL_GRACE_MS);
    }, timeoutMs);
    child.on('error', (err) => {
      stderr += `\n${err.message}`;
    });
    let settled = false;
    const finish = (exitCode: number | null, signal: NodeJS.Signals | null): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      clearTimeout(killTimer);
      // Children of the bench may outlive it; end the group either way.
      killGroup('SIGKILL');
      child.stdout.destroy();
      child.stderr.destroy();
      resolve({ exitCode, signal, timedOut, stdout, stderr, durationMs: performance.now() - started });
    };
    child.on('close', finish);
    // A grandchild that left the group can hold the pipes open after the
    // bench exits: give its output a moment to drain, then stop waiting.
    child.on('exit', (exitCode, signal) => {
      setTimeout(() => finish(exitCode, signal), OUTPUT_DRAIN_MS);
    });
  });
}

/** The bench's result: its results file if written during this run, else the JSON it printed. */
function readResult(resultsDir: string, name: string, startedAtMs: number, stdout: string): unknown {
  const file = path.join(resultsDir, `${name}.json`);
  try {
    if (fs.statSync(file).mtimeMs >= startedAtMs) return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    // Not written this run (or unreadable): fall back to stdout.
  }
  const start = stdout.search(/^\{/m);
  if (start < 0) return undefined;
  try {
    return JSON.parse(stdout.slice(start));
  } catch {
    return undefined;
  }
}

function lastLine(text: string): string {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  const line = lines[lines.length - 1] ?? '';
  return line.length > 200 ? `${line.slice(0, 197)}...` : line;
}

/** "tool X missing" when the child died for lack of an executable. */
function missingTool(stderr: string): string | undefined {
  const m = /spawn(?:Sync)? (\S+) ENOENT/.exec(stderr) ?? /(?:^|\s)([\w.-]+): (?:command )?not found/m.exec(stderr);
  return m ? `tool ${path.basename(m[1]!)} missing` : undefined;
}

async function runBench(benchDir: string, name: string, quick: boolean, timeoutMs: number): Promise<BenchRun> {
  const startedAtMs = Date.now();
  process.stderr.write(`bench: ${name} (up to ${(timeoutMs / 1000).toFixed(0)} s)\n`);
  const outcome = await runChild(path.join(benchDir, `${name}.bench.ts`), quick ? ['--quick'] : [], timeoutMs);
  const raw = outcome.timedOut ? undefined : readResult(path.join(benchDir, 'results'), name, startedAtMs, outcome.stdout);
  const durationMs = Math.round(outcome.durationMs);
  const skippedReason = typeof (raw as { skipped?: unknown } | undefined)?.skipped === 'string' ? (raw as { skipped: string }).skipped : undefined;
  if (outcome.timedOut) {
    return { name, status: 'timeout', durationMs, reason: `no result within ${(timeoutMs / 1000).toFixed(0)} s`, goal: judgeGoal(name, undefined) };
  }
  if (outcome.exitCode === SKIP_EXIT_STATUS || skippedReason !== undefined) {
    return { name, status: 'skipped', durationMs, reason: skippedReason ?? (lastLine(outcome.stderr) || 'the bench skipped itself'), goal: judgeGoal(name, undefined) };
  }
  if (outcome.exitCode !== 0) {
    const tool = missingTool(outcome.stderr);
    if (tool !== undefined) return { name, status: 'skipped', durationMs, reason: tool, goal: judgeGoal(name, undefined) };
    const how = outcome.signal !== null ? `killed by ${outcome.signal}` : `exit status ${outcome.exitCode}`;
    const result = raw === undefined ? undefined : normaliseResult(name, raw);
    return { name, status: 'failed', durationMs, reason: `${how}: ${lastLine(outcome.stderr) || 'no message'}`, ...(result ? { result } : {}), goal: judgeGoal(name, result, raw) };
  }
  if (raw === undefined) {
    return { name, status: 'failed', durationMs, reason: 'exited 0 but wrote no result JSON', goal: judgeGoal(name, undefined) };
  }
  const result = normaliseResult(name, raw);
  return { name, status: 'ok', durationMs, result, goal: judgeGoal(name, result, raw) };
}

/** The last run's summary in the same mode, for the run order; undefined if none. */
function readPreviousSummary(file: string, quick: boolean): Summary | undefined {
  try {
    const previous = JSON.parse(fs.readFileSync(file, 'utf8')) as Summary;
    return previous.quick === quick && Array.isArray(previous.benches) ? previous : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Writes back the dirty pages the previous scenario left (quick when there
 * are none), then, where this process may (root), drops the clean page
 * cache too, so every scenario starts from the same cache state: the apply
 * stage measured 2x apart on this VM between a run after a full test suite
 * (7 GiB cached) and one after a drop. BENCH_KEEP_CACHES=1 keeps them.
 * Returns whether the cache was dropped (recorded in the summary).
 */
function settle(): boolean {
  spawnSync('sync');
  if (process.env.BENCH_KEEP_CACHES === '1') return false;
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const started = performance.now();
  const machine = describeMachine();
  const resultsDir = path.join(options.benchDir, 'results');
  const summaryFile = path.join(resultsDir, 'summary.json');
  const names = runOrder(
    discoverBenches(options.benchDir).filter((n) => options.only === undefined || options.only.has(n)),
    readPreviousSummary(summaryFile, options.quick),
  );
  const capMs = options.quick ? QUICK_CAP_MS : FULL_CAP_MS;
  const benches: BenchRun[] = [];
  for (const [i, name] of names.entries()) {
    const remainingMs = options.budgetMs - (performance.now() - started);
    const timeoutMs = slotMs(remainingMs, names.length - i, capMs);
    if (timeoutMs === 0) {
      benches.push({ name, status: 'not-run', durationMs: 0, reason: 'the time budget was spent', goal: judgeGoal(name, undefined) });
      continue;
    }
    // Each scenario starts on a settled machine: the gigabytes an earlier one
    // wrote (e2e, tap) would otherwise be written back during the next one's
    // timing and slow it and its peer unevenly.
    const cachesDropped = settle();
    const run = { ...(await runBench(options.benchDir, name, options.quick, timeoutMs)), cachesDropped };
    process.stderr.write(`bench: ${name}: ${run.status}${run.reason ? ` (${run.reason})` : ''} in ${(run.durationMs / 1000).toFixed(1)} s\n`);
    benches.push(run);
  }
  benches.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const summary: Summary = { machine, quick: options.quick, budgetMs: options.budgetMs, totalMs: Math.round(performance.now() - started), benches };
  fs.mkdirSync(resultsDir, { recursive: true });
  fs.writeFileSync(summaryFile, `${JSON.stringify(summary, null, 2)}\n`);
  const doc = renderMarkdown(summary);
  fs.mkdirSync(path.dirname(options.docFile), { recursive: true });
  fs.writeFileSync(options.docFile, doc);
  process.stdout.write(doc);
}

if (require.main === module) {
  main().catch((err: unknown) => {
    process.stderr.write(`bench harness: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exitCode = 1;
  });
}
