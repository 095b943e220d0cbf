import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { systemClock } from '../../src/platform/clock';
import { DiskHealth } from '../../src/retry/health';
import { READ_END_SKEW_ALLOWANCE_MS } from '../../src/resync/networked-resync';
import { failover, loadPoints } from '../../src/retention/failover';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { getDiskState } from '../../src/transport/log-client';
import { LogShipper } from '../../src/transport/log-shipper';
import { cliCommand } from '../helpers/cli';
import { freePort } from '../helpers/net';
import { prng } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { useRetentionDirs } from '../retention/retention-fixture';
import { quiet } from '../transport/transport-fixture';

const SECRET = 'process-server-secret-0123';
const MT_SECRET = 'master-target-secret-0123';
const DISK_BYTES = 16 * 1024 * 1024;
const BLOCK = 4096;
/** The source's writes: a log is sealed this often while the resync runs. */
const SEAL_EVERY_MS = 150;
/** Fast enough for a test, slow enough that the kills land mid-session. */
const READ_RATE_BYTES_PER_SEC = 5 * 1024 * 1024;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A blockrelay CLI child that the test can SIGKILL and start again with the same arguments. */
class CliChild {
  child: ChildProcess | undefined;
  stderr = '';
  stdout = '';
  exited: Promise<number | null> = Promise.resolve(null);
  starts = 0;

  constructor(private readonly name: string, private readonly args: string[], private readonly env: NodeJS.ProcessEnv = {}) {}

  /** Starts it; with `ready`, waits until stderr matches. */
  async start(ready?: RegExp): Promise<void> {
    const { command, args } = cliCommand(this.args);
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...this.env } });
    this.child = child;
    this.starts++;
    this.stdout = '';
    const mark = this.stderr.length;
    child.stdout!.on('data', (d) => { this.stdout += d; });
    this.exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
    if (ready === undefined) {
      child.stderr!.on('data', (d) => { this.stderr += d; });
      return;
    }
    await new Promise<void>((resolve, reject) => {
      child.stderr!.on('data', (d) => {
        this.stderr += d;
        if (ready.test(this.stderr.slice(mark))) resolve();
      });
      void this.exited.then((code) => reject(new Error(`${this.name} exited (${code}) before it was ready: ${this.stderr.slice(mark)}`)));
    });
  }

  get running(): boolean {
    return this.child !== undefined && this.child.exitCode === null && this.child.signalCode === null;
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.child;
    if (child === undefined || !this.running) return;
    child.kill(signal);
    await this.exited;
  }
}

interface Write {
  readonly offset: number;
  readonly data: Buffer;
}

/**
 * The protected disk's writer: writes land in the source image first, as
 * a tap writes the disk, and go into the active log, sealed every
 * SEAL_EVERY_MS and shipped by a real LogShipper to the process server.
 */
class SourceWriter {
  readonly logs = new Map<number, Write[]>();
  private readonly sealed = new Map<number, { seq: number; file: string; cutTimeMs: number; cutId: string }>();
  private seq = 0;
  private readonly fd: number;
  readonly shipper: LogShipper;

  constructor(private readonly sourceFile: string, private readonly logDir: string, psUrl: string, private readonly rand: () => number) {
    fs.mkdirSync(logDir, { recursive: true });
    this.fd = fs.openSync(sourceFile, 'r+');
    this.shipper = new LogShipper(
      {
        diskId: 'disk0',
        diskSizeBytes: DISK_BYTES,
        sealedLogs: async () => [...this.sealed.values()].sort((a, b) => a.seq - b.seq),
        acknowledge: async (seq) => {
          const log = this.sealed.get(seq);
          this.sealed.delete(seq);
          if (log !== undefined) fs.rmSync(log.file, { force: true });
        },
      },
      { peer: { url: psUrl, secret: SECRET, timeoutMs: 3000 }, clock: systemClock, ...quiet(), health: new DiskHealth('disk0'), retryPolicy: { scheduleOffsetsMs: [50, 100, 200], steadyIntervalMs: 200, maxRetries: 1000 } },
    );
    this.shipper.start();
  }

  get lastSeq(): number {
    return this.seq;
  }

  /** Writes a few random runs to the disk and seals them as the next log. */
  async writeAndSeal(writes = 6): Promise<number> {
    const seq = ++this.seq;
    const file = path.join(this.logDir, `disk0-${String(seq).padStart(6, '0')}.hrl`);
    const writer = await HrlWriter.create(file);
    const list: Write[] = [];
    for (let i = 0; i < writes; i++) {
      const blocks = 1 + Math.floor(this.rand() * 4);
      const offset = Math.floor(this.rand() * (DISK_BYTES / BLOCK - blocks)) * BLOCK;
      const data = Buffer.alloc(blocks * BLOCK);
      for (let j = 0; j < data.length; j += 4) data.writeUInt32LE(Math.floor(this.rand() * 2 ** 32), j);
      fs.writeSync(this.fd, data, 0, data.length, offset);
      await writer.append(offset, data);
      list.push({ offset, data });
    }
    await writer.seal();
    await writer.close();
    this.logs.set(seq, list);
    this.sealed.set(seq, { seq, file, cutTimeMs: Date.now(), cutId: `cut-${seq}` });
    this.shipper.wake();
    return seq;
  }

  /** The disk after logs up to `seq`, from `base`. */
  replay(base: Buffer, seq: number): Buffer {
    const out = Buffer.from(base);
    for (let s = 1; s <= seq; s++) for (const w of this.logs.get(s) ?? []) w.data.copy(out, w.offset);
    return out;
  }

  async close(): Promise<void> {
    await this.shipper.stop();
    fs.closeSync(this.fd);
  }
}

describe('networked resync with its processes killed at random moments', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const children: CliChild[] = [];
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of children.splice(0)) await c.kill();
    for (const c of cleanup.splice(0)) await c().catch(() => undefined);
  });

  type Victim = 'client' | 'mt' | 'ps';
  const ALL: Victim[] = ['client', 'mt', 'ps'];
  const scenarios: Array<{ name: string; seed: number; victims: (rand: () => number) => Victim[]; historyKept: boolean }> = [
    // Each of the three once, in a random order, then one more at random.
    ...[5].map((seed) => ({ name: `the master target, the process server and the resync client (seed ${seed})`, seed, victims: (rand: () => number) => [...[...ALL].sort(() => rand() - 0.5), ALL[Math.floor(rand() * 3)]!], historyKept: false })),
    // The master target keeps running: its session journal is never cut short, so no history may be lost.
    { name: 'the process server and the resync client only; history is kept', seed: 3, victims: () => ['ps', 'client', 'ps'], historyKept: true },
  ];

  for (const scenario of scenarios) it(`resumes after SIGKILLs of ${scenario.name}, converges, and keeps history exact or drops it explicitly`, async () => {
    if (!requireTool('qemu-img')) return;
    const seed = Number(process.env.RESYNC_CRASH_SEED ?? scenario.seed);
    const rand = prng(seed);
    const dir = tmp();
    const retentionDir = retentionTmp();
    const [psPort, mtPort] = [await freePort(), await freePort()];
    const psUrl = `http://127.0.0.1:${psPort}`;
    const mtUrl = `http://127.0.0.1:${mtPort}`;

    // A first sync onto an existing disk: the target is an older copy that differs in every seventh block.
    const sourceBase = Buffer.alloc(DISK_BYTES);
    for (let i = 0; i < DISK_BYTES; i += 4) sourceBase.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
    const targetBase = Buffer.from(sourceBase);
    for (let block = 0; block < DISK_BYTES / BLOCK; block += 7) targetBase.fill(0xee, block * BLOCK, (block + 1) * BLOCK);
    const sourceFile = path.join(dir, 'source.img');
    const targetFile = path.join(dir, 'target.img');
    fs.writeFileSync(sourceFile, sourceBase);
    fs.writeFileSync(targetFile, targetBase);

    const mtConfig = path.join(dir, 'mt.json');
    fs.writeFileSync(mtConfig, JSON.stringify({ stateDir: path.join(dir, 'mt'), listen: `127.0.0.1:${mtPort}`, secret: MT_SECRET, log: { level: 'warn' }, retention: { dir: retentionDir }, disks: [{ id: 'disk0', target: `raw:${targetFile}` }] }));
    const psConfig = path.join(dir, 'ps.json');
    fs.writeFileSync(psConfig, JSON.stringify({ stateDir: path.join(dir, 'ps'), listen: `127.0.0.1:${psPort}`, secret: SECRET, log: { level: 'warn' }, forward: { url: mtUrl, secret: MT_SECRET, timeoutSeconds: 3 } }));
    const mt = new CliChild('master-target', ['master-target', '--config', mtConfig]);
    const ps = new CliChild('process-server', ['process-server', '--config', psConfig]);
    const statePath = path.join(dir, 'resync.state');
    const client = new CliChild('resync', ['resync', `raw:${sourceFile}`, '--process-server', psUrl, '--disk', 'disk0', '--state', statePath, '--json', '--retry-ms', '200', '--checkpoint-ms', '50', '--max-read-rate', String(READ_RATE_BYTES_PER_SEC)], { BLOCKRELAY_SECRET: SECRET });
    children.push(client, ps, mt);
    const listening = /listening on/;
    await mt.start(listening);
    await ps.start(listening);

    const writer = new SourceWriter(sourceFile, path.join(dir, 'logs'), psUrl, rand);
    cleanup.push(() => writer.close());
    const mtPeer = { url: mtUrl, secret: MT_SECRET };
    const waitApplied = async (seq: number, withinMs: number): Promise<void> => {
      const deadline = Date.now() + withinMs;
      for (;;) {
        const state = (await getDiskState(mtPeer, 'disk0').catch(() => undefined)) as { appliedSeq?: number | null } | undefined;
        if ((state?.appliedSeq ?? 0) >= seq) return;
        if (Date.now() > deadline) throw new Error(`log ${seq} not applied within ${withinMs} ms (${JSON.stringify(state)}); mt: ${mt.stderr.slice(-2000)} ps: ${ps.stderr.slice(-2000)}`);
        await sleep(100);
      }
    };
    // Three logs replicate before the resync: their points are the history to keep.
    for (let i = 0; i < 3; i++) await writer.writeAndSeal();
    await waitApplied(3, 20_000);

    // The process server's forwarding retries on the product's policy (first retry after a minute):
    // after the master target comes back, a process server waiting out that minute is restarted.
    const unstickForwarding = async (): Promise<void> => {
      const status = (await fetch(`${psUrl}/v1/status`).then((r) => r.json()).catch(() => undefined)) as { disks?: Array<{ diskId: string; state: string }> } | undefined;
      if (status?.disks?.some((d) => d.diskId === 'disk0' && d.state === 'retrying') === true) {
        await ps.kill();
        await ps.start(listening);
      }
    };

    // Writes go on all along.
    let writing = true;
    const writes = (async () => {
      while (writing) {
        await writer.writeAndSeal();
        await sleep(SEAL_EVERY_MS);
      }
    })();

    await client.start();
    // The kills start once the resync has saved progress (it is under way in a session).
    for (let waited = 0; !fs.existsSync(statePath) && client.running && waited < 20_000; waited += 20) await sleep(20);
    // Each victim is killed at a random moment and started again.
    const victims = scenario.victims(rand);
    const killed: string[] = [];
    for (const victim of victims) {
      await sleep(300 + Math.floor(rand() * 900));
      if (!client.running) break;
      if (victim === 'client') {
        await client.kill();
        await client.start();
      } else if (victim === 'mt') {
        await mt.kill();
        await mt.start(listening);
        await unstickForwarding();
      } else {
        await ps.kill();
        await ps.start(listening);
      }
      killed.push(victim);
    }
    const status = await Promise.race([client.exited, sleep(40_000).then(() => 'timeout' as const)]);
    expect(status, `resync client: ${client.stderr.slice(-3000)}`).toBe(0);
    // Most kills landed while the resync ran (the seed decides; a kill after it finished tests nothing).
    expect(killed.length, `kills before the resync finished: ${killed.join(', ')}`).toBeGreaterThanOrEqual(Math.min(3, victims.length));
    const result = JSON.parse(client.stdout) as { blocksCompared: number; totals: { blocksCompared: number }; resumedFromBytes: number; endConfirmed: boolean };
    expect(result.endConfirmed).toBe(true);
    // Resumed, not started over at every kill: at most the disk once more in total.
    expect(result.totals.blocksCompared).toBeLessThan(2 * (DISK_BYTES / BLOCK));

    // Logs cut within the clock-skew allowance after the last read (the CLI knows no sequence) end no point: write past it.
    await sleep(READ_END_SKEW_ALLOWANCE_MS + 1000);
    writing = false;
    await writes;
    const last = await writer.writeAndSeal();
    await writer.shipper.whenIdle();
    await waitApplied(last, 30_000);
    await ps.kill('SIGTERM');
    await mt.kill('SIGTERM');

    // The target converged to the source.
    execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', sourceFile, targetFile]);
    expect(fs.readFileSync(targetFile).equals(writer.replay(sourceBase, last))).toBe(true);

    // History: points before the resync rebuild exactly, unless they were dropped explicitly.
    // The first resync point is the slot after the log the first session followed; a drop removes it too.
    const { points } = await loadPoints(retentionDir, 'disk0');
    const dropped = /BR_RESYNC_HISTORY_DROPPED/.test(mt.stderr);
    const offered = points.filter((p) => p.resync !== true);
    const firstResync = points.find((p) => p.resync === true)?.seq;
    const before = firstResync === undefined ? [] : offered.filter((p) => p.seq < firstResync);
    const after = offered.filter((p) => firstResync === undefined || p.seq > firstResync);
    const described = `points ${JSON.stringify(points.map((p) => [p.seq, p.resync === true]))}, seed ${seed}, kills ${killed.join(', ')}`;
    if (scenario.historyKept) expect(dropped, described).toBe(false);
    if (!dropped) {
      expect(firstResync, `a session that journaled leaves a resync point: ${described}`).toBeDefined();
      expect(before.map((p) => p.seq).slice(0, 3), `points before the resync vanished without BR_RESYNC_HISTORY_DROPPED: ${described}`).toEqual([1, 2, 3]);
    }
    // Points after the resync: the newest and a few others.
    const sample = [...before, ...after.slice(-2), ...after.slice(0, -2).filter(() => rand() < 0.1).slice(0, 3)];
    expect(after.length).toBeGreaterThan(0);
    for (const p of sample) {
      const out = path.join(dir, `point-${p.seq}.img`);
      await failover({ retentionDir, diskId: 'disk0', point: `disk0-${p.seq}`, out: `raw:${out}` });
      const expected = firstResync !== undefined && p.seq < firstResync ? writer.replay(targetBase, p.seq) : writer.replay(sourceBase, p.seq);
      expect(fs.readFileSync(out).equals(expected), `point ${p.seq} (${described}, history dropped: ${dropped})`).toBe(true);
      fs.rmSync(out);
    }
  }, 60_000);
});
