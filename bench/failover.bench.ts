/**
 * Failover to a point one hour back, against a plain copy of the disk.
 *
 * A raw target of 1 GiB (128 MiB with --quick) full of random data gets an
 * hour of churn: one log per simulated minute, journaled by the retention
 * hooks and applied as the master target does. Then:
 * - failover to raw: `failover()` to the oldest point (an hour before the
 *   newest) into a new raw file: a kernel copy of the target, then the
 *   pre-images of the 60 logs after the point written over it, fdatasync;
 *   peer: `dd if=target of=copy bs=4M conv=fsync` (also durable) and `cp`
 *   (not durable), in the same run;
 * - failover to a new VMDK (the default output): read through the point
 *   view and copied by the copy engine; peer: `qemu-img convert -O vmdk` of
 *   the target (no pre-images to overlay, so it is the lower bound);
 * - instant view: from `PointView.open` to the first 4 KiB read answered
 *   over NBD by an NbdServer to an NbdClient;
 * - the journal's cost while applying the churn: time in the retention
 *   hooks (pre-images read, written, verified, fsynced; points recorded)
 *   against the time applying the logs themselves.
 *
 *   npx tsx bench/failover.bench.ts [--quick]
 *
 * Prints one JSON document and writes bench/results/failover.json. Ratios
 * follow bench/report.ts: peer median time / blockrelay median time (above
 * 1 means the failover is faster than the plain copy).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { failover, loadPoints } from '../src/retention/failover';
import { PointView } from '../src/retention/point-view';
import { readManifest } from '../src/retention/retention-manifest';
import { RetentionHooks } from '../src/retention/retention-hooks';
import { NbdClient } from '../src/tap/nbd-client';
import { NbdServer } from '../src/tap/nbd-server';
import { openDisk } from '../src/targets/disk-spec';
import { HrlWriter } from '../src/tracking/hrl-writer';
import { hrlLogOps } from '../src/transport/hrl-log-ops';
import { hashFile } from '../src/transport/log-spool';
import type { LogEnvelope } from '../src/transport/transport-protocol';
import { prng as seededRandom } from '../test/helpers/prng';

const MiB = 1024 * 1024;
const quick = process.argv.includes('--quick');
const sizeBytes = (quick ? 128 : 1024) * MiB;
const logCount = 61; // one per minute: the oldest point is an hour before the newest
const writesPerLog = quick ? 16 : 64;
const writeBytes = 64 * 1024;
const repetitions = 3;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function ms(started: bigint): number {
  return Number(process.hrtime.bigint() - started) / 1e6;
}

function fillRandom(file: string): void {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(16 * MiB);
  for (let at = 0; at < sizeBytes; at += chunk.length) {
    randomFillSync(chunk);
    fs.writeSync(fd, chunk, 0, chunk.length, at);
  }
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

/** Time spent per phase while the hour of churn is applied. */
const applyTimes = { journalMs: 0, applyMs: 0 };

async function churn(dir: string, retentionDir: string, targetFile: string, expectedAtPoint: string): Promise<number> {
  const rand = seededRandom(0xfa110);
  const target = await openDisk(`raw:${targetFile}`);
  const t0 = Date.now() - 2 * 3_600_000;
  const hooks = new RetentionHooks({ dir: retentionDir, windowHours: 24, stateDir: path.join(dir, 'state'), inboxDir: path.join(dir, 'state', 'inbox') });
  let churnBytes = 0;
  try {
    for (let seq = 1; seq <= logCount; seq++) {
      const file = path.join(dir, 'logs', `${seq}.hrl`);
      fs.mkdirSync(path.dirname(file), { recursive: true });
      const writer = await HrlWriter.create(file);
      const data = Buffer.alloc(writeBytes);
      for (let i = 0; i < writesPerLog; i++) {
        randomFillSync(data);
        await writer.append(Math.floor(rand() * (sizeBytes / writeBytes)) * writeBytes, data);
        churnBytes += writeBytes;
      }
      await writer.seal();
      const { xxhash64, sizeBytes: logLength } = await hashFile(file);
      const envelope: LogEnvelope = { diskId: 'disk0', seq, xxhash64, logLength, cutTimeMs: t0 + seq * 60_000, cutId: `c${seq}`, group: undefined, appTag: undefined, diskSizeBytes: sizeBytes };
      const entry = { envelope, file, sizeBytes: logLength };
      let started = process.hrtime.bigint();
      await hooks.beforeApply('disk0', entry, target);
      applyTimes.journalMs += ms(started);
      started = process.hrtime.bigint();
      await hrlLogOps.apply(file, target);
      await target.flush();
      applyTimes.applyMs += ms(started);
      started = process.hrtime.bigint();
      await hooks.afterApply('disk0', entry);
      applyTimes.journalMs += ms(started);
      // The expected image of the oldest point: the initial disk plus log 1.
      if (seq === 1) execFileSync('cp', ['--sparse=never', targetFile, expectedAtPoint]);
      fs.rmSync(file);
    }
  } finally {
    await target.close();
  }
  return churnBytes;
}

async function timeToFirstRead(retentionDir: string): Promise<number> {
  const started = process.hrtime.bigint();
  const manifest = await readManifest(retentionDir, 'disk0');
  const { points } = await loadPoints(retentionDir, 'disk0');
  // As `blockrelay export` opens it: payload checksums on first use.
  const view = await PointView.open({ retentionDir, manifest, point: points[0]!, newestSeq: points[points.length - 1]!.seq, verifyPayloads: 'first-read' });
  const server = new NbdServer({ exports: [{ name: 'disk0', readOnly: true, source: view }] });
  const addr = await server.listen('127.0.0.1', 0);
  const client = await NbdClient.connect({ host: addr.host, port: addr.port, exportName: 'disk0' });
  await client.read(0, 4096);
  const elapsed = ms(started);
  await client.close();
  await server.close();
  await view.close();
  return elapsed;
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-bench-failover-'));
  try {
    const targetFile = path.join(dir, 'target.img');
    const expected = path.join(dir, 'expected.img');
    const retentionDir = path.join(dir, 'retention');
    fillRandom(targetFile);
    const setupStarted = process.hrtime.bigint();
    const churnBytes = await churn(dir, retentionDir, targetFile, expected);
    const churnMs = ms(setupStarted);
    const { points } = await loadPoints(retentionDir, 'disk0');
    const oldest = points[0]!;
    const backMinutes = (points[points.length - 1]!.timeMs - oldest.timeMs) / 60_000;

    const ours: number[] = [];
    const dd: number[] = [];
    const cp: number[] = [];
    const firstRead: number[] = [];
    const oursVmdk: number[] = [];
    const qemu: number[] = [];
    let identical = true;
    let identicalVmdk = true;
    for (let i = 0; i < repetitions; i++) {
      const out = path.join(dir, 'failover.img');
      fs.rmSync(out, { force: true });
      fs.rmSync(path.join(retentionDir, 'disk0', 'failover.json'), { force: true });
      let started = process.hrtime.bigint();
      await failover({ retentionDir, diskId: 'disk0', point: oldest.id, out: `raw:${out}` });
      ours.push(ms(started));
      if (i === 0) identical = spawnSync('cmp', ['-s', out, expected]).status === 0;
      fs.rmSync(out, { force: true });

      const copy = path.join(dir, 'copy.img');
      fs.rmSync(copy, { force: true });
      started = process.hrtime.bigint();
      execFileSync('dd', [`if=${targetFile}`, `of=${copy}`, 'bs=4M', 'conv=fsync', 'status=none']);
      dd.push(ms(started));
      fs.rmSync(copy, { force: true });
      started = process.hrtime.bigint();
      execFileSync('cp', [targetFile, copy]);
      cp.push(ms(started));
      fs.rmSync(copy, { force: true });

      firstRead.push(await timeToFirstRead(retentionDir));

      const vmdk = path.join(dir, 'failover.vmdk');
      fs.rmSync(vmdk, { force: true });
      fs.rmSync(path.join(retentionDir, 'disk0', 'failover.json'), { force: true });
      started = process.hrtime.bigint();
      await failover({ retentionDir, diskId: 'disk0', point: oldest.id, out: `vmdk:${vmdk}` });
      oursVmdk.push(ms(started));
      if (i === 0) identicalVmdk = spawnSync('qemu-img', ['compare', '-q', '-f', 'vmdk', '-F', 'raw', vmdk, expected]).status === 0;
      fs.rmSync(vmdk, { force: true });
      const qemuOut = path.join(dir, 'qemu.vmdk');
      fs.rmSync(qemuOut, { force: true });
      started = process.hrtime.bigint();
      execFileSync('qemu-img', ['convert', '-t', 'writeback', '-f', 'raw', '-O', 'vmdk', targetFile, qemuOut]);
      qemu.push(ms(started));
      fs.rmSync(qemuOut, { force: true });
    }
    const journalBytes = fs.readdirSync(path.join(retentionDir, 'disk0', 'journal')).reduce((n, f) => n + fs.statSync(path.join(retentionDir, 'disk0', 'journal', f)).size, 0);
    const result = {
      bench: 'failover',
      quick,
      peer: 'dd bs=4M conv=fsync (and cp) of the target in the same run',
      ratios: { failoverVsDd: median(dd) / median(ours), failoverVsCp: median(cp) / median(ours), failoverVmdkVsQemuImgConvert: median(qemu) / median(oursVmdk) },
      figures: {
        sizeBytes,
        logs: logCount,
        pointBackMinutes: backMinutes,
        churnBytes,
        journalBytes,
        failoverMs: median(ours),
        ddFsyncMs: median(dd),
        cpMs: median(cp),
        failoverVmdkMs: median(oursVmdk),
        qemuImgConvertVmdkMs: median(qemu),
        instantViewFirstReadMs: median(firstRead),
        churnSetupMs: churnMs,
        churnApplyMs: applyTimes.applyMs,
        churnJournalMs: applyTimes.journalMs,
        journalOverheadFraction: applyTimes.journalMs / applyTimes.applyMs,
        identicalToExpected: identical,
        vmdkIdenticalToExpected: identicalVmdk,
      },
      samplesMs: { failover: ours, dd, cp, instantViewFirstRead: firstRead, failoverVmdk: oursVmdk, qemuImgConvertVmdk: qemu },
      notes: [
        'failover to raw: kernel copy of the target plus the pre-images written over it, fdatasync; dd conv=fsync is durable too, cp is not',
        'failover to VMDK reads through the point view (target plus pre-images); qemu-img convert -t writeback copies the target alone',
      ],
      when: new Date().toISOString(),
    };
    const json = JSON.stringify(result, null, 2);
    process.stdout.write(`${json}\n`);
    fs.mkdirSync(path.join(__dirname, 'results'), { recursive: true });
    fs.writeFileSync(path.join(__dirname, 'results', 'failover.json'), `${json}\n`);
    if (!identical || !identicalVmdk) process.exitCode = 1;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

void main();
