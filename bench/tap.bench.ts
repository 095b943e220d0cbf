/**
 * The source tap against qemu-nbd, same fio jobs, same disk, one run:
 *
 *   npx tsx bench/tap.bench.ts [--quick]
 *
 * Jobs (fio --ioengine=nbd, random writes over the whole image, time-based):
 *   - 64 KiB random writes, iodepth 8
 *   - 4 KiB random writes, iodepth 16
 *   - 4 KiB random writes, iodepth 1, a FLUSH after each (fio --fsync=1):
 *     write+FLUSH cycles per second, a figure for FLUSH latency, not a goal
 *   - only with `--job flush8`: the same at iodepth 8, where FLUSHes in
 *     flight together share the disk's and the tracker's sync rounds
 * Servers, each serving a preallocated raw image in the same temp directory:
 *   - qemu-nbd -f raw --cache=writeback --aio=threads (qemu's defaults, page
 *     cache like the tap's raw target; neither uses O_DIRECT)
 *   - the tap (SourceRole, in its own process like qemu-nbd) with data
 *     logging: every write lands on the disk and in the active [MS-HRL] log
 *     (logs in the same directory; the overflow threshold is raised so the
 *     run stays in logging mode)
 *   - the tap with dirty-map-only tracking: the tracker is driven into its
 *     overflow mode before the run, so writes only mark the dirty map
 * The tap serves the transmission phase natively (native/tap-transmission.cc:
 * a thread per connection receives, a logger and a writer thread per export
 * append to the log and write the disk); `--typescript-path` measures the
 * TypeScript path instead (NbdServer nativeDataPath: false).
 * The tap process runs with UV_USE_IO_URING=0 (libuv's thread pool for file
 * I/O). Node 20's libuv submits buffered file writes through io_uring, which
 * completes them inline on the event-loop thread; on this 2-core machine
 * that halves the tap's write rate. `--io-uring` measures the default
 * instead. Deployments should set the variable for every blockrelay role.
 * Runs are interleaved (qemu-nbd, logging, dirty-only per repetition) and
 * each figure is the median over the repetitions. Ratios are tap / qemu-nbd
 * for IOPS and bandwidth (above 1: the tap is faster). Goals (issue 5):
 * ≥ 0.8 with logging, ≥ 0.95 dirty-map-only.
 *
 * The logging tap coalesces exact overwrites in its open log (an extent
 * written again before the cut is rewritten in place, docs/formats/ms-hrl.md):
 * with no cut during a run (as here) its log grows with the distinct extents
 * written, not with every write, the best case for it. `--compare-coalescing`
 * adds the logging tap with coalescing off (a figure beside the goal's).
 *
 * `--job 64k` (or `4k`, `flush`, `flush8`) runs only that job, `--logging-only` leaves out the
 * dirty-map-only tap, and `--repetitions N` overrides the count: for quick
 * looks while tuning one path; such partial runs do not write the results file.
 *
 * Prints one JSON document and writes it to bench/results/tap.json.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { cpuTimeFromProcStat } from '../src/platform/cpu-time';
import { SourceRole } from '../src/tap/source-role';
import { RawTarget } from '../src/targets/raw/raw-target';

const quick = process.argv.includes('--quick');
const ioUring = process.argv.includes('--io-uring');
const typescriptPath = process.argv.includes('--typescript-path');
const MiB = 1024 * 1024;
const runtimeS = quick ? 3 : 6;
function argAfter(flag: string): string | undefined {
  const i = process.argv.indexOf(flag);
  return i >= 0 ? process.argv[i + 1] : undefined;
}
const onlyJob = argAfter('--job');
const loggingOnly = process.argv.includes('--logging-only');
const repetitions = Number(argAfter('--repetitions') ?? (quick ? 1 : 3));
const partial = onlyJob !== undefined || loggingOnly;
const diskBytes = (quick ? 1024 : 2048) * MiB;

interface Job {
  readonly key: string;
  /** What `--job` selects. */
  readonly name: string;
  readonly bs: string;
  readonly iodepth: number;
  /** fio --fsync: a FLUSH after every this many writes (0: none). */
  readonly fsync: number;
  /** Whether the job is one of issue 5's speed goals (the FLUSH jobs are figures only, against the logging tap). */
  readonly goal: boolean;
  /** Run only when named with --job (keeps the default runs short). */
  readonly onlyWhenNamed?: boolean;
}

/** The servers a job runs against: the FLUSH figure leaves out the dirty-map-only tap (it keeps --quick short). */
function serversOf(job: Job): readonly Server[] {
  return job.goal ? SERVERS : SERVERS.filter((s) => s !== 'tap dirty-map-only');
}

const JOBS: readonly Job[] = [
  { key: '64 KiB randwrite QD8', name: '64k', bs: '64k', iodepth: 8, fsync: 0, goal: true },
  { key: '4 KiB randwrite QD16', name: '4k', bs: '4k', iodepth: 16, fsync: 0, goal: true },
  // Write+FLUSH cycles per second: a FLUSH's latency (disk, tracker maps and
  // log made durable before the reply) against qemu-nbd's (its fdatasync).
  { key: '4 KiB randwrite QD1, FLUSH after each', name: 'flush', bs: '4k', iodepth: 1, fsync: 1, goal: false },
  // The same with eight in flight: FLUSHes that arrive together share sync rounds.
  { key: '4 KiB randwrite QD8, FLUSH after each', name: 'flush8', bs: '4k', iodepth: 8, fsync: 1, goal: false, onlyWhenNamed: true },
].filter((j) => (onlyJob === undefined ? !j.onlyWhenNamed : j.name === onlyJob));

/** `--compare-coalescing`: also the logging tap with exact overwrites appended, not rewritten in place (a figure, not a goal). */
const compareCoalescing = process.argv.includes('--compare-coalescing');
type Server = 'qemu-nbd' | 'tap logging' | 'tap logging uncoalesced' | 'tap dirty-map-only';
const SERVERS: readonly Server[] = (['qemu-nbd', 'tap logging', 'tap logging uncoalesced', 'tap dirty-map-only'] as const)
  .filter((s) => !loggingOnly || s !== 'tap dirty-map-only')
  .filter((s) => compareCoalescing || s !== 'tap logging uncoalesced');

interface Sample {
  iops: number;
  bwMiBs: number;
  /** CPU seconds the server process used per GiB fio wrote (Linux; NaN elsewhere). */
  serverCpuSPerGiB: number;
  /**
   * MB/s the block device under the temp directory took while fio ran
   * (Linux; NaN elsewhere; other work on the machine included). qemu-nbd's
   * image stays in the page cache for a run, so this is near 0 for it; the
   * tap's log grows at the write rate and must reach the disk.
   */
  deviceWriteMBs: number;
}

/**
 * User plus system CPU seconds a process has used so far (all its threads,
 * from /proc), or NaN. On a machine shared with other work the IOPS of a run
 * swing with the load; the server's own CPU per GiB written does much less.
 */
function cpuSeconds(pid: number | undefined): number {
  const used = pid === undefined ? undefined : cpuTimeFromProcStat(`/proc/${pid}/stat`);
  return used === undefined ? Number.NaN : (used.userMs + used.systemMs) / 1000;
}

/** /sys/dev/block/MAJ:MIN/stat of the device holding `dir` (Linux), or undefined. */
function blockDeviceStatFile(dir: string): string | undefined {
  try {
    const dev = fs.statSync(dir).dev;
    // Linux's st_dev encoding (new_encode_dev): 12 bits of major above 8 of minor, the rest of minor above.
    const major = Math.floor(dev / 256) & 0xfff;
    const minor = (dev & 0xff) | (Math.floor(dev / 4096) & ~0xff);
    const file = `/sys/dev/block/${major}:${minor}/stat`;
    return fs.existsSync(file) ? file : undefined;
  } catch {
    return undefined;
  }
}

/** Bytes written to the device so far (sectors written, field 7, are 512 bytes), or NaN. */
function deviceWrittenBytes(statFile: string | undefined): number {
  if (statFile === undefined) return Number.NaN;
  try {
    return Number(fs.readFileSync(statFile, 'utf8').trim().split(/\s+/)[6]) * 512;
  } catch {
    return Number.NaN;
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

async function waitForPort(port: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port }, () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`nothing listens on ${port}`);
}

function fio(uri: string, serverPid: number | undefined, job: Job, out: string): Promise<Sample> {
  const cpuBefore = cpuSeconds(serverPid);
  const deviceStat = blockDeviceStatFile(path.dirname(out));
  const deviceBefore = deviceWrittenBytes(deviceStat);
  const startedMs = Date.now();
  return new Promise((resolve, reject) => {
    const args = [
      '--name=bench', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', `--bs=${job.bs}`, `--iodepth=${job.iodepth}`,
      ...(job.fsync > 0 ? [`--fsync=${job.fsync}`] : []), `--size=${diskBytes}`, '--time_based', `--runtime=${runtimeS}`, '--norandommap', '--randrepeat=0',
      '--output-format=json', `--output=${out}`,
    ];
    const child = spawn('fio', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => { stderr += d; });
    child.on('error', reject);
    child.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio exited with ${code}: ${stderr}`));
      const w = JSON.parse(fs.readFileSync(out, 'utf8')).jobs[0].write;
      const cpu = cpuSeconds(serverPid) - cpuBefore;
      // Over fio's whole run, its start included, so a little below the rate while writing.
      const deviceWriteMBs = (deviceWrittenBytes(deviceStat) - deviceBefore) / 1e6 / ((Date.now() - startedMs) / 1000);
      resolve({ iops: w.iops, bwMiBs: w.bw_bytes / MiB, serverCpuSPerGiB: cpu / (w.io_bytes / (1024 * MiB)), deviceWriteMBs });
    });
  });
}

/**
 * How fast this disk takes a growing file: fio writing 1 MiB blocks with
 * O_DIRECT, four in flight, into space reserved ahead with KEEP_SIZE (as the
 * tap's log appender does), for as long as a job runs. With data logging
 * every byte a client writes must reach the disk in the log within the run,
 * while qemu-nbd's image stays in the page cache, so this over qemu-nbd's
 * rate bounds the logging ratio any tap could reach on this machine.
 */
function diskCeilingMiBs(dir: string): Promise<number> {
  const file = path.join(dir, 'ceiling.bin');
  const out = path.join(dir, 'ceiling.json');
  return new Promise((resolve, reject) => {
    const args = [
      '--name=ceiling', '--ioengine=libaio', '--direct=1', '--rw=write', '--bs=1m', '--iodepth=4', '--size=16g', '--fallocate=keep',
      '--time_based', `--runtime=${runtimeS}`, `--filename=${file}`, '--output-format=json', `--output=${out}`,
    ];
    const child = spawn('fio', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => { stderr += d; });
    child.on('error', reject);
    child.on('exit', (code) => {
      try {
        if (code !== 0) return reject(new Error(`fio (disk ceiling) exited with ${code}: ${stderr}`));
        resolve(JSON.parse(fs.readFileSync(out, 'utf8')).jobs[0].write.bw_bytes / MiB);
      } finally {
        fs.rmSync(file, { force: true });
      }
    });
  });
}

/**
 * A preallocated raw image, so neither server pays for block allocation
 * during the run. It is made once and shared by every run: deleting an image
 * whose random writes are still being written back blocks for tens of
 * seconds on this disk, and the runs are interleaved, so the background
 * writeback of one run burdens the next server in turn.
 */
function makeImage(file: string): void {
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', '-o', 'preallocation=falloc', file, String(diskBytes)]);
}

async function withQemuNbd<T>(image: string, fn: (uri: string, pid: number | undefined) => Promise<T>): Promise<T> {
  const port = await freePort();
  const child: ChildProcess = spawn('qemu-nbd', ['-f', 'raw', '--cache=writeback', '--aio=threads', '--persistent', '-b', '127.0.0.1', '-p', String(port), '-x', 'disk0', image], { stdio: 'ignore' });
  try {
    await waitForPort(port);
    return await fn(`nbd://127.0.0.1:${port}/disk0`, child.pid);
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
  }
}

/**
 * Runs the tap in a child process (this file with `--serve`), so it has its
 * own event loop and CPU like qemu-nbd, and its own libuv settings.
 */
async function withTap<T>(image: string, logDir: string, mode: 'logging' | 'logging-uncoalesced' | 'dirty-map-only', fn: (uri: string, pid: number | undefined) => Promise<T>): Promise<T> {
  fs.rmSync(logDir, { recursive: true, force: true });
  const env = { ...process.env };
  if (ioUring) delete env.UV_USE_IO_URING;
  else env.UV_USE_IO_URING = '0';
  const child = spawn(process.execPath, ['--import', 'tsx', __filename, '--serve', mode, image, logDir, ...(typescriptPath ? ['--typescript-path'] : [])], {
    cwd: path.dirname(__dirname),
    env,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  try {
    const uri = await new Promise<string>((resolve, reject) => {
      let out = '';
      child.stdout!.on('data', (d) => {
        out += d;
        const m = /^READY (\S+)$/m.exec(out);
        if (m) resolve(m[1]!);
      });
      void exited.then((code) => reject(new Error(`tap server exited with ${code}`)));
    });
    return await fn(uri, child.pid);
  } finally {
    child.kill('SIGTERM');
    const code = await exited;
    if (code !== 0) throw new Error(`tap server ended with status ${code} (tracker left its mode?)`);
  }
}

/** The child side: serve one image until SIGTERM, then check the tracker stayed in its mode. */
async function serve(mode: string, image: string, logDir: string): Promise<void> {
  const dirtyOnly = mode === 'dirty-map-only';
  const target = await RawTarget.open(image);
  const role = await SourceRole.start({
    disks: [{ id: 'disk0', target }],
    logDir,
    listenHost: '127.0.0.1',
    listenPort: 0,
    // No cut during the run: rotation cost is not what this measures.
    intervalMs: 24 * 60 * 60 * 1000,
    // Logging: allow the unshipped logs to reach 10x the disk (the maximum)
    // so the run never overflows. Dirty-only: the smallest ratio, so the
    // first write overflows and the tracker keeps only the dirty map.
    tracker: { overflowRatio: dirtyOnly ? 1e-12 : 10, coalesceOverwrites: mode !== 'logging-uncoalesced' },
    nativeDataPath: !typescriptPath,
  });
  const tracker = role.trackers.get('disk0')!;
  if (dirtyOnly) await tracker.recordWrite(0, Buffer.alloc(512));
  if (tracker.status().mode !== (dirtyOnly ? 'dirty-only' : 'logging')) throw new Error(`tracker starts in mode ${tracker.status().mode}`);
  process.stdout.write(`READY ${role.exportUris.disk0}\n`);
  await new Promise<void>((resolve) => process.once('SIGTERM', () => resolve()));
  const status = tracker.status();
  const ok = status.mode === (dirtyOnly ? 'dirty-only' : 'logging');
  if (!dirtyOnly) process.stderr.write(`  tap ${mode}: active log ${(status.unshippedBytes / MiB).toFixed(0)} MiB, ${(status.activeLogRewrittenBytes / MiB).toFixed(0)} MiB rewritten in place\n`);
  // Teardown (sealing a log of gigabytes, fsyncing the image) is not
  // measured and would only stretch the bench; the temp directory goes.
  process.exit(ok ? 0 : 3);
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-bench-tap-'));
  const samples = new Map<string, Sample[]>();
  const startedMs = Date.now();
  try {
    const image = path.join(dir, 'disk0.img');
    const logDir = path.join(dir, 'logs');
    makeImage(image);
    const ceilings: number[] = [];
    for (let rep = 0; rep < repetitions; rep++) {
      if (JOBS.some((j) => j.goal)) {
        ceilings.push(await diskCeilingMiBs(dir));
        process.stderr.write(`rep ${rep + 1}/${repetitions} disk ceiling (growing file, O_DIRECT): ${ceilings.at(-1)!.toFixed(1)} MiB/s\n`);
      }
      for (const job of JOBS) {
        for (const server of serversOf(job)) {
          const out = path.join(dir, 'fio.json');
          const run = (uri: string, pid: number | undefined): Promise<Sample> => fio(uri, pid, job, out);
          const sample =
            server === 'qemu-nbd' ? await withQemuNbd(image, run) : await withTap(image, logDir, server === 'tap dirty-map-only' ? 'dirty-map-only' : server === 'tap logging uncoalesced' ? 'logging-uncoalesced' : 'logging', run);
          const key = `${job.key}|${server}`;
          samples.set(key, [...(samples.get(key) ?? []), sample]);
          process.stderr.write(`rep ${rep + 1}/${repetitions} ${job.key} ${server}: ${sample.iops.toFixed(0)} IOPS, ${sample.bwMiBs.toFixed(1)} MiB/s, server ${sample.serverCpuSPerGiB.toFixed(3)} CPU-s/GiB, device ${sample.deviceWriteMBs.toFixed(0)} MB/s written (${((Date.now() - startedMs) / 1000).toFixed(1)} s)\n`);
        }
      }
    }
    const figures: Record<string, number> = {};
    const ratios: Record<string, number> = {};
    const jobs: Record<string, Record<string, { iops: number; bwMiBs: number; serverCpuSPerGiB: number; deviceWriteMBs: number; samples: Sample[] }>> = {};
    // tap / qemu-nbd server CPU per GiB written (below 1: the tap spends less); not part of the goal.
    const cpuRatios: Record<string, number> = {};
    for (const job of JOBS) {
      jobs[job.key] = {};
      for (const server of serversOf(job)) {
        const s = samples.get(`${job.key}|${server}`)!;
        const m = {
          iops: median(s.map((x) => x.iops)),
          bwMiBs: median(s.map((x) => x.bwMiBs)),
          serverCpuSPerGiB: median(s.map((x) => x.serverCpuSPerGiB)),
          deviceWriteMBs: median(s.map((x) => x.deviceWriteMBs)),
          samples: s,
        };
        jobs[job.key]![server] = m;
        figures[`${job.key}, ${server}, IOPS`] = Math.round(m.iops);
        figures[`${job.key}, ${server}, MiB/s`] = Number(m.bwMiBs.toFixed(1));
        figures[`${job.key}, ${server}, server CPU-s per GiB`] = Number(m.serverCpuSPerGiB.toFixed(3));
        figures[`${job.key}, ${server}, device write MB/s`] = Math.round(m.deviceWriteMBs);
      }
      const peer = jobs[job.key]!['qemu-nbd']!;
      for (const server of serversOf(job)) {
        if (server === 'qemu-nbd') continue;
        const ours = jobs[job.key]![server]!;
        ratios[`${job.key}, ${server}, IOPS`] = Number((ours.iops / peer.iops).toFixed(3));
        ratios[`${job.key}, ${server}, bandwidth`] = Number((ours.bwMiBs / peer.bwMiBs).toFixed(3));
        cpuRatios[`${job.key}, ${server}`] = Number((ours.serverCpuSPerGiB / peer.serverCpuSPerGiB).toFixed(3));
      }
    }
    // What the disk allows with logging: the growing-file rate over
    // qemu-nbd's (the best logging ratio on this disk), and the tap's share of it.
    const ceilingRatios: Record<string, number> = {};
    if (ceilings.length > 0) {
      const ceiling = median(ceilings);
      figures['disk ceiling: growing file, O_DIRECT 1 MiB QD4, MiB/s'] = Number(ceiling.toFixed(1));
      for (const job of JOBS.filter((j) => j.goal && j.bs === '64k')) {
        const peer = jobs[job.key]!['qemu-nbd']!;
        const tap = jobs[job.key]!['tap logging']!;
        ceilingRatios[`${job.key}, disk ceiling / qemu-nbd`] = Number((ceiling / peer.bwMiBs).toFixed(3));
        ceilingRatios[`${job.key}, tap logging / disk ceiling`] = Number((tap.bwMiBs / ceiling).toFixed(3));
        // Also among the figures, which docs/benchmarks.md shows.
        for (const k of [`${job.key}, disk ceiling / qemu-nbd`, `${job.key}, tap logging / disk ceiling`]) figures[k] = ceilingRatios[k]!;
      }
    }
    // The goals are over the goal jobs only; the FLUSH job's ratios are figures.
    const goalRatios = Object.entries(ratios).filter(([k]) => JOBS.some((j) => j.goal && k.startsWith(`${j.key},`)) && !k.includes('uncoalesced'));
    const loggingMin = Math.min(...goalRatios.filter(([k]) => k.includes('logging')).map(([, v]) => v));
    const dirtyMin = Math.min(...goalRatios.filter(([k]) => k.includes('dirty-map-only')).map(([, v]) => v));
    const result = {
      bench: 'tap',
      quick,
      peer: 'qemu-nbd -f raw --cache=writeback --aio=threads',
      tapEnvironment: ioUring ? 'libuv default (io_uring for file I/O)' : 'UV_USE_IO_URING=0 (libuv thread pool for file I/O)',
      tapDataPath: typescriptPath ? 'TypeScript' : 'native',
      runtimeS,
      repetitions,
      diskBytes,
      ratios,
      ceilingRatios,
      cpuRatios,
      figures,
      goal: { text: 'tap / qemu-nbd ≥ 0.8 with data logging, ≥ 0.95 with dirty-map-only tracking', loggingMin, dirtyMin, met: loggingMin >= 0.8 && dirtyMin >= 0.95 },
      jobs,
      machine: { cpus: os.cpus().length, node: process.version },
      notes: [
        'fio --ioengine=nbd random writes over a preallocated raw image; time-based; medians over the repetitions',
        'the tap and qemu-nbd each run in their own process and write the image through the page cache (no O_DIRECT); the tap writes whole staging buffers of its log with O_DIRECT (at most three at once, the rest buffered) into blocks it reserves ahead of the log\'s end (fallocate KEEP_SIZE)',
        'device write MB/s: what the disk under the temp directory took during each fio run (other work on the machine included). The image fits in the page cache, so qemu-nbd writes next to nothing to the disk during a run; the tap\'s log grows at the write rate and must reach the disk, so with logging the tap is bound by how fast this disk takes a growing file',
        'disk ceiling: fio writing a growing file with O_DIRECT (1 MiB, QD4, space reserved ahead) for the same time, once per repetition; ceilingRatios give that rate over qemu-nbd\'s (the best 64 KiB logging ratio this disk allows) and the tap\'s logging rate over it',
      ],
      when: new Date().toISOString(),
    };
    const json = JSON.stringify(result, null, 2);
    process.stdout.write(`${json}\n`);
    if (!partial) {
      fs.mkdirSync(path.join(__dirname, 'results'), { recursive: true });
      fs.writeFileSync(path.join(__dirname, 'results', 'tap.json'), `${json}\n`);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const serveAt = process.argv.indexOf('--serve');
const entry = serveAt >= 0 ? serve(process.argv[serveAt + 1]!, process.argv[serveAt + 2]!, process.argv[serveAt + 3]!) : main();
void entry.catch((err: unknown) => {
  process.stderr.write(`${(err as Error)?.stack ?? String(err)}\n`);
  process.exitCode = 1;
});
