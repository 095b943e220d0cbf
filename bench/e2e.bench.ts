/**
 * End-to-end sustained churn through the whole chain, one run:
 *
 *   npx tsx bench/e2e.bench.ts [--quick]
 *
 * fio writes 64 KiB random blocks (iodepth 8) through the demo's NBD tap —
 * source tap with change tracking, process server, master target applying
 * to a sparse VMDK with undo journal and recovery points, all on this
 * machine, over loopback HTTP — at a target rate of 200 MB/s (issue 6's
 * goal), while /v1/status is sampled every 250 ms for the RPO (age of the
 * newest recovery point applied at the target). The peer is the same fio
 * job against qemu-nbd serving a raw file in the same directory: what the
 * disk itself sustains. Reported: churn achieved (MB/s), its ratio to the
 * peer, applied throughput, RPO p50/p99 during the churn, time to drain
 * after it, and whether the tracker overflowed into resync.
 *
 * Prints one JSON document and writes it to bench/results/e2e.json.
 */
import { execFileSync, spawn } from 'node:child_process';
import * as net from 'node:net';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Demo } from '../src/daemon/demo';
import { silentLogger } from '../src/daemon/logger';
import { freePort } from '../test/helpers/net';
import { hasTool } from '../test/helpers/tools';

const quick = process.argv.includes('--quick');
const MiB = 1024 * 1024;
const runtimeS = quick ? 5 : 20;
const diskBytes = (quick ? 1024 : 4096) * MiB;
const targetRate = '200m';
const intervalMs = 1000;

function percentile(xs: number[], p: number): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

/** Runs fio against an NBD URI; returns MB/s written (decimal MB, as fio's bw_bytes). */
function fio(uri: string, rate: string | undefined): Promise<number> {
  const args = ['--name=churn', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=64k', '--iodepth=8', `--size=${diskBytes}`, '--time_based', `--runtime=${runtimeS}`, '--output-format=json', '--randseed=11'];
  if (rate !== undefined) args.push(`--rate=${rate}`);
  return new Promise((resolve, reject) => {
    const child = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.on('error', reject);
    child.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio exited ${code}`));
      const job = (JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ write: { bw_bytes: number } }> }).jobs[0]!;
      resolve(job.write.bw_bytes / 1e6);
    });
  });
}

async function peer(dir: string): Promise<number> {
  const file = path.join(dir, 'peer.img');
  execFileSync('truncate', ['-s', String(diskBytes), file]);
  const port = await freePort();
  const server = spawn('qemu-nbd', ['-f', 'raw', '-x', 'disk0', '-b', '127.0.0.1', '-p', String(port), '--persistent', file], { stdio: 'ignore' });
  try {
    for (let i = 0; i < 50; i++) {
      if (await new Promise<boolean>((r) => { const s = net.connect(port, '127.0.0.1', () => { s.destroy(); r(true); }); s.on('error', () => r(false)); })) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    return await fio(`nbd://127.0.0.1:${port}/disk0`, undefined);
  } finally {
    server.kill('SIGTERM');
    fs.rmSync(file, { force: true });
  }
}

async function main(): Promise<void> {
  if (!hasTool('fio') || !hasTool('qemu-nbd')) {
    const skipped = { name: 'e2e', skipped: 'fio or qemu-nbd missing' };
    console.log(JSON.stringify(skipped));
    return;
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-e2e-'));
  try {
    const peerMBs = await peer(dir);
    const demo = new Demo({ dataDir: path.join(dir, 'demo'), sizeBytes: diskBytes, nbdListen: `127.0.0.1:${await freePort()}`, intervalMs, logger: silentLogger() });
    const manifest = await demo.start();
    const rpo: number[] = [];
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        const d = demo.status().disks[0];
        if (d?.rpoSeconds !== null && d?.rpoSeconds !== undefined) rpo.push(d.rpoSeconds);
        await new Promise((r) => setTimeout(r, 250));
      }
    })();
    const started = Date.now();
    const churnMBs = await fio(manifest.nbd, targetRate);
    const churnEnded = Date.now();
    sampling = false;
    await sampler;
    const beforeDrain = demo.status().disks[0]!;
    const overflowed = beforeDrain.resync !== undefined;
    // Drain: everything written must reach the target.
    await demo.drainAndStop();
    const drainedMs = Date.now() - churnEnded;
    const after = demo.status().disks[0];
    const appliedMB = (after?.appliedBytesTotal ?? beforeDrain.appliedBytesTotal) / 1e6;
    const result = {
      name: 'e2e',
      quick,
      disk: `${diskBytes / MiB} MiB sparse raw -> sparse VMDK with undo journal`,
      environment: 'one process (demo), UV_USE_IO_URING=0',
      job: `fio 64 KiB randwrite QD8, target ${targetRate}B/s, ${runtimeS} s, cuts every ${intervalMs} ms`,
      peer: 'same fio job against qemu-nbd serving a raw file (no replication)',
      churnMBs: Number(churnMBs.toFixed(1)),
      peerMBs: Number(peerMBs.toFixed(1)),
      ratio: Number((churnMBs / peerMBs).toFixed(3)),
      appliedMBs: Number((appliedMB / ((Date.now() - started) / 1000)).toFixed(1)),
      rpoP50Seconds: percentile(rpo, 50),
      rpoP99Seconds: percentile(rpo, 99),
      rpoSamples: rpo.length,
      drainAfterChurnMs: drainedMs,
      overflowedIntoResync: overflowed,
      goal: 'churn >= 200 MB/s with RPO p99 < 2 s (issue 6)',
    };
    fs.mkdirSync(path.join(__dirname, 'results'), { recursive: true });
    fs.writeFileSync(path.join(__dirname, 'results', 'e2e.json'), `${JSON.stringify(result, null, 2)}\n`);
    console.log(JSON.stringify(result, null, 2));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// The demo's roles run in this process; like every blockrelay role they run
// with libuv's thread pool for file I/O (see bench/tap.bench.ts and
// docs/operations.md), which must be set before node starts: re-run so.
if (process.env.UV_USE_IO_URING !== '0') {
  const child = spawn(process.execPath, [...process.execArgv, __filename, ...process.argv.slice(2)], { stdio: 'inherit', env: { ...process.env, UV_USE_IO_URING: '0' } });
  child.on('exit', (code) => { process.exitCode = code ?? 1; });
} else {
  main().catch((err) => {
    console.error(err);
    process.exitCode = 1;
  });
}
