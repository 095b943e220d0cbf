import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { getDiskState, sendLog } from '../../src/transport/log-client';
import { cliCommand } from '../helpers/cli';
import { freePort, waitForPort } from '../helpers/net';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { DISK_SIZE, makeLog, prng, type WrittenLog } from './transport-fixture';

const MT_SECRET = 'master-target-secret-123';
/** The smallest RPO threshold the config allows: the hung disk passes it while the test runs. */
const RPO_THRESHOLD_SECONDS = 10;
/** One log's apply running longer than this warns APPLY_STALLED (60 s by default): the hang passes it at once. */
const APPLY_STALL_SECONDS = 2;

/** The last log the master target applied for `diskId` (its disk state answer carries it beside nextSeq). */
async function appliedSeq(peer: Parameters<typeof getDiskState>[0], diskId: string): Promise<number | null> {
  return ((await getDiskState(peer, diskId)) as Awaited<ReturnType<typeof getDiskState>> & { appliedSeq: number | null }).appliedSeq;
}

/**
 * A TCP proxy in front of an NBD server that can stop passing bytes either
 * way, as a datastore that stopped answering: the client's requests go
 * out, no reply comes back, and nothing fails. `answer()` passes on what it
 * held and goes on.
 */
class StallingProxy {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private stalled = false;
  private readonly held: Array<() => void> = [];

  constructor(private readonly upstreamPort: number) {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.upstreamPort, '127.0.0.1');
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => undefined);
      }
      const pass = (to: net.Socket) => (data: Buffer) => {
        if (this.stalled) this.held.push(() => to.write(data));
        else to.write(data);
      };
      client.on('data', pass(upstream));
      upstream.on('data', pass(client));
      client.on('close', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
    });
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return (this.server.address() as net.AddressInfo).port;
  }

  stall(): void {
    this.stalled = true;
  }

  answer(): void {
    this.stalled = false;
    for (const send of this.held.splice(0)) send();
  }

  /** Bytes it is holding back, in chunks. */
  get heldChunks(): number {
    return this.held.length;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** Starts `blockrelay master-target --config FILE` as a child and waits until it listens. */
async function startMasterTarget(configFile: string, children: ChildProcess[]): Promise<void> {
  const { command, args } = cliCommand(['master-target', '--config', configFile]);
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, LOG_LEVEL: 'error', UV_USE_IO_URING: '0' } });
  children.push(child);
  let stderr = '';
  await new Promise<void>((resolve, reject) => {
    child.stderr!.on('data', (d) => {
      stderr += d;
      if (/listening on/.test(stderr)) resolve();
    });
    child.on('exit', (code) => reject(new Error(`master-target exited (${code}) before listening: ${stderr}`)));
  });
}

interface StatusDisk {
  readonly diskId: string;
  readonly health: string;
  readonly reasons: string[];
  readonly state: string;
  readonly appliedSeq: number | null;
}

async function status(port: number): Promise<StatusDisk[]> {
  const res = await fetch(`http://127.0.0.1:${port}/v1/status`);
  return ((await res.json()) as { disks: StatusDisk[] }).disks;
}

describe.skipIf(!requireTool('qemu-nbd'))('master target with two disks, one of them hung', () => {
  const tmp = useTempDirs();
  const children: ChildProcess[] = [];
  const proxies: StallingProxy[] = [];
  afterEach(async () => {
    for (const p of proxies.splice(0)) {
      p.answer();
      await p.close();
    }
    for (const c of children.splice(0)) {
      if (c.exitCode !== null || c.signalCode !== null) continue;
      await new Promise<void>((resolve) => {
        c.on('exit', () => resolve());
        c.kill('SIGKILL');
      });
    }
  });

  it('keeps applying and acknowledging the healthy disk while the other target stops answering, shows the hung one in /v1/status, and finishes it once it answers', async () => {
    const dir = tmp();
    // disk1's target: a raw image exported by qemu-nbd, reached through a proxy that can stall.
    const image = path.join(dir, 'disk1.img');
    fs.writeFileSync(image, Buffer.alloc(0));
    fs.truncateSync(image, DISK_SIZE);
    const nbdPort = await freePort();
    children.push(spawn('qemu-nbd', ['--persistent', '--format=raw', '--bind=127.0.0.1', `--port=${nbdPort}`, '--export-name=disk1', image], { stdio: 'ignore' }));
    await waitForPort(nbdPort, 10_000, 'qemu-nbd');
    const proxy = new StallingProxy(nbdPort);
    proxies.push(proxy);
    const proxyPort = await proxy.listen();

    const mtPort = await freePort();
    const target0 = path.join(dir, 'disk0.img');
    const config = path.join(dir, 'mt.json');
    fs.writeFileSync(config, JSON.stringify({
      stateDir: path.join(dir, 'mt'),
      listen: `127.0.0.1:${mtPort}`,
      secret: MT_SECRET,
      rpoThresholdSeconds: RPO_THRESHOLD_SECONDS,
      applyStallSeconds: APPLY_STALL_SECONDS,
      disks: [
        { id: 'disk0', target: `raw:${target0}` },
        { id: 'disk1', target: `nbd://127.0.0.1:${proxyPort}/disk1` },
      ],
    }));
    await startMasterTarget(config, children);
    const peer = { url: `http://127.0.0.1:${mtPort}`, secret: MT_SECRET, timeoutMs: 20_000 };

    const rand = prng(606);
    const model0 = Buffer.alloc(DISK_SIZE);
    const model1 = Buffer.alloc(DISK_SIZE);
    const logs1: WrittenLog[] = [];
    for (let seq = 1; seq <= 2; seq++) logs1.push(await makeLog(path.join(dir, 'src1'), 'disk1', seq, model1, rand, 30));
    // Its last point is close to the RPO threshold already, so the hang passes it within the test.
    const first1 = { ...logs1[0]!.envelope, cutTimeMs: Date.now() - (RPO_THRESHOLD_SECONDS - 3) * 1000 };
    expect(await sendLog(peer, first1, logs1[0]!.file)).toMatchObject({ status: 201 });
    expect((await appliedSeq(peer, 'disk1'))).toBe(1);

    // disk1's datastore stops answering; its next log is taken up and its apply hangs.
    proxy.stall();
    let hungAnswered = false;
    const hungSend = sendLog({ ...peer, timeoutMs: 120_000 }, logs1[1]!.envelope, logs1[1]!.file).then((r) => {
      hungAnswered = true;
      return r;
    });
    const deadline = Date.now() + 20_000;
    while (proxy.heldChunks === 0) {
      if (Date.now() > deadline) throw new Error('the apply of disk1 log 2 never reached its target');
      await new Promise((r) => setTimeout(r, 20));
    }

    // Meanwhile disk0's logs are applied and acknowledged, one after another.
    const logs = 8;
    for (let seq = 1; seq <= logs; seq++) {
      const log = await makeLog(path.join(dir, 'src0'), 'disk0', seq, model0, rand, 30);
      expect(await sendLog(peer, log.envelope, log.file)).toMatchObject({ status: 201 });
    }
    expect((await appliedSeq(peer, 'disk0'))).toBe(logs);
    expect(fs.readFileSync(target0).equals(model0)).toBe(true);
    expect(hungAnswered).toBe(false);

    // The operator sees which disk is stuck: disk1 busy on log 2, its apply
    // stalled past the bound, then past its RPO threshold too; disk0 fine.
    let disks = await status(mtPort);
    const statusDeadline = Date.now() + 20_000;
    const stuck = (d: StatusDisk | undefined): boolean => /APPLY_STALLED/.test(d?.reasons.join('\n') ?? '') && /RPO/.test(d?.reasons.join('\n') ?? '');
    while (!stuck(disks.find((d) => d.diskId === 'disk1'))) {
      if (Date.now() > statusDeadline) throw new Error(`disk1 never showed as stuck: ${JSON.stringify(disks)}`);
      await new Promise((r) => setTimeout(r, 250));
      disks = await status(mtPort);
    }
    const disk0 = disks.find((d) => d.diskId === 'disk0')!;
    const disk1 = disks.find((d) => d.diskId === 'disk1')!;
    expect(disk0).toMatchObject({ health: 'OK', appliedSeq: logs });
    expect(disk1).toMatchObject({ state: 'busy', appliedSeq: 1 });
    expect(disk1.health).not.toBe('OK');
    expect(disk1.health).toBe('Warning');
    expect(disk1.reasons.join('\n')).toMatch(/RPO/);
    expect(disk1.reasons.join('\n')).toMatch(new RegExp(`APPLY_STALLED: apply of log 2 running for \\d+ s, over the ${APPLY_STALL_SECONDS} s bound`));
    const metrics = await (await fetch(`http://127.0.0.1:${mtPort}/metrics`)).text();
    const inHand = /blockrelay_log_in_hand_seconds\{disk="disk1",stage="apply"\} ([\d.]+)/.exec(metrics);
    expect(Number(inHand?.[1])).toBeGreaterThan(APPLY_STALL_SECONDS);
    expect(hungAnswered).toBe(false);

    // The datastore answers again: the held apply finishes and is acknowledged; nothing was lost.
    proxy.answer();
    expect(await hungSend).toMatchObject({ status: 201 });
    expect((await appliedSeq(peer, 'disk1'))).toBe(2);
    expect((await status(mtPort)).find((d) => d.diskId === 'disk1')!.reasons.join('\n')).not.toMatch(/APPLY_STALLED/);
    expect(spawnSync('sync').status).toBe(0);
    expect(fs.readFileSync(image).equals(model1)).toBe(true);
  }, 90_000);
});
