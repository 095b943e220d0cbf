/**
 * blockrelay resync against rsync on the same image pair, in one run.
 *
 *   npx tsx bench/resync.bench.ts [--quick] [--reps N]
 *
 * A source image of random data (1 GiB, or 256 MiB with --quick) and a stale
 * target that differs in 1% of its 4 KiB blocks, scattered at random. Each
 * repetition makes the target stale again (only the changed blocks are
 * rewritten, so both tools start from identical files, all in the page
 * cache) and times:
 * - blockrelay: `resyncDisks` in this process (the engine, raw targets,
 *   in-process seam) — the same code the CLI runs, without the tsx start-up;
 * - rsync: `rsync --no-whole-file --inplace -B 4096 --stats SRC DST` (a
 *   local copy; --no-whole-file forces the delta algorithm), wall time.
 * Bytes: ours are counted at the seam; rsync's from --stats (Literal data,
 * Total bytes sent / received). Also reports xxh64 throughput on 4 KiB and
 * 64 KiB blocks. Prints one JSON document and writes bench/results/resync.json.
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BlockHasher } from '../src/resync/block-hasher';
import { resyncDisks } from '../src/resync/resync-disks';
import { pickBlocks, seededRandom } from '../test/resync/seeded-random';

const MiB = 1024 * 1024;
const BLOCK = 4096;
const CHUNK = 8 * MiB;

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i < 0 ? undefined : process.argv[i + 1];
}

const quick = process.argv.includes('--quick');
const sizeBytes = (quick ? 256 : 1024) * MiB;
const reps = Number(arg('--reps') ?? (quick ? 3 : 5));

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  return s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

function writeSource(file: string): void {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(CHUNK);
  for (let pos = 0; pos < sizeBytes; pos += CHUNK) fs.writeSync(fd, randomFillSync(chunk), 0, CHUNK, pos);
  fs.closeSync(fd);
}

/** Makes `file` stale again: each changed block gets its first byte flipped. */
function makeStale(source: string, file: string, blocks: number[]): void {
  const src = fs.openSync(source, 'r');
  const dst = fs.openSync(file, 'r+');
  const one = Buffer.alloc(1);
  for (const b of blocks) {
    fs.readSync(src, one, 0, 1, b * BLOCK);
    one[0] ^= 0xff;
    fs.writeSync(dst, one, 0, 1, b * BLOCK);
  }
  fs.closeSync(src);
  fs.closeSync(dst);
}

function statsNumber(stats: string, label: string): number {
  const m = new RegExp(`${label}: ([\\d,]+)`).exec(stats);
  if (m === null) throw new Error(`rsync --stats lacks "${label}"`);
  return Number(m[1].replace(/,/g, ''));
}

/** Median xxh64 throughput of each implementation on 4 KiB and 64 KiB blocks. */
async function hashThroughput(): Promise<Record<string, number>> {
  const data = randomFillSync(Buffer.alloc(64 * MiB));
  const out: Record<string, number> = {};
  for (const hasher of [await BlockHasher.create(), await BlockHasher.create('wasm')]) {
    for (const block of [4096, 65536]) {
      const runs: number[] = [];
      for (let i = 0; i < 5; i++) {
        const t = process.hrtime.bigint();
        hasher.hashBlocks(data, block);
        runs.push(data.length / (Number(process.hrtime.bigint() - t) / 1e9));
      }
      out[`xxh64_${hasher.implementation}_${block / 1024}KiB_GBps`] = Number((median(runs) / 1e9).toFixed(2));
    }
  }
  return out;
}

async function main(): Promise<void> {
  const rsyncVersion = spawnSync('rsync', ['--version'], { encoding: 'utf8' });
  if (rsyncVersion.status !== 0) throw new Error('rsync is not installed');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-bench-resync-'));
  try {
    const source = path.join(dir, 'source.img');
    const ours = path.join(dir, 'target-blockrelay.img');
    const theirs = path.join(dir, 'target-rsync.img');
    writeSource(source);
    fs.copyFileSync(source, ours);
    fs.copyFileSync(source, theirs);
    const changed = pickBlocks(sizeBytes / BLOCK, Math.round(sizeBytes / BLOCK / 100), seededRandom(1024));
    const changedBytes = changed.length * BLOCK;

    const oursMs: number[] = [];
    const rsyncMs: number[] = [];
    // CPU time (user + system) too: on a shared machine it is steadier than wall time.
    const oursCpuMs: number[] = [];
    // blockrelay makes its writes durable before it reports success (rsync does not): the share of that wait.
    const oursFlushMs: number[] = [];
    const rsyncCpuMs: number[] = [];
    let oursBytes: Record<string, number> = {};
    let rsyncBytes: Record<string, number> = {};
    // One unmeasured run first: module loading and JIT warm-up are start-up
    // costs of a long-running daemon, not of a resync.
    makeStale(source, ours, changed);
    await resyncDisks(`raw:${source}`, `raw:${ours}`);
    for (let rep = 0; rep < reps; rep++) {
      makeStale(source, ours, changed);
      makeStale(source, theirs, changed);
      // Nothing dirty in the page cache: blockrelay flushes the target (fsync)
      // before it reports success, and must not pay for writing back the
      // staling writes or the copies; rsync (as specified, without --fsync)
      // does not flush at all.
      spawnSync('sync');

      const t0 = process.hrtime.bigint();
      const cpu0 = process.cpuUsage();
      const r = await resyncDisks(`raw:${source}`, `raw:${ours}`);
      oursMs.push(Number(process.hrtime.bigint() - t0) / 1e6);
      const cpu = process.cpuUsage(cpu0);
      oursCpuMs.push((cpu.user + cpu.system) / 1000);
      if (r.blocksSent !== changed.length) throw new Error(`blockrelay sent ${r.blocksSent} blocks, ${changed.length} differ`);
      oursFlushMs.push(r.flushMs);
      oursBytes = { bytesSent: r.bytesSent, bytesReceived: r.bytesReceived, hashBytes: r.hashBytes, dataBytes: r.bytesDiffering };

      const t1 = process.hrtime.bigint();
      // bash's `time` reports the CPU of rsync and the processes it forks.
      const rs = spawnSync('bash', ['-c', 'TIMEFORMAT="%U %S"; time rsync --no-whole-file --inplace -B "$0" --stats "$1" "$2"', String(BLOCK), source, theirs], { encoding: 'utf8' });
      rsyncMs.push(Number(process.hrtime.bigint() - t1) / 1e6);
      if (rs.status !== 0) throw new Error(`rsync failed: ${rs.stderr}`);
      const [userS, sysS] = rs.stderr.trim().split('\n').pop()!.split(/\s+/).map(Number);
      rsyncCpuMs.push((userS + sysS) * 1000);
      rsyncBytes = {
        bytesSent: statsNumber(rs.stdout, 'Total bytes sent'),
        bytesReceived: statsNumber(rs.stdout, 'Total bytes received'),
        literalData: statsNumber(rs.stdout, 'Literal data'),
      };
    }
    // Block size and coarse passes, chosen from this: bytes across the seam per configuration.
    const sweep: Array<Record<string, unknown>> = [];
    for (const config of [
      { blockSizeBytes: 4096, coarseBlockBytes: [1 * MiB, 64 * 1024] },
      { blockSizeBytes: 4096, coarseBlockBytes: [64 * 1024] },
      { blockSizeBytes: 4096, coarseBlockBytes: [] },
      { blockSizeBytes: 16384, coarseBlockBytes: [1 * MiB, 64 * 1024] },
      { blockSizeBytes: 65536, coarseBlockBytes: [1 * MiB] },
    ]) {
      makeStale(source, ours, changed);
      spawnSync('sync');
      const t = process.hrtime.bigint();
      const r = await resyncDisks(`raw:${source}`, `raw:${ours}`, config);
      sweep.push({
        blockSizeBytes: config.blockSizeBytes,
        passBlockBytes: r.passBlockBytes,
        ms: Number((Number(process.hrtime.bigint() - t) / 1e6).toFixed(1)),
        hashBytes: r.hashBytes,
        dataBytes: r.bytesDiffering,
        totalBytes: r.bytesSent + r.bytesReceived,
      });
    }
    for (const target of [ours, theirs]) {
      const cmp = spawnSync('cmp', ['-s', source, target]);
      if (cmp.status !== 0) throw new Error(`${target} differs from the source after the run`);
    }

    const oursMedian = median(oursMs);
    const rsyncMedian = median(rsyncMs);
    const result = {
      bench: 'resync',
      quick,
      sizeBytes,
      changedBlocks: changed.length,
      changedBytes,
      reps,
      cpus: os.cpus().length,
      loadAverage1m: Number(os.loadavg()[0].toFixed(2)),
      blockrelay: { medianMs: Number(oursMedian.toFixed(1)), minMs: Number(Math.min(...oursMs).toFixed(1)), medianCpuMs: Number(median(oursCpuMs).toFixed(1)), medianFlushMs: Number(median(oursFlushMs).toFixed(1)), hasher: (await BlockHasher.create()).implementation, runsMs: oursMs.map((v) => Number(v.toFixed(1))), ...oursBytes, totalBytes: oursBytes.bytesSent + oursBytes.bytesReceived },
      rsync: { medianMs: Number(rsyncMedian.toFixed(1)), minMs: Number(Math.min(...rsyncMs).toFixed(1)), medianCpuMs: Number(median(rsyncCpuMs).toFixed(1)), runsMs: rsyncMs.map((v) => Number(v.toFixed(1))), ...rsyncBytes, totalBytes: rsyncBytes.bytesSent + rsyncBytes.bytesReceived, version: rsyncVersion.stdout.split('\n')[0] },
      speedupVsRsync: Number((rsyncMedian / oursMedian).toFixed(2)),
      cpuRatioRsyncToOurs: Number((median(rsyncCpuMs) / median(oursCpuMs)).toFixed(2)),
      bytesRatioVsRsync: Number(((oursBytes.bytesSent + oursBytes.bytesReceived) / (rsyncBytes.bytesSent + rsyncBytes.bytesReceived)).toFixed(3)),
      goal: {
        speedupAtLeast: 4,
        fewerBytes: true,
        met: rsyncMedian / oursMedian >= 4 && oursBytes.bytesSent + oursBytes.bytesReceived < rsyncBytes.bytesSent + rsyncBytes.bytesReceived,
      },
      blockSizeSweep: sweep,
      ...(await hashThroughput()),
    };
    const text = `${JSON.stringify(result, null, 2)}\n`;
    process.stdout.write(text);
    const resultsDir = path.join(__dirname, 'results');
    fs.mkdirSync(resultsDir, { recursive: true });
    fs.writeFileSync(path.join(resultsDir, 'resync.json'), text);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`${(err as Error)?.stack ?? String(err)}\n`);
  process.exitCode = 1;
});
