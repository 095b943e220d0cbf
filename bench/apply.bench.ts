/**
 * The master target's apply stage, alone: sealed [MS-HRL] logs of random
 * 64 KiB writes applied to a sparse 4 GiB VMDK with the undo journal on,
 * through the same calls the master target makes for each log
 * (src/transport/master-target.ts `apply`): the retention hooks'
 * `beforeApply` (pre-images made durable), `hrlLogOps.apply`, the target's
 * `flush`, the ledger's record, then `afterApply`.
 *
 * Two passes over one image:
 * - fresh: every write lands on a grain never written (pre-images are
 *   zeroes the journal need not read; grain tables get allocated);
 * - overwrite: the same offsets again, shuffled, with new data, so every
 *   pre-image is real data read from the image.
 *
 * Peer, in the same run: qemu's own VMDK driver (`qemu-io -f vmdk -t
 * writeback`) doing the same writes, log by log, into an image made by
 * `qemu-img create -f vmdk`, with one `flush` per log. It keeps no
 * pre-images, so two ratios are given: the whole stage (journal included)
 * and the apply alone (apply + flush), each over qemu's MB/s.
 *
 * Also reports what share of the stage each part takes: journal
 * (`beforeApply`), apply (writes), flush (the target's fdatasyncs and grain
 * table writes) and the rest (ledger, `afterApply`), and the process's CPU
 * seconds (user, system) per GB of payload over blockrelay's passes.
 *
 * Each log is held in memory, as the master target holds a log it applies
 * on receipt (src/transport/held-log.ts): the journal's ranges and the
 * apply read it from its buffer. `--from-file` reads it from its file
 * instead (a log spooled first, and the master target before session 5).
 *
 *   UV_USE_IO_URING=0 npx tsx bench/apply.bench.ts [--quick] [--no-peer] [--from-file]
 *
 * Prints one JSON document and writes it to bench/results/apply.json.
 * Figures are medians over the logs of a pass (MB/s of log payload).
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { RetentionHooks } from '../src/retention/retention-hooks';
import type { DiskTarget } from '../src/targets/disk-target';
import { HrlWriter } from '../src/tracking/hrl-writer';
import { holdLog, releaseHeldLog } from '../src/transport/held-log';
import { hrlLogOps } from '../src/transport/hrl-log-ops';
import type { SpoolEntry } from '../src/transport/log-spool';
import { openOrCreateTarget } from '../src/transport/target-opener';
import { prng } from '../test/helpers/prng';
import { hasTool } from '../test/helpers/tools';

const MiB = 1024 * 1024;
const quick = process.argv.includes('--quick');
/** Skips qemu (for profiling blockrelay's side alone); no ratios then. */
const noPeer = process.argv.includes('--no-peer');
/** Applies each log from its file, not from memory. */
const fromFile = process.argv.includes('--from-file');
const diskBytes = 4 * 1024 * MiB;
const writeBytes = 64 * 1024;
const logsPerPass = quick ? 3 : 5;
/** About what one 1 s cut of 200 MB/s churn holds (the e2e bench's logs are ~211 MB). */
const logBytes = (quick ? 64 : 200) * MiB;
const diskId = 'disk0';

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

const round1 = (n: number): number => Math.round(n * 10) / 10;
const round2 = (n: number): number => Math.round(n * 100) / 100;
const mbps = (bytes: number, s: number): number => round1(bytes / 1e6 / s);
const seconds = (from: bigint): number => Number(process.hrtime.bigint() - from) / 1e9;

/** Offsets of the fresh pass's logs: distinct 64 KiB slots, so every write is a new grain. */
function planOffsets(): number[][] {
  const rand = prng(0x6a7c);
  const slots = diskBytes / writeBytes;
  const perLog = logBytes / writeBytes;
  const used = new Set<number>();
  const logs: number[][] = [];
  for (let l = 0; l < logsPerPass; l++) {
    const offsets: number[] = [];
    while (offsets.length < perLog) {
      const slot = Math.floor(rand() * slots);
      if (used.has(slot)) continue;
      used.add(slot);
      offsets.push(slot * writeBytes);
    }
    logs.push(offsets);
  }
  return logs;
}

function shuffled(values: number[], rand: () => number): number[] {
  const out = [...values];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

async function writeLog(file: string, offsets: number[], pool: Buffer, rand: () => number): Promise<void> {
  // Plain file writes, not the native appender: the appender drops what it
  // wrote from the page cache (a source's log is read once, by the shipper),
  // while the master target applies a log it has just received and verified,
  // so its pages are cached.
  const w = await HrlWriter.create(file, { openFile: (p) => fsp.open(p, 'wx+') });
  for (const offset of offsets) {
    const at = Math.floor(rand() * (pool.length - writeBytes));
    await w.append(offset, pool.subarray(at, at + writeBytes));
  }
  await w.seal();
}

interface LogTiming {
  payloadBytes: number;
  totalS: number;
  journalS: number;
  applyS: number;
  flushS: number;
  restS: number;
}

/** Delegates to `target`, adding the time its flushes take to `flush.s`. */
function timedFlush(target: DiskTarget, flush: { s: number }): DiskTarget {
  return new Proxy(target, {
    get(t, key) {
      const value = Reflect.get(t, key, t) as unknown;
      if (key === 'flush') {
        return async () => {
          const started = process.hrtime.bigint();
          await t.flush();
          flush.s += seconds(started);
        };
      }
      return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(t) : value;
    },
  });
}

/** One log through the master target's apply sequence. */
async function applyLog(hooks: RetentionHooks, target: DiskTarget, stateDir: string, entry: SpoolEntry, flush: { s: number }): Promise<LogTiming> {
  flush.s = 0;
  const t0 = process.hrtime.bigint();
  await hooks.beforeApply(diskId, entry, target);
  const journalS = seconds(t0);
  const t1 = process.hrtime.bigint();
  const applied = await hrlLogOps.apply(entry.file, target);
  await target.flush();
  const applyAndFlushS = seconds(t1);
  const t2 = process.hrtime.bigint();
  // The master target's ledger: a small file made durable (src/transport/apply-ledger.ts does the same).
  const ledger = path.join(stateDir, 'disks', `${diskId}.json`);
  fs.writeFileSync(`${ledger}.tmp`, JSON.stringify({ appliedSeq: entry.envelope.seq }));
  const fd = fs.openSync(`${ledger}.tmp`, 'r');
  fs.fdatasyncSync(fd);
  fs.closeSync(fd);
  fs.renameSync(`${ledger}.tmp`, ledger);
  await hooks.afterApply(diskId, entry, target);
  const restS = seconds(t2);
  return { payloadBytes: applied.bytes, totalS: seconds(t0), journalS, applyS: applyAndFlushS - flush.s, flushS: flush.s, restS };
}

/** The whole of `file` read into the start of `buffer` (a view of it). */
function readInto(file: string, buffer: Buffer): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    let at = 0;
    for (let n; (n = fs.readSync(fd, buffer, at, buffer.length - at, at)) > 0; ) at += n;
    return buffer.subarray(0, at);
  } finally {
    fs.closeSync(fd);
  }
}

function envelope(seq: number, file: string): SpoolEntry {
  const sizeBytes = fs.statSync(file).size;
  return {
    file,
    sizeBytes,
    envelope: { diskId, seq, xxhash64: '0'.repeat(16), logLength: sizeBytes, cutTimeMs: Date.now(), cutId: `cut-${seq}`, group: undefined, appTag: undefined, diskSizeBytes: diskBytes },
  };
}

/** qemu-io writing `offsets` (pattern from a 64 KiB random file) then flushing; seconds. */
function qemuLog(image: string, pattern: string, offsets: number[]): number {
  const args = ['-f', 'vmdk', '-t', 'writeback'];
  for (const o of offsets) args.push('-c', `write -q -s ${pattern} ${o} ${writeBytes}`);
  args.push('-c', 'flush', image);
  const started = process.hrtime.bigint();
  execFileSync('qemu-io', args, { stdio: ['ignore', 'ignore', 'inherit'], maxBuffer: 1 << 20 });
  return seconds(started);
}

function summarise(timings: LogTiming[]): Record<string, number> {
  const bytes = timings[0]!.payloadBytes;
  const sum = (k: keyof LogTiming): number => timings.reduce((s, t) => s + t[k], 0);
  const total = sum('totalS');
  return {
    stageMBps: mbps(bytes, median(timings.map((t) => t.totalS))),
    applyAndFlushMBps: mbps(bytes, median(timings.map((t) => t.applyS + t.flushS))),
    journalMBps: mbps(bytes, median(timings.map((t) => t.journalS))),
    stageMedianS: round2(median(timings.map((t) => t.totalS))),
    journalShare: round2(sum('journalS') / total),
    applyShare: round2(sum('applyS') / total),
    flushShare: round2(sum('flushS') / total),
    restShare: round2(sum('restS') / total),
  };
}

async function main(): Promise<void> {
  if (!hasTool('qemu-io') || !hasTool('qemu-img')) {
    const skipped = { name: 'apply', skipped: 'qemu-io or qemu-img missing' };
    console.log(JSON.stringify(skipped));
    process.exitCode = 77;
    return;
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-bench-apply-'));
  try {
    const pool = randomBytes(8 * MiB);
    const pattern = path.join(dir, 'pattern.bin');
    fs.writeFileSync(pattern, randomBytes(writeBytes));
    const fresh = planOffsets();
    const rand = prng(0x5eed);
    const overwrite = fresh.map((o) => shuffled(o, rand));
    const logs: string[] = [];
    for (const [i, offsets] of [...fresh, ...overwrite].entries()) {
      const file = path.join(dir, `log-${i + 1}.hrl`);
      await writeLog(file, offsets, pool, rand);
      logs.push(file);
    }

    // blockrelay: the master target's sequence, journal on.
    const stateDir = path.join(dir, 'mt');
    fs.mkdirSync(path.join(stateDir, 'disks'), { recursive: true });
    const hooks = new RetentionHooks({ dir: path.join(dir, 'retention'), windowHours: 24, stateDir, inboxDir: path.join(stateDir, 'inbox') });
    const opened = process.hrtime.bigint();
    const inner = await openOrCreateTarget(`vmdk:${path.join(dir, 'target.vmdk')}`, diskBytes);
    const openS = seconds(opened);
    const flush = { s: 0 };
    const target = timedFlush(inner, flush);
    const timings: LogTiming[] = [];
    let cpu: NodeJS.CpuUsage;
    try {
      const cpuBefore = process.cpuUsage();
      let cpuHeld = { user: 0, system: 0 };
      let heldBuffer: Buffer | undefined;
      for (const [i, file] of logs.entries()) {
        // Reading a log into memory stands for its receipt: not counted.
        const readCpu = process.cpuUsage();
        // One buffer reused for every log, as the master target's held-log memory reuses its buffers.
        const bytes = fromFile ? undefined : readInto(file, (heldBuffer ??= Buffer.allocUnsafeSlow(fs.statSync(file).size * 2)));
        if (bytes !== undefined) holdLog(file, bytes);
        const read = process.cpuUsage(readCpu);
        cpuHeld = { user: cpuHeld.user + read.user, system: cpuHeld.system + read.system };
        try {
          timings.push(await applyLog(hooks, target, stateDir, envelope(i + 1, file), flush));
        } finally {
          releaseHeldLog(file);
        }
      }
      const all = process.cpuUsage(cpuBefore);
      cpu = { user: all.user - cpuHeld.user, system: all.system - cpuHeld.system };
    } finally {
      await inner.close();
    }
    const journalBytes = fs.readdirSync(path.join(dir, 'retention', diskId, 'journal')).reduce((s, f) => s + fs.statSync(path.join(dir, 'retention', diskId, 'journal', f)).size, 0);
    const journalAllocatedBytes = fs.readdirSync(path.join(dir, 'retention', diskId, 'journal')).reduce((s, f) => s + fs.statSync(path.join(dir, 'retention', diskId, 'journal', f)).blocks * 512, 0);

    // qemu: the same writes, log by log, into its own sparse VMDK.
    const peerImage = path.join(dir, 'peer.vmdk');
    execFileSync('qemu-img', ['create', '-q', '-f', 'vmdk', peerImage, String(diskBytes)]);
    const peerS = noPeer ? [...fresh, ...overwrite].map(() => NaN) : [...fresh, ...overwrite].map((offsets) => qemuLog(peerImage, pattern, offsets));

    const freshB = summarise(timings.slice(0, logsPerPass));
    const overB = summarise(timings.slice(logsPerPass));
    const peerFresh = mbps(logBytes, median(peerS.slice(0, logsPerPass)));
    const peerOver = mbps(logBytes, median(peerS.slice(logsPerPass)));
    const figures: Record<string, number> = {
      logBytes,
      logsPerPass,
      openCreateS: round2(openS),
      journalBytesOnDisk: journalBytes,
      journalBytesAllocated: journalAllocatedBytes,
      qemuFreshMBps: peerFresh,
      qemuOverwriteMBps: peerOver,
      cpuUserSecondsPerGB: round2(cpu.user / 1e6 / (timings.reduce((n, t) => n + t.payloadBytes, 0) / 1e9)),
      cpuSystemSecondsPerGB: round2(cpu.system / 1e6 / (timings.reduce((n, t) => n + t.payloadBytes, 0) / 1e9)),
    };
    for (const [k, v] of Object.entries(freshB)) figures[`fresh ${k}`] = v;
    for (const [k, v] of Object.entries(overB)) figures[`overwrite ${k}`] = v;
    const doc = {
      bench: 'apply',
      name: 'apply',
      quick,
      node: process.version,
      cpus: os.cpus().length,
      peer: 'qemu-io -f vmdk -t writeback: the same 64 KiB writes log by log into a qemu-img-created sparse VMDK, one flush per log (no pre-images)',
      ratios: {
        'fresh stage (journal on) / qemu': round2(freshB.stageMBps! / peerFresh),
        'overwrite stage (journal on) / qemu': round2(overB.stageMBps! / peerOver),
        'fresh apply+flush / qemu': round2(freshB.applyAndFlushMBps! / peerFresh),
        'overwrite apply+flush / qemu': round2(overB.applyAndFlushMBps! / peerOver),
      },
      figures,
      notes: [
        `${logsPerPass} logs of ${logBytes / MiB} MiB of random ${writeBytes / 1024} KiB writes per pass onto a ${diskBytes / MiB / 1024} GiB sparse VMDK; MB/s are medians per log`,
        'shares are of the summed stage time: journal = beforeApply, apply = writes, flush = the target\'s flushes, rest = ledger + afterApply',
        `logs applied ${fromFile ? 'from their files' : 'from memory, as the master target holds a log it applies on receipt'}; CPU per GB covers blockrelay's two passes, not reading the logs into memory`,
      ],
      perLog: timings.map((t, i) => ({ seq: i + 1, totalS: round2(t.totalS), journalS: round2(t.journalS), applyS: round2(t.applyS), flushS: round2(t.flushS), restS: round2(t.restS), qemuS: round2(peerS[i]!) })),
    };
    const text = JSON.stringify(doc, null, 2);
    process.stdout.write(`${text}\n`);
    fs.mkdirSync(path.join(__dirname, 'results'), { recursive: true });
    fs.writeFileSync(path.join(__dirname, 'results', 'apply.json'), `${text}\n`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
