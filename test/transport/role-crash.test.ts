import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { systemClock } from '../../src/platform/clock';
import { withRetry } from '../../src/retry/retry-policy';
import { DiskHealth } from '../../src/retry/health';
import { getDiskState, sendLog } from '../../src/transport/log-client';
import { LogShipper } from '../../src/transport/log-shipper';
import { cliCommand } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { freePort } from '../helpers/net';
import { DISK_SIZE, makeLog, prng, quiet, SECRET, type WrittenLog } from './transport-fixture';

const MT_SECRET = 'master-target-secret-123';


/** A role run as a child process that the test can SIGKILL and start again. */
class RoleProcess {
  child: ChildProcess | undefined;
  starts = 0;
  constructor(private readonly role: string, private readonly configFile: string) {}

  async start(): Promise<void> {
    const { command, args } = cliCommand([this.role, '--config', this.configFile]);
    const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, LOG_LEVEL: 'error' } });
    this.child = child;
    this.starts++;
    let stderr = '';
    await new Promise<void>((resolve, reject) => {
      child.stderr!.on('data', (d) => {
        stderr += d;
        if (/listening on/.test(stderr)) resolve();
      });
      child.on('exit', (code) => reject(new Error(`${this.role} exited (${code}) before listening: ${stderr}`)));
    });
  }

  kill(): Promise<void> {
    const child = this.child;
    this.child = undefined;
    if (child === undefined || child.exitCode !== null) return Promise.resolve();
    return new Promise((resolve) => {
      child.on('exit', () => resolve());
      child.kill('SIGKILL');
    });
  }
}

describe('roles killed with SIGKILL', () => {
  const tmp = useTempDirs();
  const roles: RoleProcess[] = [];
  afterEach(async () => {
    for (const r of roles.splice(0)) await r.kill();
  });

  /** A master target writing `raw:DIR/target.img` behind a process server, each a CLI child on a free port. */
  async function startHops(dir: string) {
    const [psPort, mtPort] = [await freePort(), await freePort()];
    const target = path.join(dir, 'target.img');
    const mtConfig = path.join(dir, 'mt.json');
    fs.writeFileSync(mtConfig, JSON.stringify({ stateDir: path.join(dir, 'mt'), listen: `127.0.0.1:${mtPort}`, secret: MT_SECRET, disks: [{ id: 'disk0', target: `raw:${target}` }] }));
    const psConfig = path.join(dir, 'ps.json');
    fs.writeFileSync(psConfig, JSON.stringify({ stateDir: path.join(dir, 'ps'), listen: `127.0.0.1:${psPort}`, secret: SECRET, forward: { url: `http://127.0.0.1:${mtPort}`, secret: MT_SECRET, timeoutSeconds: 2 } }));
    const mt = new RoleProcess('master-target', mtConfig);
    const ps = new RoleProcess('process-server', psConfig);
    roles.push(mt, ps);
    await mt.start();
    await ps.start();
    return { psPort, mtPort, target, mt, ps };
  }

  /** Waits (60 s at most) until the master target on `mtPort` has applied log `seq` of disk0. */
  async function waitApplied(mtPort: number, seq: number): Promise<void> {
    const mtPeer = { url: `http://127.0.0.1:${mtPort}`, secret: MT_SECRET };
    const deadline = Date.now() + 60_000;
    for (;;) {
      const state = await getDiskState(mtPeer, 'disk0').catch(() => undefined);
      if (state !== undefined && (state as { appliedSeq?: number }).appliedSeq === seq) return;
      if (Date.now() > deadline) throw new Error(`not converged: ${JSON.stringify(state)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  it('lose nothing acknowledged, apply nothing twice, and the target converges', async () => {
    const dir = tmp();
    const { psPort, mtPort, target, mt, ps } = await startHops(dir);

    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(2024);
    const policy = { scheduleOffsetsMs: [100, 200, 400], steadyIntervalMs: 500, maxRetries: 200 };
    const psPeer = { url: `http://127.0.0.1:${psPort}`, secret: SECRET, timeoutMs: 3000 };
    const logs = 16;
    let kills = 0;
    for (let seq = 1; seq <= logs; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand, 40);
      const sending = withRetry(() => sendLog(psPeer, log.envelope, log.file), { clock: systemClock, policy }).result;
      // Kill one of the roles at a random moment while logs flow, then restart it.
      if (rand() < 0.5) {
        const victim = rand() < 0.5 ? ps : mt;
        await new Promise((r) => setTimeout(r, Math.floor(rand() * 150)));
        await victim.kill();
        kills++;
        await victim.start();
      }
      await sending;
    }
    expect(kills).toBeGreaterThan(3);

    // Everything acknowledged must reach the target: wait until all is applied.
    await waitApplied(mtPort, logs);
    expect(fs.readFileSync(target).equals(model)).toBe(true);
  }, 180_000);

  it('with several logs in flight on each hop, lose nothing, apply each once and in order', async () => {
    const dir = tmp();
    const { psPort, mtPort, target, mt, ps } = await startHops(dir);

    // The source side is a real, pipelined shipper; a log is sealed every 60 ms.
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(4711);
    const logs = 30;
    const written: WrittenLog[] = [];
    for (let seq = 1; seq <= logs; seq++) written.push(await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand, 80));
    const remaining = new Map<number, WrittenLog>();
    const acknowledged: number[] = [];
    const shipper = new LogShipper(
      {
        diskId: 'disk0',
        diskSizeBytes: DISK_SIZE,
        sealedLogs: async () => [...remaining.values()].sort((a, b) => a.envelope.seq - b.envelope.seq).map((w) => ({ seq: w.envelope.seq, file: w.file, cutTimeMs: w.envelope.cutTimeMs, cutId: w.envelope.cutId })),
        acknowledge: async (seq) => {
          acknowledged.push(seq);
          remaining.delete(seq);
        },
      },
      { peer: { url: `http://127.0.0.1:${psPort}`, secret: SECRET, timeoutMs: 3000 }, clock: systemClock, ...quiet(), health: new DiskHealth('disk0'), retryPolicy: { scheduleOffsetsMs: [100, 200, 400], steadyIntervalMs: 500, maxRetries: 200 } },
    );
    shipper.start();
    const sealing = (async () => {
      for (const w of written) {
        remaining.set(w.envelope.seq, w);
        shipper.wake();
        await new Promise((r) => setTimeout(r, 60));
      }
    })();
    // Kill a role at random moments while the logs flow, then restart it.
    let kills = 0;
    let sealed = false;
    void sealing.then(() => { sealed = true; });
    while (!sealed || kills < 4) {
      await new Promise((r) => setTimeout(r, 50 + Math.floor(rand() * 200)));
      const victim = rand() < 0.5 ? ps : mt;
      await victim.kill();
      kills++;
      await victim.start();
    }
    await shipper.whenIdle();
    await shipper.stop();
    // Each log was acknowledged once, oldest first.
    expect(acknowledged).toEqual(Array.from({ length: logs }, (_, i) => i + 1));

    await waitApplied(mtPort, logs);
    // Applied in order: the target is the writes of logs 1..30 applied one after another.
    expect(fs.readFileSync(target).equals(model)).toBe(true);
  }, 180_000);
});