/**
 * The native addon's hot paths against plain TypeScript peers, in one run:
 *
 * - DirtyMap marking (marks per second) on a 2 TiB disk at 4 KiB blocks,
 *   random and sequential 4 KiB marks, against a flat JavaScript bitmap
 *   (Uint32Array, 64 MiB for 2 TiB: the fastest naive structure, and the
 *   memory the native map avoids).
 * - The [MS-HRL] checksum (GB/s) on a 64 MiB buffer: the addon's kernels
 *   against a plain TypeScript summing loop (the peer of `ratio`) and
 *   hrlChecksumReference (which also tests for the ignored field per byte).
 * - The crossover: nanoseconds per call of both for small buffers, which
 *   sets HRL_CHECKSUM_NATIVE_MIN_BYTES.
 *
 *   npx tsx bench/native.bench.ts [--quick]
 *
 * Prints one JSON document and writes it to bench/results/native.json.
 * Figures are medians of the repetitions; `ratio` is native speed / peer
 * speed (above 1 means the addon is faster).
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DirtyMap } from '../src/tracking/dirty-map';
import {
  hrlChecksum,
  hrlChecksumBestKernel,
  hrlChecksumKernels,
  hrlChecksumReference,
  hrlChecksumWithKernel,
} from '../src/tracking/hrl-checksum';
import { prng } from '../test/helpers/prng';

const MiB = 1024 * 1024;
const TiB = 1024 * 1024 * MiB;
const quick = process.argv.includes('--quick');
const repetitions = quick ? 3 : 5;
const diskSizeBytes = 2 * TiB;
const blockBytes = 4096;
const marks = quick ? 200_000 : 1_000_000;
const checksumBytes = (quick ? 16 : 64) * MiB;

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

function seconds(fn: () => void): number {
  const start = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/** The peer: one bit per block in a flat array, marked in plain TypeScript. */
class FlatBitmap {
  readonly words: Uint32Array;
  constructor(blocks: number) {
    this.words = new Uint32Array(Math.ceil(blocks / 32));
  }
  mark(offset: number, length: number): void {
    const end = Math.ceil((offset + length) / blockBytes);
    for (let b = Math.floor(offset / blockBytes); b < end; b++) this.words[b >>> 5]! |= 1 << (b & 31);
  }
}

interface MarkResult {
  /** One DirtyMap.mark call per write, as the source tap does. */
  nativeMarksPerSecond: number;
  /** The same marks handed over in one DirtyMap.markMany call. */
  nativeBatchedMarksPerSecond: number;
  peerMarksPerSecond: number;
  ratio: number;
  batchedRatio: number;
  nativeMemoryBytes: number;
  peerMemoryBytes: number;
}

function benchMarks(offsets: Float64Array): MarkResult {
  const nativeRates: number[] = [];
  const batchedRates: number[] = [];
  const peerRates: number[] = [];
  let memory = 0;
  const pairs = new Float64Array(offsets.length * 2);
  for (let i = 0; i < offsets.length; i++) {
    pairs[2 * i] = offsets[i]!;
    pairs[2 * i + 1] = blockBytes;
  }
  // One untimed round so every path is compiled before it is measured.
  for (let r = -1; r < repetitions; r++) {
    const map = new DirtyMap(diskSizeBytes, blockBytes);
    const nativeRate = offsets.length / seconds(() => {
      for (let i = 0; i < offsets.length; i++) map.mark(offsets[i]!, blockBytes);
    });
    memory = map.memoryBytes();
    const batched = new DirtyMap(diskSizeBytes, blockBytes);
    const batchedRate = offsets.length / seconds(() => batched.markMany(pairs));
    const peer = new FlatBitmap(diskSizeBytes / blockBytes);
    const peerRate = offsets.length / seconds(() => {
      for (let i = 0; i < offsets.length; i++) peer.mark(offsets[i]!, blockBytes);
    });
    if (batched.dirtyBlockCount !== map.dirtyBlockCount) throw new Error('markMany and mark disagree');
    if (r < 0) continue;
    nativeRates.push(nativeRate);
    batchedRates.push(batchedRate);
    peerRates.push(peerRate);
  }
  const nativeMarksPerSecond = Math.round(median(nativeRates));
  const nativeBatchedMarksPerSecond = Math.round(median(batchedRates));
  const peerMarksPerSecond = Math.round(median(peerRates));
  return {
    nativeMarksPerSecond,
    nativeBatchedMarksPerSecond,
    peerMarksPerSecond,
    ratio: Number((nativeMarksPerSecond / peerMarksPerSecond).toFixed(2)),
    batchedRatio: Number((nativeBatchedMarksPerSecond / peerMarksPerSecond).toFixed(2)),
    nativeMemoryBytes: memory,
    peerMemoryBytes: diskSizeBytes / blockBytes / 8,
  };
}

function benchChecksum(): Record<string, unknown> {
  const data = randomBytes(checksumBytes);
  const expected = hrlChecksumReference(data, 40);
  const rate = (fn: () => number, expect = expected): number => {
    const times: number[] = [];
    for (let r = -1; r < repetitions; r++) {
      let result = 0;
      const t = seconds(() => {
        result = fn();
      });
      if (result !== expect) throw new Error('checksum disagrees with the reference');
      if (r >= 0) times.push(t);
    }
    return Number((checksumBytes / median(times) / 1e9).toFixed(2));
  };
  const referenceGBps = rate(() => hrlChecksumReference(data, 40));
  const plainLoopGBps = rate(() => plainLoopChecksum(data), hrlChecksumReference(data));
  const kernels: Record<string, number> = {};
  for (const kernel of hrlChecksumKernels()) kernels[kernel.name] = rate(() => hrlChecksumWithKernel(kernel, data, 40));
  const nativeGBps = rate(() => hrlChecksum(data, 40));
  return {
    bufferBytes: checksumBytes,
    bestKernel: hrlChecksumBestKernel().name,
    nativeGBps,
    plainLoopGBps,
    referenceGBps,
    ratio: Number((nativeGBps / plainLoopGBps).toFixed(1)),
    kernelsGBps: kernels,
  };
}

/**
 * The plainest TypeScript byte sum, without the reference's ignored-field
 * test in the loop: the fairest peer for the addon.
 */
function plainLoopChecksum(data: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < data.length; i++) sum = (sum + data[i]!) | 0;
  return ~sum >>> 0;
}

/** ns per call for small buffers: the plain loop against the addon's best kernel. */
function benchCrossover(): Array<{ bytes: number; referenceNs: number; nativeNs: number }> {
  const best = hrlChecksumBestKernel();
  const out: Array<{ bytes: number; referenceNs: number; nativeNs: number }> = [];
  for (const bytes of [16, 32, 64, 96, 128, 256, 512]) {
    const data = randomBytes(bytes);
    const calls = quick ? 100_000 : 400_000;
    const perCall = (fn: () => number): number => {
      const times: number[] = [];
      for (let r = -1; r < repetitions; r++) {
        let sink = 0;
        const t = seconds(() => {
          for (let i = 0; i < calls; i++) sink ^= fn();
        });
        if (sink === 0.5) throw new Error('unreachable');
        if (r >= 0) times.push(t);
      }
      return Number(((median(times) / calls) * 1e9).toFixed(1));
    };
    out.push({
      bytes,
      referenceNs: perCall(() => hrlChecksumReference(data, 8)),
      nativeNs: perCall(() => hrlChecksumWithKernel(best, data, 8)),
    });
  }
  return out;
}

function main(): void {
  const random = prng(2024);
  const blocks = diskSizeBytes / blockBytes;
  const randomOffsets = new Float64Array(marks);
  for (let i = 0; i < marks; i++) randomOffsets[i] = Math.floor(random() * blocks) * blockBytes;
  const sequentialOffsets = new Float64Array(marks);
  for (let i = 0; i < marks; i++) sequentialOffsets[i] = i * blockBytes;

  const result = {
    bench: 'native',
    quick,
    repetitions,
    node: process.version,
    dirtyMap: {
      diskSizeBytes,
      granularityBytes: blockBytes,
      marks,
      peer: 'flat Uint32Array bitmap in TypeScript',
      random4KiB: benchMarks(randomOffsets),
      sequential4KiB: benchMarks(sequentialOffsets),
    },
    checksum: benchChecksum(),
    checksumCrossover: benchCrossover(),
  };
  const json = JSON.stringify(result, null, 2);
  console.log(json);
  const dir = path.join(__dirname, 'results');
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'native.json'), json + '\n');
}

main();
