import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlobServiceClient, type ContainerClient } from '@azure/storage-blob';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { RetryLoop } from '../../src/retry/retry-policy';
import { PageBlobTarget } from '../../src/targets/blob/page-blob-target';
import { openDisk } from '../../src/targets/disk-spec';
import { VHD_FOOTER_OFFSETS, decodeVhdFooter } from '../../src/targets/vhd/vhd-footer';
import { useAzurite } from '../helpers/azurite';
import { AzuriteProxy } from '../helpers/azurite-proxy';
import { runCli } from '../helpers/cli';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { runConformanceSuite } from './conformance';

const MiB = 1024 * 1024;
const azurite = useAzurite();
const tempDir = useTempDirs();
let container: ContainerClient;
let blobCount = 0;

/** A fresh blob URL in the test container. */
function newBlobUrl(endpoint = azurite().blobEndpoint): string {
  blobCount++;
  return `${endpoint}/disks/disk-${blobCount}.vhd`;
}

beforeAll(async () => {
  // openDisk reads credentials from the environment, as the CLI does.
  process.env.AZURE_STORAGE_CONNECTION_STRING = azurite().connectionString;
  container = BlobServiceClient.fromConnectionString(azurite().connectionString).getContainerClient('disks');
  await container.createIfNotExists();
});

runConformanceSuite(
  'Azure page blob',
  {
    create: (sizeBytes) => openDisk(`blob:${newBlobUrl()}`, { create: { sizeBytes } }),
    reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
  },
  { operations: 200 },
);

async function expectCode(promise: Promise<unknown>, code: string): Promise<{ details: Record<string, unknown>; recoverable: boolean }> {
  const err = await promise.then(
    () => expect.fail(`expected ${code}`),
    (e: unknown) => e,
  );
  expect(err).toMatchObject({ code });
  return err as { details: Record<string, unknown>; recoverable: boolean };
}

function blobName(target: { spec: string }): string {
  return target.spec.slice(target.spec.lastIndexOf('/') + 1);
}

describe('page blob target against Azurite', () => {
  it('writes a disk that a plain SDK download finds identical to the raw source, with a valid footer', async () => {
    const sizeBytes = 24 * MiB;
    const source = Buffer.alloc(sizeBytes);
    for (let at = 0; at < sizeBytes; at += 2 * MiB) randomBytes(MiB + 4096).copy(source, at); // data with holes between
    const t = await PageBlobTarget.open(newBlobUrl(), { create: { sizeBytes } });
    await t.write(0, source.subarray(0, 9 * MiB)); // one call spanning three Put Page pieces
    for (let at = 9 * MiB; at < sizeBytes; at += MiB) await t.write(at, source.subarray(at, at + MiB));
    const name = blobName(t);
    const uuid = t.diskUuid;
    await t.close();

    const downloaded = await container.getPageBlobClient(name).downloadToBuffer();
    expect(downloaded.length).toBe(sizeBytes + 512);
    expect(downloaded.subarray(0, sizeBytes).equals(source)).toBe(true);
    const footer = decodeVhdFooter(downloaded.subarray(sizeBytes), sizeBytes, name);
    expect(footer).toMatchObject({ diskType: 2, currentSizeBytes: sizeBytes, uniqueId: uuid });

    if (requireTool('qemu-img')) {
      // The downloaded blob is a fixed VHD qemu reads as the source.
      const dir = tempDir();
      fs.writeFileSync(path.join(dir, 'src.raw'), source);
      fs.writeFileSync(path.join(dir, 'blob.vhd'), downloaded);
      const out = execFileSync('qemu-img', ['compare', '-f', 'vpc', '-F', 'raw', path.join(dir, 'blob.vhd'), path.join(dir, 'src.raw')], { encoding: 'utf8' });
      expect(out).toContain('Images are identical');
    }
  });

  it('creates the container when it is missing', async () => {
    const t = await PageBlobTarget.open(`${azurite().blobEndpoint}/new-container/d.vhd`, { create: { sizeBytes: MiB } });
    await t.write(0, Buffer.alloc(512, 8));
    await t.close();
    const blob = BlobServiceClient.fromConnectionString(azurite().connectionString).getContainerClient('new-container').getPageBlobClient('d.vhd');
    expect((await blob.downloadToBuffer(0, 512)).equals(Buffer.alloc(512, 8))).toBe(true);
  });

  it('keeps holes as holes: all-zero writes and zero ranges leave no page ranges', async () => {
    const t = await PageBlobTarget.open(newBlobUrl(), { create: { sizeBytes: 16 * MiB } });
    await t.write(0, Buffer.alloc(8 * MiB)); // all zero: cleared, not uploaded
    await t.write(4 * MiB, Buffer.alloc(MiB, 3));
    await t.writeZeroes(4 * MiB + 512 * 4, 512 * 8);
    const extents = [];
    for await (const e of t.extents(0, 16 * MiB)) extents.push(e);
    expect(extents).toEqual([
      { offset: 0, length: 4 * MiB, zero: true },
      { offset: 4 * MiB, length: 2048, zero: false },
      { offset: 4 * MiB + 2048, length: 4096, zero: true },
      { offset: 4 * MiB + 6144, length: MiB - 6144, zero: false },
      { offset: 5 * MiB, length: 11 * MiB, zero: true },
    ]);
    expect((await t.read(4 * MiB + 2048, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    await t.close();
  });

  it('refuses a second writer with BR_BLOB_LEASE_HELD and lets readers and a later writer in', async () => {
    const url = newBlobUrl();
    const first = await PageBlobTarget.open(url, { create: { sizeBytes: 4 * MiB } });
    await first.write(0, Buffer.alloc(512, 1));
    const err = await expectCode(PageBlobTarget.open(url), 'BR_BLOB_LEASE_HELD');
    expect(err.recoverable).toBe(true);
    // Writes that do not carry the lease are refused by the service itself.
    await expect(container.getPageBlobClient(blobName(first)).uploadPages(Buffer.alloc(512, 9), 0, 512)).rejects.toMatchObject({ statusCode: 412 });
    // Reading needs no lease (another process may read while we write).
    expect((await container.getPageBlobClient(blobName(first)).downloadToBuffer(0, 512)).equals(Buffer.alloc(512, 1))).toBe(true);
    await first.close();
    expect((await container.getPageBlobClient(blobName(first)).getProperties()).leaseState).toBe('available');
    const second = await PageBlobTarget.open(url);
    await second.write(0, Buffer.alloc(512, 2));
    await second.close();
  });

  it('stops writing with BR_BLOB_LEASE_LOST when its lease is broken, writing nothing more', async () => {
    const t = await PageBlobTarget.open(newBlobUrl(), { create: { sizeBytes: 4 * MiB } });
    const blob = container.getPageBlobClient(blobName(t));
    await blob.getBlobLeaseClient().breakLease(0);
    await expectCode(t.write(0, Buffer.alloc(512, 7)), 'BR_BLOB_LEASE_LOST');
    await expectCode(t.write(512, Buffer.alloc(512, 7)), 'BR_BLOB_LEASE_LOST');
    await expectCode(t.flush(), 'BR_BLOB_LEASE_LOST');
    expect((await blob.downloadToBuffer(0, 1024)).equals(Buffer.alloc(1024))).toBe(true);
    await t.close();
  });

  it('renews its lease on the injected clock and cancels renewal on close', async () => {
    const clock = new SimulatedClock();
    const t = await PageBlobTarget.open(newBlobUrl(), { create: { sizeBytes: 4 * MiB }, clock });
    expect(clock.pendingTimers()).toBe(1);
    await clock.advance(19_999);
    expect(t.leaseRenewals).toBe(0);
    for (let renewal = 1; renewal <= 3; renewal++) {
      // Each renewal is a real request to Azurite; the next one is scheduled when it completes.
      if (renewal > 1) await clock.advance(20_000);
      else await clock.advance(1);
      for (let i = 0; i < 200 && t.leaseRenewals < renewal; i++) await new Promise((r) => setTimeout(r, 10));
      expect(t.leaseRenewals).toBe(renewal);
    }
    await t.write(0, Buffer.alloc(512, 1));
    await t.close();
    expect(clock.pendingTimers()).toBe(0);
    expect((await container.getPageBlobClient(blobName(t)).getProperties()).leaseState).toBe('available');
  });

  it('lets writes in flight finish under the lease when closed meanwhile', async () => {
    const t = await PageBlobTarget.open(newBlobUrl(), { create: { sizeBytes: 16 * MiB } });
    const data = randomBytes(12 * MiB);
    const writing = t.write(MiB, data);
    await t.close();
    await writing;
    const blob = container.getPageBlobClient(blobName(t));
    expect((await blob.downloadToBuffer(MiB, 12 * MiB)).equals(data)).toBe(true);
    expect((await blob.getProperties()).leaseState).toBe('available');
  });

  it('warns when a created disk is not a whole MiB, which Azure cannot attach', async () => {
    const warnings: unknown[] = [];
    const logger = { warn: (...args: unknown[]) => void warnings.push(args) };
    const odd = await PageBlobTarget.open(newBlobUrl(), { create: { sizeBytes: MiB + 512 }, logger });
    await odd.close();
    expect(warnings).toHaveLength(1);
    const even = await PageBlobTarget.open(newBlobUrl(), { create: { sizeBytes: 2 * MiB }, logger });
    await even.close();
    expect(warnings).toHaveLength(1);
  });

  it('takes snapshots as read-only points that open while the disk is being written', async () => {
    const t = await PageBlobTarget.open(newBlobUrl(), { create: { sizeBytes: 4 * MiB } });
    await t.write(0, Buffer.alloc(MiB, 0xa1));
    const first = await t.snapshot();
    await t.write(512, Buffer.alloc(1024, 0xb2));
    await t.writeZeroes(2048, 512);
    const second = await t.snapshot();
    await t.write(0, Buffer.alloc(4 * MiB, 0xc3));
    expect(first.spec).toBe(`${t.spec}?snapshot=${encodeURIComponent(first.snapshot)}`);

    await expectCode(openDisk(first.spec), 'BR_TARGET_READ_ONLY');
    const p1 = await openDisk(first.spec, { readOnly: true });
    expect(p1.sizeBytes).toBe(4 * MiB);
    expect(p1.diskUuid).toBe(t.diskUuid);
    expect((await p1.read(0, 2 * MiB)).equals(Buffer.concat([Buffer.alloc(MiB, 0xa1), Buffer.alloc(MiB)]))).toBe(true);
    const extents = [];
    for await (const e of p1.extents(0, 4 * MiB)) extents.push(e);
    expect(extents).toEqual([{ offset: 0, length: MiB, zero: false }, { offset: MiB, length: 3 * MiB, zero: true }]);
    await p1.close();
    const p2 = await openDisk(second.spec, { readOnly: true });
    const expected = Buffer.alloc(4096, 0xa1);
    expected.fill(0xb2, 512, 1536);
    expected.fill(0, 2048, 2560);
    expect((await p2.read(0, 4096)).equals(expected)).toBe(true);
    await p2.close();

    expect((await t.listSnapshots()).map((x) => x.snapshot)).toEqual([first.snapshot, second.snapshot]);
    await t.deleteSnapshot(first.snapshot);
    expect((await t.listSnapshots()).map((x) => x.snapshot)).toEqual([second.snapshot]);
    await expectCode(openDisk(first.spec, { readOnly: true }), 'BR_BLOB_NOT_FOUND');
    expect((await t.read(0, 512)).equals(Buffer.alloc(512, 0xc3))).toBe(true);
    await t.close();
  });

  it('refuses disks that do not fit the 8 TiB page blob limit, before any request', async () => {
    const url = newBlobUrl();
    const err = await expectCode(PageBlobTarget.open(url, { create: { sizeBytes: 8 * 1024 * 1024 * MiB } }), 'BR_BLOB_TOO_LARGE');
    expect(err.recoverable).toBe(false);
    await expect(container.getPageBlobClient(url.slice(url.lastIndexOf('/') + 1)).exists()).resolves.toBe(false);
    // Azurite accepts a 9 TiB page blob; we refuse to open one.
    const big = container.getPageBlobClient('nine-tib.vhd');
    await big.create(9 * 1024 * 1024 * MiB);
    await expectCode(PageBlobTarget.open(big.url), 'BR_BLOB_TOO_LARGE');
  });

  it('refuses a damaged footer naming its offset, and writes nothing', async () => {
    const t = await PageBlobTarget.open(newBlobUrl(), { create: { sizeBytes: 2 * MiB } });
    await t.write(0, Buffer.alloc(4096, 0x11));
    const url = t.spec.slice('blob:'.length);
    await t.close();
    const blob = container.getPageBlobClient(blobName(t));
    const footer = await blob.downloadToBuffer(2 * MiB, 512);
    footer[VHD_FOOTER_OFFSETS.currentSize + 6] ^= 0x01;
    await blob.uploadPages(footer, 2 * MiB, 512);
    const before = await blob.downloadToBuffer();
    const err = await expectCode(PageBlobTarget.open(url), 'BR_VHD_FOOTER_CORRUPT');
    expect(err.details.offset).toBe(2 * MiB + VHD_FOOTER_OFFSETS.checksum);
    expect((await blob.downloadToBuffer()).equals(before)).toBe(true);
    // The lease taken for the open was given back.
    expect((await blob.getProperties()).leaseState).toBe('available');

    const bare = container.getPageBlobClient('no-footer.vhd');
    await bare.create(MiB);
    const bareErr = await expectCode(PageBlobTarget.open(bare.url), 'BR_VHD_FOOTER_CORRUPT');
    expect(bareErr.details.offset).toBe(MiB - 512);
  });

  it('refuses block blobs, missing blobs and creating over a disk that is not ours', async () => {
    const block = container.getBlockBlobClient('block.vhd');
    await block.upload('hello', 5);
    await expectCode(PageBlobTarget.open(block.url), 'BR_BLOB_NOT_PAGE_BLOB');
    await expectCode(PageBlobTarget.open(block.url, { create: { sizeBytes: MiB } }), 'BR_TARGET_NAME_CONFLICT');
    await expectCode(PageBlobTarget.open(newBlobUrl()), 'BR_BLOB_NOT_FOUND');

    const url = newBlobUrl();
    const diskUuid = '3f0c2b1a-9e8d-4c7b-a6f5-e4d3c2b1a090';
    const t = await PageBlobTarget.open(url, { create: { sizeBytes: MiB, diskUuid } });
    await t.write(0, Buffer.alloc(512, 5));
    await t.close();
    await expectCode(PageBlobTarget.open(url, { create: { sizeBytes: MiB } }), 'BR_TARGET_NAME_CONFLICT');
    const again = await PageBlobTarget.open(url, { create: { sizeBytes: MiB, diskUuid } });
    expect((await again.read(0, 512)).equals(Buffer.alloc(512, 5))).toBe(true);
    await again.close();
  });

  it('refuses bad credentials: wrong key is BR_BLOB_AUTH, missing or foreign ones BR_BLOB_CREDENTIALS', async () => {
    const url = newBlobUrl();
    const wrongKey = azurite().connectionString.replace(/AccountKey=[^;]+/, `AccountKey=${Buffer.alloc(64, 1).toString('base64')}`);
    const err = await expectCode(PageBlobTarget.open(url, { create: { sizeBytes: MiB }, connectionString: wrongKey }), 'BR_BLOB_AUTH');
    expect(err.recoverable).toBe(false);
    await expectCode(PageBlobTarget.open(url, { create: { sizeBytes: MiB }, connectionString: ' ' }), 'BR_BLOB_CREDENTIALS');
    await expectCode(PageBlobTarget.open(url, { connectionString: 'AccountName=other;AccountKey=AAAA' }), 'BR_BLOB_CREDENTIALS');
  });
});

describe('page blob target through a recording proxy', () => {
  let proxy: AzuriteProxy;
  beforeAll(async () => {
    proxy = await AzuriteProxy.start(azurite().port);
  });
  afterAll(async () => {
    await proxy.stop();
  });

  it('splits writes into Put Page requests of at most 4 MiB, with bounded concurrency', async () => {
    const t = await PageBlobTarget.open(newBlobUrl(proxy.blobEndpoint), { create: { sizeBytes: 64 * MiB }, maxInFlightRequests: 3 });
    proxy.clear();
    const data = randomBytes(21 * MiB + 1024);
    await t.write(MiB, data);
    const puts = proxy.requests.filter((r) => r.comp === 'page' && r.pageWrite === 'update');
    expect(puts.map((r) => r.contentLengthBytes).sort((a, b) => b - a)).toEqual([4 * MiB, 4 * MiB, 4 * MiB, 4 * MiB, 4 * MiB, MiB + 1024]);
    expect(Math.max(...puts.map((r) => r.contentLengthBytes))).toBeLessThanOrEqual(4 * MiB);
    expect(proxy.maxConcurrentPutPages).toBeLessThanOrEqual(3);
    expect(proxy.maxConcurrentPutPages).toBeGreaterThan(1);
    expect((await t.read(MiB, data.length)).equals(data)).toBe(true);
    await t.close();
  });

  it('classifies throttling and server errors as recoverable and auth refusals as not', async () => {
    const t = await PageBlobTarget.open(newBlobUrl(proxy.blobEndpoint), { create: { sizeBytes: 4 * MiB }, sdkMaxTries: 1 });
    const isPut = (r: { comp: string; pageWrite: string | undefined }): boolean => r.comp === 'page' && r.pageWrite === 'update';
    const cases = [
      { status: 503, errorCode: 'ServerBusy', code: 'BR_BLOB_THROTTLED', recoverable: true },
      { status: 429, errorCode: 'TooManyRequests', code: 'BR_BLOB_THROTTLED', recoverable: true },
      { status: 500, errorCode: 'InternalError', code: 'BR_BLOB_SERVER_ERROR', recoverable: true },
      { status: 403, errorCode: 'AuthenticationFailed', code: 'BR_BLOB_AUTH', recoverable: false },
      { status: 401, errorCode: 'NoAuthenticationInformation', code: 'BR_BLOB_AUTH', recoverable: false },
    ];
    for (const c of cases) {
      proxy.injectFault({ match: isPut, status: c.status, errorCode: c.errorCode, times: 1 });
      const err = await expectCode(t.write(0, Buffer.alloc(512, 1)), c.code);
      expect(err.recoverable).toBe(c.recoverable);
    }
    await t.close();
  });

  it('removes a blob it created when writing the footer fails, so nothing half-made is left', async () => {
    const url = newBlobUrl(proxy.blobEndpoint);
    proxy.injectFault({ match: (r) => r.comp === 'page' && r.pageWrite === 'update', status: 403, errorCode: 'AuthorizationPermissionMismatch', times: 1 });
    await expectCode(PageBlobTarget.open(url, { create: { sizeBytes: MiB }, sdkMaxTries: 1 }), 'BR_BLOB_AUTH');
    await expect(container.getPageBlobClient(url.slice(url.lastIndexOf('/') + 1)).exists()).resolves.toBe(false);
    const t = await PageBlobTarget.open(url, { create: { sizeBytes: MiB } });
    await t.close();
  });

  it('succeeds under the project retry policy once throttling ends', async () => {
    const t = await PageBlobTarget.open(newBlobUrl(proxy.blobEndpoint), { create: { sizeBytes: 4 * MiB }, sdkMaxTries: 1 });
    proxy.injectFault({ match: (r) => r.comp === 'page' && r.pageWrite === 'update', status: 503, errorCode: 'ServerBusy', times: 2 });
    const clock = new SimulatedClock(0);
    const attemptsAtMs: number[] = [];
    const loop = new RetryLoop(async () => {
      attemptsAtMs.push(clock.now());
      await t.write(512, Buffer.alloc(1024, 0x4d));
    }, { clock });
    const done = loop.run();
    for (let retry = 0; retry < 2; retry++) {
      // Wait (in real time) for the failed attempt to schedule its retry, then let simulated time reach it.
      for (let i = 0; i < 500 && clock.pendingTimers() === 0; i++) await new Promise((r) => setTimeout(r, 10));
      await clock.advance(60_000);
    }
    await done;
    expect(attemptsAtMs).toEqual([0, 60_000, 120_000]);
    expect((await t.read(512, 1024)).equals(Buffer.alloc(1024, 0x4d))).toBe(true);
    await t.close();
  });
});

describe('blockrelay convert with blob:', () => {
  it('uploads a raw disk to a page blob and downloads it to a VHD file, identical to the source', async () => {
    const dir = tempDir();
    const rawFile = path.join(dir, 'src.raw');
    const data = Buffer.alloc(8 * MiB);
    randomBytes(MiB).copy(data, MiB);
    randomBytes(512).copy(data, 7 * MiB + 512);
    fs.writeFileSync(rawFile, data);
    const url = newBlobUrl();
    const env = { AZURE_STORAGE_CONNECTION_STRING: azurite().connectionString };
    const up = await runCli(['convert', `raw:${rawFile}`, `blob:${url}`], { env });
    expect(up.stderr).not.toMatch(/BR_/);
    expect(up.status).toBe(0);
    const blob = container.getPageBlobClient(url.slice(url.lastIndexOf('/') + 1));
    const downloaded = await blob.downloadToBuffer();
    expect(downloaded.length).toBe(8 * MiB + 512);
    expect(downloaded.subarray(0, 8 * MiB).equals(data)).toBe(true);
    // Holes stayed holes: only the two data regions hold pages.
    const ranges = [];
    for await (const r of blob.listPageRanges(0, 8 * MiB)) ranges.push(r);
    expect(ranges.reduce((n, r) => n + (r.end + 1 - r.start), 0)).toBeLessThanOrEqual(MiB + 64 * 1024);
    expect((await blob.getProperties()).leaseState).toBe('available');

    const vhdFile = path.join(dir, 'down.vhd');
    const down = await runCli(['convert', `blob:${url}`, `vhd:${vhdFile}`], { env });
    expect(down.status).toBe(0);
    expect(fs.readFileSync(vhdFile).subarray(0, 8 * MiB).equals(data)).toBe(true);

    const noCreds = await runCli(['convert', `raw:${rawFile}`, `blob:${newBlobUrl()}`], { env: { AZURE_STORAGE_CONNECTION_STRING: '' } });
    expect(noCreds.status).not.toBe(0);
    expect(noCreds.stderr).toContain('BR_BLOB_CREDENTIALS');
  });
});
