/**
 * The bench harness's pure half: turns each bench's own result JSON (their
 * shapes differ) into one normalised form, judges it against the goal its
 * issue set, and renders `docs/benchmarks.md`. `bench/run.ts` does the I/O.
 *
 * Ratio convention, for every ratio here: blockrelay's speed divided by the
 * peer's (the peer's median time over blockrelay's, or blockrelay's
 * throughput over the peer's). Above 1 means blockrelay is faster. A bench
 * may hand its ratios over already in that convention as a top-level
 * `ratios` object; the adapters below convert the older shapes.
 */

/** A figure as shown in the report: a number, a word, a yes/no, or null for "not measured". */
export type Figure = number | string | boolean | null;

/** One bench's result in the harness's common shape. */
export interface BenchResult {
  readonly name: string;
  /** Speed ratios against the peer (see the file comment for the convention). */
  readonly ratios: Record<string, number>;
  readonly figures: Record<string, Figure>;
  /** What blockrelay was measured against, in the same run. */
  readonly peer: string;
  readonly notes: string[];
}

export type BenchStatus = 'ok' | 'failed' | 'timeout' | 'skipped' | 'not-run';

/** Whether a result reaches the goal its issue set; `met` null when not judged. */
export interface Goal {
  readonly text: string;
  readonly met: boolean | null;
  /** Why it was not judged, when a needed figure is known to be missing. */
  readonly why?: string;
}

/** One bench as the harness ran it. */
export interface BenchRun {
  readonly name: string;
  readonly status: BenchStatus;
  readonly durationMs: number;
  /** Why it failed, timed out, was skipped or not run. */
  readonly reason?: string;
  readonly result?: BenchResult;
  readonly goal: Goal;
  /** The page cache was dropped before it started (bench/run.ts settle). */
  readonly cachesDropped?: boolean;
}

export interface Machine {
  readonly cpuModel: string;
  readonly cores: number;
  readonly memoryBytes: number;
  readonly loadAverage1m: number;
  readonly node: string;
  readonly commit: string;
  readonly dirty: boolean;
  /** ISO-8601 time the run started. */
  readonly date: string;
}

/** What `bench/results/summary.json` holds. */
export interface Summary {
  readonly machine: Machine;
  readonly quick: boolean;
  readonly budgetMs: number;
  readonly totalMs: number;
  readonly benches: BenchRun[];
}

/** At most this many figures are taken from a result of unknown shape. */
export const MAX_GENERIC_FIGURES = 24;

/** The least time a bench is given; with less left it is not started. */
export const MIN_SLOT_MS = 8_000;

/**
 * The order to run benches in: those that were quick last time first, then
 * those never seen, then those that timed out or failed, so the budget left
 * over by short benches goes to the long ones. Ties in name order.
 */
export function runOrder(names: readonly string[], previous: Pick<Summary, 'benches'> | undefined): string[] {
  const last = new Map((previous?.benches ?? []).map((b) => [b.name, b]));
  const rank = (name: string): [number, number] => {
    const b = last.get(name);
    if (b === undefined || b.status === 'not-run' || b.status === 'skipped') return [1, 0];
    return b.status === 'ok' ? [0, b.durationMs] : [2, b.durationMs];
  };
  return [...names].sort((a, b) => {
    const [ga, da] = rank(a);
    const [gb, db] = rank(b);
    return ga - gb || da - db || (a < b ? -1 : a > b ? 1 : 0);
  });
}

/**
 * How long the next bench may run: its fair share of what is left of the
 * budget, stretched to half again as much when that still leaves every
 * later bench its minimum slot, and never over the per-bench cap. Time a
 * bench does not use passes to the later ones.
 */
export function slotMs(remainingMs: number, benchesLeft: number, capMs: number): number {
  if (benchesLeft <= 0 || remainingMs < MIN_SLOT_MS) return 0;
  const fair = remainingMs / benchesLeft;
  const stretched = Math.min(fair * 1.5, remainingMs - (benchesLeft - 1) * MIN_SLOT_MS);
  return Math.floor(Math.min(capMs, Math.max(fair, stretched, MIN_SLOT_MS)));
}

type Json = Record<string, unknown>;

/** The goal text of scenarios whose issue set no target. */
export const NO_TARGET = 'none set; the ratio is reported';

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** The value at a dotted path, or undefined. */
function at(raw: unknown, path: string): unknown {
  let node: unknown = raw;
  for (const part of path.split('.')) {
    if (!isObject(node)) return undefined;
    node = node[part];
  }
  return node;
}

function num(raw: unknown, path: string): number | undefined {
  const v = at(raw, path);
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}

/** Collects only the entries whose value is defined. */
function defined<T>(entries: Array<[string, T | undefined]>): Record<string, T> {
  const out: Record<string, T> = {};
  for (const [k, v] of entries) if (v !== undefined) out[k] = v;
  return out;
}

/** peer time / our time, when both are known and positive. */
function speed(peerMs: number | undefined, oursMs: number | undefined): number | undefined {
  if (peerMs === undefined || oursMs === undefined || peerMs <= 0 || oursMs <= 0) return undefined;
  return peerMs / oursMs;
}

function scalar(v: unknown): Figure | undefined {
  // A bench writes null for a figure it could not measure; the report says so.
  if (v === null) return null;
  if (typeof v === 'number') return Number.isFinite(v) ? v : undefined;
  if (typeof v === 'boolean') return v;
  if (typeof v === 'string') return v.length > 120 ? `${v.slice(0, 117)}...` : v;
  return undefined;
}

type Adapter = (raw: Json) => Omit<BenchResult, 'name'>;

/** Adapters for the shapes the first benches wrote before `ratios` existed. */
const ADAPTERS: Record<string, Adapter> = {
  native: (raw) => ({
    ratios: defined([
      ['dirty map, random 4 KiB marks, batched', num(raw, 'dirtyMap.random4KiB.batchedRatio')],
      ['dirty map, random 4 KiB marks, one call each', num(raw, 'dirtyMap.random4KiB.ratio')],
      ['dirty map, sequential 4 KiB marks, batched', num(raw, 'dirtyMap.sequential4KiB.batchedRatio')],
      ['HRL checksum, best kernel', num(raw, 'checksum.ratio')],
    ]),
    figures: defined<Figure>([
      ['dirty map random marks/s (native, batched)', num(raw, 'dirtyMap.random4KiB.nativeBatchedMarksPerSecond')],
      ['dirty map random marks/s (peer)', num(raw, 'dirtyMap.random4KiB.peerMarksPerSecond')],
      ['dirty map memory bytes, random marks (native)', num(raw, 'dirtyMap.random4KiB.nativeMemoryBytes')],
      ['dirty map memory bytes (peer)', num(raw, 'dirtyMap.random4KiB.peerMemoryBytes')],
      ['checksum GB/s (native)', num(raw, 'checksum.nativeGBps')],
      ['checksum GB/s (plain loop)', num(raw, 'checksum.plainLoopGBps')],
      ['checksum kernel', scalar(at(raw, 'checksum.bestKernel'))],
    ]),
    peer: `${String(at(raw, 'dirtyMap.peer') ?? 'TypeScript bitmap')} (dirty map); plain TypeScript loop (checksum)`,
    notes: ['Marks on a 2 TiB disk; the native map stays sparse, the peer bitmap is flat.'],
  }),
  convert: (raw) => ({
    ratios: defined([
      ['raw -> sparse VMDK vs qemu-img convert', speed(num(raw, 'qemuImgMs'), num(raw, 'blockrelayMs'))],
      ['raw -> sparse VMDK vs qemu-img convert -t writeback', speed(num(raw, 'qemuImgWritebackMs'), num(raw, 'blockrelayMs'))],
    ]),
    figures: defined<Figure>([
      ['size bytes', num(raw, 'sizeBytes')],
      ['data bytes', num(raw, 'dataBytes')],
      ['blockrelay median ms', num(raw, 'blockrelayMs')],
      ['qemu-img median ms', num(raw, 'qemuImgMs')],
      ['qemu-img -t writeback median ms', num(raw, 'qemuImgWritebackMs')],
      ['output identical to source', scalar(raw.identicalToSource)],
    ]),
    peer: 'qemu-img convert -O vmdk',
    notes: ["blockrelay makes its output durable (fdatasync); qemu-img's default cache mode does not, -t writeback flushes at the end."],
  }),
  'blob-upload': (raw) => ({
    ratios: defined([
      ['vs SDK uploadPages loop, same concurrency', speed(num(raw, 'medianMs.sdkConcurrent'), num(raw, 'medianMs.blockrelay'))],
      ['vs SDK uploadPages loop, sequential', speed(num(raw, 'medianMs.sdkSequential'), num(raw, 'medianMs.blockrelay'))],
    ]),
    figures: defined<Figure>([
      ['size bytes', num(raw, 'sizeBytes')],
      ['data bytes', num(raw, 'dataBytes')],
      ['blockrelay median ms', num(raw, 'medianMs.blockrelay')],
      ['SDK loop, same concurrency, median ms', num(raw, 'medianMs.sdkConcurrent')],
      ['SDK loop, sequential, median ms', num(raw, 'medianMs.sdkSequential')],
      ['blockrelay MiB/s', num(raw, 'blockrelayMiBPerSecond')],
      ['concurrency', num(raw, 'concurrency')],
      ['blob identical to source', scalar(raw.verifiedIdentical)],
    ]),
    peer: typeof raw.peer === 'string' ? raw.peer : 'Azure SDK uploadPages loop',
    notes: ['Both upload to the same Azurite; Azurite, not the network, bounds both.'],
  }),
  resync: (raw) => ({
    ratios: defined([['resync time vs rsync', num(raw, 'speedupVsRsync') ?? speed(num(raw, 'rsync.medianMs'), num(raw, 'blockrelay.medianMs'))]]),
    figures: defined<Figure>([
      ['size bytes', num(raw, 'sizeBytes')],
      ['changed bytes', num(raw, 'changedBytes')],
      ['blockrelay median ms', num(raw, 'blockrelay.medianMs')],
      ['rsync median ms', num(raw, 'rsync.medianMs')],
      ['blockrelay bytes on the wire', num(raw, 'blockrelay.totalBytes')],
      ['rsync bytes on the wire', num(raw, 'rsync.totalBytes')],
      ['bytes on the wire, blockrelay / rsync', num(raw, 'bytesRatioVsRsync')],
    ]),
    peer: 'rsync --no-whole-file --inplace -B 4096',
    notes: [],
  }),
};

const RESERVED_KEYS = new Set(['bench', 'name', 'quick', 'ratio', 'ratios', 'peer', 'notes', 'goal', 'figures']);

/** Scalars at the top level and one level down, for a result of unknown shape. */
function genericFigures(raw: Json): Record<string, Figure> {
  const out: Record<string, Figure> = {};
  const add = (key: string, v: unknown): void => {
    const s = scalar(v);
    if (s !== undefined && Object.keys(out).length < MAX_GENERIC_FIGURES) out[key] = s;
  };
  if (isObject(raw.figures)) {
    for (const [k, v] of Object.entries(raw.figures)) add(k, v);
    return out;
  }
  for (const [k, v] of Object.entries(raw)) {
    if (RESERVED_KEYS.has(k)) continue;
    if (isObject(v)) for (const [k2, v2] of Object.entries(v)) add(`${k}.${k2}`, v2);
    else add(k, v);
  }
  return out;
}

function genericRatios(raw: Json): { ratios: Record<string, number>; note?: string } {
  const ratios: Record<string, number> = {};
  if (isObject(raw.ratios)) {
    for (const [k, v] of Object.entries(raw.ratios)) if (typeof v === 'number' && Number.isFinite(v)) ratios[k] = v;
    return { ratios };
  }
  if (typeof raw.ratio === 'number') ratios.ratio = raw.ratio;
  else if (isObject(raw.ratio)) for (const [k, v] of Object.entries(raw.ratio)) if (typeof v === 'number' && Number.isFinite(v)) ratios[k] = v;
  return Object.keys(ratios).length === 0 ? { ratios } : { ratios, note: "ratios as the bench reports them (its own 'ratio' field); see the bench's header for their direction" };
}

/**
 * Normalises one bench's result JSON. A result with a top-level `ratios`
 * object (the current convention) is taken as it stands; older shapes go
 * through their adapter; anything else gets scalars as figures.
 */
export function normaliseResult(name: string, raw: unknown): BenchResult {
  if (!isObject(raw)) return { name, ratios: {}, figures: {}, peer: '', notes: ['the result is not a JSON object'] };
  const notes = Array.isArray(raw.notes) ? raw.notes.filter((n): n is string => typeof n === 'string') : typeof raw.notes === 'string' ? [raw.notes] : [];
  const adapter = ADAPTERS[name];
  if (adapter !== undefined && !isObject(raw.ratios)) {
    const adapted = adapter(raw);
    return { name, ...adapted, notes: [...adapted.notes, ...notes] };
  }
  const { ratios, note } = genericRatios(raw);
  const peer = typeof raw.peer === 'string' ? raw.peer : '';
  return { name, ratios, figures: genericFigures(raw), peer, notes: note === undefined ? notes : [...notes, note] };
}

/** The first figure whose name matches, as a number. */
function figureMatching(result: BenchResult, pattern: RegExp): [string, number] | undefined {
  for (const [k, v] of Object.entries(result.figures)) if (pattern.test(k) && typeof v === 'number') return [k, v];
  return undefined;
}

function ratioMatching(result: BenchResult, pattern: RegExp): number | undefined {
  const matches = Object.entries(result.ratios).filter(([k]) => pattern.test(k)).map(([, v]) => v);
  return matches.length === 0 ? undefined : Math.min(...matches);
}

/**
 * The goal the issues set for a scenario, judged against its result.
 * A result may judge itself with `goal: {met: boolean}` in its JSON; the
 * harness only judges what it can recognise and says so otherwise.
 */
export function judgeGoal(name: string, result: BenchResult | undefined, raw?: unknown): Goal {
  const selfJudged = at(raw, 'goal.met');
  if (name.startsWith('tap')) {
    const text = 'tap / qemu-nbd ≥ 0.8 with data logging, ≥ 0.95 with dirty-map-only tracking';
    if (typeof selfJudged === 'boolean') return { text, met: selfJudged };
    if (result === undefined) return { text, met: null };
    const logging = ratioMatching(result, /log/i);
    const dirtyOnly = ratioMatching(result, /dirty|map/i);
    return { text, met: logging === undefined || dirtyOnly === undefined ? null : logging >= 0.8 && dirtyOnly >= 0.95 };
  }
  if (name.startsWith('resync')) {
    const text = '≥ 4× faster than rsync, and fewer bytes sent';
    if (typeof selfJudged === 'boolean') return { text, met: selfJudged };
    if (result === undefined) return { text, met: null };
    const speedup = ratioMatching(result, /rsync/i);
    const bytes = figureMatching(result, /bytes on the wire, blockrelay \/ rsync/i);
    return { text, met: speedup === undefined || bytes === undefined ? null : speedup >= 4 && bytes[1] < 1 };
  }
  if (name.startsWith('e2e') || name.includes('churn')) {
    const text = '200 MB/s of sustained churn with RPO p99 < 2 s';
    if (typeof selfJudged === 'boolean') return { text, met: selfJudged };
    if (result === undefined) return { text, met: null };
    // The churn rate, not the peer's: a figure named for churn first.
    const rate = /Mi?B\/s|Mi?Bps|Mi?Bs$|Mi?BPerSecond|throughput/i;
    const throughput = figureMatching(result, new RegExp(`churn.*(${rate.source})`, 'i')) ?? figureMatching(result, new RegExp(`^(?!.*peer)(?:.*)(${rate.source})`, 'i'));
    const p99 = figureMatching(result, /p99/i);
    const mbPerSecond = throughput === undefined ? undefined : /MiB/i.test(throughput[0]) ? (throughput[1] * 1024 * 1024) / 1e6 : throughput[1];
    const p99Seconds = p99 === undefined ? undefined : /(^|[^a-z])ms($|[^a-z])|Ms$|millis/i.test(p99[0]) ? p99[1] / 1000 : p99[1];
    // Either half failing settles it; both must be known to pass.
    if ((mbPerSecond !== undefined && mbPerSecond < 200) || (p99Seconds !== undefined && p99Seconds >= 2)) return { text, met: false };
    if (mbPerSecond !== undefined && p99Seconds !== undefined) return { text, met: true };
    const unmeasured = Object.entries(result.figures).find(([k, v]) => /p99/i.test(k) && v === null);
    return { text, met: null, ...(unmeasured ? { why: `${unmeasured[0]} was not measured` } : {}) };
  }
  return { text: NO_TARGET, met: typeof selfJudged === 'boolean' ? selfJudged : null };
}

/** A number as the report shows it: integers grouped, others to 3 significant digits. */
export function formatFigure(value: Figure): string {
  if (value === null) return 'not measured';
  if (typeof value === 'boolean') return value ? 'yes' : 'no';
  if (typeof value === 'string') return value;
  if (Number.isInteger(value)) return value.toLocaleString('en-US');
  const abs = Math.abs(value);
  return abs >= 100 ? value.toFixed(0) : abs >= 1 ? value.toPrecision(3) : value.toPrecision(2);
}

function formatRatio(value: number): string {
  return `${value.toFixed(2)}×`;
}

function cell(text: string): string {
  return text.replace(/\|/g, '\\|').replace(/\n/g, ' ');
}

function formatBytes(n: number): string {
  return `${(n / 1024 ** 3).toFixed(1)} GiB`;
}

function statusText(run: BenchRun): string {
  if (run.status === 'ok') return 'ok';
  return run.reason === undefined ? run.status : `${run.status}: ${run.reason}`;
}

function metText(goal: Goal): string {
  if (goal.met === null) return goal.why === undefined ? '–' : `not judged: ${goal.why}`;
  return goal.met ? 'met' : 'not met';
}

/** The headline ratio of a run: its first ratio, named. */
function headline(run: BenchRun): string {
  const first = run.result === undefined ? undefined : Object.entries(run.result.ratios)[0];
  return first === undefined ? '–' : `${formatRatio(first[1])} (${first[0]})`;
}

/** Renders `docs/benchmarks.md` from a summary. */
export function renderMarkdown(summary: Summary): string {
  const m = summary.machine;
  const lines: string[] = [];
  lines.push('# Benchmarks', '');
  lines.push(
    `Generated by \`npm run bench${summary.quick ? ' -- --quick' : ''}\` (bench/run.ts) on ${m.date}; every figure below comes from that one run.`,
    'Each scenario measures blockrelay and its peer tool in the same run, on the same data, on the same machine.',
    'Ratios are blockrelay\'s speed over the peer\'s (the peer\'s median time divided by blockrelay\'s): above 1 means blockrelay is faster.',
    'Raw results: `bench/results/<scenario>.json`; this run\'s summary: `bench/results/summary.json`.',
    '',
  );
  if (summary.quick) lines.push('This is a `--quick` run: smaller data and fewer repetitions than a full run, so ratios are noisier.', '');
  lines.push('## Machine', '', '| | |', '|---|---|');
  lines.push(`| CPU | ${cell(m.cpuModel)} |`, `| cores | ${m.cores} |`, `| memory | ${formatBytes(m.memoryBytes)} |`);
  lines.push(`| load average (1 min) at start | ${m.loadAverage1m.toFixed(2)} |`, `| page cache dropped before each scenario | ${summary.benches.length > 0 && summary.benches.every((b) => b.cachesDropped === true) ? 'yes' : 'no'} |`, `| Node.js | ${m.node} |`);
  lines.push(`| commit | \`${m.commit}\`${m.dirty ? ' (work tree had uncommitted changes)' : ''} |`, `| date | ${m.date} |`);
  lines.push(`| time | ${(summary.totalMs / 1000).toFixed(1)} s of a ${(summary.budgetMs / 1000).toFixed(0)} s budget |`, '');
  lines.push('## Summary', '', '| scenario | status | ratio vs peer | goal | goal met |', '|---|---|---|---|---|');
  for (const run of summary.benches) {
    lines.push(`| ${cell(run.name)} | ${cell(statusText(run))} | ${cell(headline(run))} | ${cell(run.goal.text)} | ${metText(run.goal)} |`);
  }
  lines.push('');
  for (const run of summary.benches) {
    lines.push(`## ${run.name}`, '');
    lines.push(`\`npx tsx bench/${run.name}.bench.ts${summary.quick ? ' --quick' : ''}\` — ${statusText(run)} after ${(run.durationMs / 1000).toFixed(1)} s.`, '');
    const r = run.result;
    if (r === undefined) continue;
    if (r.peer !== '') lines.push(`Peer: ${r.peer}.`, '');
    const judged = run.goal.met !== null ? ` — ${metText(run.goal)}` : run.goal.text === NO_TARGET ? '' : ` (not judged: ${run.goal.why ?? 'the result does not name the figures it needs'})`;
    lines.push(`Goal: ${run.goal.text}${judged}.`, '');
    const ratios = Object.entries(r.ratios);
    if (ratios.length > 0) {
      lines.push('| ratio vs peer | value |', '|---|---|');
      for (const [k, v] of ratios) lines.push(`| ${cell(k)} | ${formatRatio(v)} |`);
      lines.push('');
    }
    const figures = Object.entries(r.figures);
    if (figures.length > 0) {
      lines.push('| figure | value |', '|---|---|');
      for (const [k, v] of figures) lines.push(`| ${cell(k)} | ${cell(formatFigure(v))} |`);
      lines.push('');
    }
    for (const note of r.notes) lines.push(`- ${note}`);
    if (r.notes.length > 0) lines.push('');
  }
  lines.push(
    '## Adding a scenario',
    '',
    '`bench/run.ts` runs every `bench/NAME.bench.ts` it finds. A scenario takes `--quick` (under ~30 s), measures blockrelay and its peer in the same run, ' +
      'prints one JSON document and writes it to `bench/results/NAME.json` with `peer` (text), `ratios` (peer median time / blockrelay median time, ' +
      'or blockrelay throughput / peer throughput), `figures` (named numbers, units last in the name), `notes` (text) and, if it judges itself, `goal: {"met": true|false}`. ' +
      'To skip (a tool is missing), exit with status 77 or write `{"skipped": "tool X missing"}`.',
  );
  return `${lines.join('\n').trimEnd()}\n`;
}
