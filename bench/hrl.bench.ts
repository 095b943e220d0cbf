/**
 * [MS-HRL] log throughput, in one run:
 *
 * - Append: HrlWriter.append of N-byte writes (4 KiB and 64 KiB) until the
 *   log holds the total, then seal (fdatasync included), in MB/s of payload.
 *   The peer writes the same bytes with the same call sizes sequentially
 *   to a plain file (FileHandle.write, one fdatasync at the end). `ratio` is
 *   log MB/s / plain MB/s (1 means logging costs nothing over a plain write).
 *   A second ratio compares with the same bytes written in 1 MiB calls (the
 *   ceiling of sequential writing; the log stages small writes up to 1 MiB,
 *   which is why it can beat the same-size plain writes).
 * - Verify: HrlLogFile.verify of the 64 KiB-write log (every checksum and
 *   payload), in MB/s of file, page cache warm; its peer is reading the same
 *   file sequentially in 4 MiB reads.
 *
 *   npx tsx bench/hrl.bench.ts [--quick]
 *
 * Prints one JSON document and writes it to bench/results/hrl.json. Figures
 * are medians of the repetitions.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { verifyHrlLog } from '../src/tracking/hrl-reader';
import { HrlWriter } from '../src/tracking/hrl-writer';

const MiB = 1024 * 1024;
const quick = process.argv.includes('--quick');
const repetitions = quick ? 3 : 5;
const totalBytes = (quick ? 64 : 256) * MiB;
const writeSizes = [4096, 64 * 1024];

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

async function timed(fn: () => Promise<void>): Promise<number> {
  const start = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - start) / 1e9;
}

const mbps = (bytes: number, s: number): number => Math.round((bytes / 1e6 / s) * 10) / 10;

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-bench-hrl-'));
  // A pool of random payloads, reused in turn (random so nothing compresses or dedups).
  const pool = randomBytes(8 * MiB);
  const results: Record<string, unknown>[] = [];
  let verifyLog = '';
  try {
    // The ceiling: the same bytes written in 1 MiB calls.
    const bulk: number[] = [];
    for (let r = 0; r < repetitions; r++) {
      const f = path.join(dir, `bulk-${r}.bin`);
      bulk.push(await timed(async () => {
        const fh = await fsp.open(f, 'wx');
        for (let at = 0; at < totalBytes; at += MiB) await fh.write(pool, at % pool.length, MiB, at);
        await fh.datasync();
        await fh.close();
      }));
      fs.rmSync(f);
    }
    const bulkMBps = mbps(totalBytes, median(bulk));
    for (const size of writeSizes) {
      const count = totalBytes / size;
      const plain: number[] = [];
      const logged: number[] = [];
      for (let r = 0; r < repetitions; r++) {
        const plainFile = path.join(dir, `plain-${size}-${r}.bin`);
        plain.push(await timed(async () => {
          const fh = await fsp.open(plainFile, 'wx');
          for (let i = 0; i < count; i++) {
            const at = (i * size) % pool.length;
            await fh.write(pool, at, size, i * size);
          }
          await fh.datasync();
          await fh.close();
        }));
        fs.rmSync(plainFile);
        const logFile = path.join(dir, `log-${size}-${r}.hrl`);
        logged.push(await timed(async () => {
          const w = await HrlWriter.create(logFile);
          for (let i = 0; i < count; i++) {
            const at = (i * size) % pool.length;
            await w.append(i * size, pool.subarray(at, at + size));
          }
          await w.seal();
        }));
        if (size === writeSizes[writeSizes.length - 1] && r === 0) verifyLog = logFile;
        else fs.rmSync(logFile);
      }
      const plainMBps = mbps(totalBytes, median(plain));
      const logMBps = mbps(totalBytes, median(logged));
      results.push({ case: `append ${size / 1024} KiB writes`, payloadBytes: totalBytes, logMBps, plainWriteMBps: plainMBps, plainWrite1MiBCallsMBps: bulkMBps, ratio: Math.round((logMBps / plainMBps) * 100) / 100, ratioTo1MiBCalls: Math.round((logMBps / bulkMBps) * 100) / 100 });
    }

    const fileBytes = fs.statSync(verifyLog).size;
    const verify: number[] = [];
    const read: number[] = [];
    for (let r = 0; r < repetitions; r++) {
      verify.push(await timed(async () => { await verifyHrlLog(verifyLog); }));
      read.push(await timed(async () => {
        const fh = await fsp.open(verifyLog, 'r');
        const buf = Buffer.alloc(4 * MiB);
        for (let at = 0; at < fileBytes; at += buf.length) await fh.read(buf, 0, buf.length, at);
        await fh.close();
      }));
    }
    const verifyMBps = mbps(fileBytes, median(verify));
    const readMBps = mbps(fileBytes, median(read));
    results.push({ case: 'verify a log of 64 KiB writes', fileBytes, verifyMBps, plainReadMBps: readMBps, ratio: Math.round((verifyMBps / readMBps) * 100) / 100 });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const ratios: Record<string, number> = {};
  const figures: Record<string, number> = {};
  for (const r of results) {
    ratios[`${r.case as string} / plain sequential I/O`] = r.ratio as number;
    if (typeof r.ratioTo1MiBCalls === 'number') ratios[`${r.case as string} / plain writes in 1 MiB calls`] = r.ratioTo1MiBCalls;
    for (const [k, v] of Object.entries(r)) if (!k.startsWith('ratio') && k !== 'case' && typeof v === 'number') figures[`${r.case as string}: ${k}`] = v;
  }
  const doc = {
    bench: 'hrl', quick, repetitions, node: process.version, cpus: os.cpus().length,
    peer: 'plain sequential FileHandle.write (same call sizes, one fdatasync) and 4 MiB sequential reads of the same file',
    ratios, figures, results,
  };
  const text = JSON.stringify(doc, null, 2);
  process.stdout.write(`${text}\n`);
  fs.mkdirSync(path.join(__dirname, 'results'), { recursive: true });
  fs.writeFileSync(path.join(__dirname, 'results', 'hrl.json'), `${text}\n`);
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
