/**
 * Page-blob upload: a disk with holes written through blockrelay's page blob
 * target, against a plain Azure SDK loop (uploadPages in 4 MiB chunks,
 * skipping all-zero chunks) on the same Azurite in the same run. Both end
 * with the same blob: the data and a fixed VHD footer. A third figure is the
 * whole `blockrelay convert raw: blob:` path (copy engine reading a raw file
 * from the page cache), for reference; the ratio is on the target alone.
 *
 *   npx tsx bench/blob-upload.bench.ts [--quick]
 *
 * Prints one JSON document and writes it to bench/results/blob-upload.json.
 * `ratio` is blockrelay time / SDK time (below 1 means blockrelay is faster),
 * from the medians of the repetitions.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BlobServiceClient, type ContainerClient } from '@azure/storage-blob';
import { PAGE_BLOB_DEFAULTS, PageBlobTarget } from '../src/targets/blob/page-blob-target';
import { copyDisk } from '../src/targets/disk-copy';
import { RawTarget } from '../src/targets/raw/raw-target';
import { encodeVhdFooter, newFixedVhdFooter } from '../src/targets/vhd/vhd-footer';
import { startAzurite } from '../test/helpers/azurite-process';

const MiB = 1024 * 1024;
const CHUNK_BYTES = 4 * MiB;
/** Bytes handed to the target per write call, as a copy loop would. */
const WRITE_BYTES = 16 * MiB;
const quick = process.argv.includes('--quick');
const sizeBytes = (quick ? 32 : 256) * MiB;
const repetitions = 5;
const concurrency = PAGE_BLOB_DEFAULTS.maxInFlightRequests;

/** Every third 4 MiB chunk is a hole; the rest is random data. */
function makeDisk(): Buffer {
  const disk = Buffer.alloc(sizeBytes);
  for (let at = 0; at < sizeBytes; at += CHUNK_BYTES) {
    if ((at / CHUNK_BYTES) % 3 !== 2) randomBytes(CHUNK_BYTES).copy(disk, at);
  }
  return disk;
}

function isZero(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

async function viaBlockrelay(url: string, connectionString: string, disk: Buffer): Promise<void> {
  const t = await PageBlobTarget.open(url, { create: { sizeBytes }, connectionString });
  for (let at = 0; at < sizeBytes; at += WRITE_BYTES) await t.write(at, disk.subarray(at, at + WRITE_BYTES));
  await t.close();
}

async function viaConvert(url: string, connectionString: string, rawFile: string): Promise<void> {
  const from = await RawTarget.open(rawFile, { readOnly: true });
  const to = await PageBlobTarget.open(url, { create: { sizeBytes }, connectionString });
  try {
    await copyDisk(from, to, { targetIsZero: true });
  } finally {
    await to.close();
    await from.close();
  }
}

async function viaSdk(container: ContainerClient, name: string, disk: Buffer, inFlight: number): Promise<void> {
  const blob = container.getPageBlobClient(name);
  await blob.create(sizeBytes + 512);
  const offsets: number[] = [];
  for (let at = 0; at < sizeBytes; at += CHUNK_BYTES) if (!isZero(disk.subarray(at, at + CHUNK_BYTES))) offsets.push(at);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < offsets.length) {
      const at = offsets[next++]!;
      await blob.uploadPages(disk.subarray(at, at + CHUNK_BYTES), at, CHUNK_BYTES);
    }
  };
  await Promise.all(Array.from({ length: inFlight }, worker));
  const footer = encodeVhdFooter(newFixedVhdFooter(sizeBytes, { nowMs: Date.now() }));
  await blob.uploadPages(footer, sizeBytes, 512);
}

async function timed(fn: () => Promise<void>): Promise<number> {
  const start = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - start) / 1e6;
}

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

async function main(): Promise<void> {
  const disk = makeDisk();
  const rawDir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-bench-'));
  const rawFile = path.join(rawDir, 'disk.raw');
  fs.writeFileSync(rawFile, disk);
  const times = { blockrelay: [] as number[], sdkConcurrent: [] as number[], sdkSequential: [] as number[], convert: [] as number[] };
  let verified = false;
  for (let rep = 0; rep < repetitions; rep++) {
    // A fresh emulator per repetition: Azurite keeps deleted extents in
    // memory for a while, and every repetition should see the same state.
    const azurite = await startAzurite();
    try {
      const container = BlobServiceClient.fromConnectionString(azurite.connectionString).getContainerClient('bench');
      await container.createIfNotExists();
      // Alternate the order so neither side always runs on a warmer emulator.
      const kinds = ['blockrelay', 'sdkConcurrent', 'sdkSequential', 'convert'] as const;
      const order = rep % 2 === 0 ? kinds : [...kinds].reverse();
      for (const kind of order) {
        const name = `${kind}-${rep}.vhd`;
        const ms = await timed(() =>
          kind === 'blockrelay'
            ? viaBlockrelay(`${azurite.blobEndpoint}/bench/${name}`, azurite.connectionString, disk)
            : kind === 'convert'
              ? viaConvert(`${azurite.blobEndpoint}/bench/${name}`, azurite.connectionString, rawFile)
              : viaSdk(container, name, disk, kind === 'sdkConcurrent' ? concurrency : 1),
        );
        times[kind].push(ms);
        if (kind === 'blockrelay' || kind === 'convert') {
          const back = await container.getPageBlobClient(name).downloadToBuffer(0, sizeBytes);
          if (!back.equals(disk)) throw new Error(`${kind} upload does not read back identically`);
          verified = true;
        }
        await container.getPageBlobClient(name).delete();
      }
    } finally {
      await azurite.stop();
    }
  }
  const medianMs = {
    blockrelay: median(times.blockrelay),
    sdkConcurrent: median(times.sdkConcurrent),
    sdkSequential: median(times.sdkSequential),
    convert: median(times.convert),
  };
  fs.rmSync(rawDir, { recursive: true, force: true });
  const holeBytes = Math.floor(sizeBytes / CHUNK_BYTES / 3) * CHUNK_BYTES;
  const result = {
    bench: 'blob-upload',
    quick,
    sizeBytes,
    dataBytes: sizeBytes - holeBytes,
    holeBytes,
    repetitions,
    concurrency,
    peer: 'Azure SDK uploadPages loop, 4 MiB chunks, zero chunks skipped; same Azurite',
    medianMs,
    timesMs: times,
    blockrelayMiBPerSecond: Math.round((sizeBytes / MiB / (medianMs.blockrelay / 1000)) * 10) / 10,
    ratio: {
      vsSdkSameConcurrency: Math.round((medianMs.blockrelay / medianMs.sdkConcurrent) * 1000) / 1000,
      vsSdkSequential: Math.round((medianMs.blockrelay / medianMs.sdkSequential) * 1000) / 1000,
      convertVsSdkSameConcurrency: Math.round((medianMs.convert / medianMs.sdkConcurrent) * 1000) / 1000,
    },
    verifiedIdentical: verified,
  };
  const json = JSON.stringify(result, null, 2);
  const dir = path.join(__dirname, 'results');
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'blob-upload.json'), `${json}\n`);
  process.stdout.write(`${json}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
