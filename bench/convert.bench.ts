/**
 * raw -> sparse VMDK conversion: blockrelay's copy engine (openDisk +
 * copyDisk, in process, as `blockrelay convert` runs it) against
 * `qemu-img convert -O vmdk` on the same source in the same run. The source
 * is 30% random data in 1 MiB pieces at seeded positions, the rest holes.
 *
 *   npx tsx bench/convert.bench.ts [--quick]
 *
 * Prints one JSON document and writes it to bench/results/convert.json.
 * Ratios are blockrelay median time / qemu-img median time (below 1 means
 * blockrelay is faster). blockrelay makes its output durable (fdatasync);
 * qemu-img's default cache mode for convert does not, so the ratio against
 * `-t writeback` (which flushes at the end) is reported too.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { copyDisk } from '../src/targets/disk-copy';
import { openDisk } from '../src/targets/disk-spec';
import { prng as seededRandom } from '../test/helpers/prng';

const MiB = 1024 * 1024;
const quick = process.argv.includes('--quick');
const sizeBytes = (quick ? 64 : 256) * MiB;
const repetitions = 3;
const dataFraction = 0.3;

function makeSource(file: string): number {
  const rand = seededRandom(0xc0417);
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, sizeBytes);
  let dataBytes = 0;
  for (let at = 0; at < sizeBytes; at += MiB) {
    if (rand() < dataFraction) {
      fs.writeSync(fd, randomBytes(MiB), 0, MiB, at);
      dataBytes += MiB;
    }
  }
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  return dataBytes;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function viaBlockrelay(src: string, out: string): Promise<number> {
  const started = process.hrtime.bigint();
  const from = await openDisk(`raw:${src}`, { readOnly: true });
  const to = await openDisk(`vmdk:${out}`, { create: { sizeBytes: from.sizeBytes } });
  await copyDisk(from, to, { targetIsZero: true });
  await to.close();
  await from.close();
  return Number(process.hrtime.bigint() - started) / 1e6;
}

function viaQemu(src: string, out: string, cacheMode: string | undefined): number {
  const started = process.hrtime.bigint();
  execFileSync('qemu-img', ['convert', ...(cacheMode === undefined ? [] : ['-t', cacheMode]), '-f', 'raw', '-O', 'vmdk', src, out]);
  return Number(process.hrtime.bigint() - started) / 1e6;
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-bench-convert-'));
  try {
    const src = path.join(dir, 'src.img');
    const dataBytes = makeSource(src);
    const ours: number[] = [];
    const qemuDefault: number[] = [];
    const qemuWriteback: number[] = [];
    const oursOut = path.join(dir, 'ours.vmdk');
    const qemuOut = path.join(dir, 'qemu.vmdk');
    for (let i = 0; i < repetitions; i++) {
      fs.rmSync(oursOut, { force: true });
      ours.push(await viaBlockrelay(src, oursOut));
      fs.rmSync(qemuOut, { force: true });
      qemuDefault.push(viaQemu(src, qemuOut, undefined));
      fs.rmSync(qemuOut, { force: true });
      qemuWriteback.push(viaQemu(src, qemuOut, 'writeback'));
    }
    const identical = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', src, oursOut]).status === 0;
    const result = {
      bench: 'convert',
      quick,
      sizeBytes,
      dataBytes,
      repetitions,
      blockrelayMs: median(ours),
      qemuImgMs: median(qemuDefault),
      qemuImgWritebackMs: median(qemuWriteback),
      ratio: median(ours) / median(qemuDefault),
      ratioVsWriteback: median(ours) / median(qemuWriteback),
      outputBytes: { blockrelay: fs.statSync(oursOut).size, qemuImg: fs.statSync(qemuOut).size },
      identicalToSource: identical,
      samplesMs: { blockrelay: ours, qemuImg: qemuDefault, qemuImgWriteback: qemuWriteback },
      when: new Date().toISOString(),
    };
    const json = JSON.stringify(result, null, 2);
    process.stdout.write(`${json}\n`);
    fs.mkdirSync(path.join(__dirname, 'results'), { recursive: true });
    fs.writeFileSync(path.join(__dirname, 'results', 'convert.json'), `${json}\n`);
    if (!identical) process.exitCode = 1;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

void main();
