import { BlobServiceClient } from '@azure/storage-blob';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { useAzurite } from '../helpers/azurite';
import { runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { writeImagePair } from './image-pair';

const MiB = 1024 * 1024;
const azurite = useAzurite();
const tempDir = useTempDirs();

beforeAll(async () => {
  const container = BlobServiceClient.fromConnectionString(azurite().connectionString).getContainerClient('resync');
  await container.createIfNotExists();
});

describe.skipIf(!requireTool('qemu-img'))('blockrelay resync into an Azure page blob (Azurite)', () => {
  it('creates the blob, then resyncs only the changed blocks, leaving it identical to the source for qemu-img compare', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const unused = path.join(dir, 'unused.img');
    const sizeBytes = 16 * MiB;
    writeImagePair(src, unused, sizeBytes, 0, 31);
    const url = `${azurite().blobEndpoint}/resync/disk0.vhd`;
    const env = { AZURE_STORAGE_CONNECTION_STRING: azurite().connectionString };

    const created = await runCli(['resync', `raw:${src}`, `blob:${url}`, '--create', '--json'], { env });
    expect(created.status, created.stderr).toBe(0);
    expect(JSON.parse(created.stdout).blocksSent).toBe(sizeBytes / 4096);

    // The source moves on (as a failed-over disk does); only its changes must travel back.
    const fd = fs.openSync(src, 'r+');
    const one = Buffer.alloc(1);
    for (const at of [0, 3 * MiB + 8192, 9 * MiB + 100, sizeBytes - 1]) {
      fs.readSync(fd, one, 0, 1, at);
      one[0] ^= 0xff; // a change whatever the random data held there
      fs.writeSync(fd, one, 0, 1, at);
    }
    fs.closeSync(fd);
    const resynced = await runCli(['resync', `raw:${src}`, `blob:${url}`, '--json'], { env });
    expect(resynced.status, resynced.stderr).toBe(0);
    const result = JSON.parse(resynced.stdout) as Record<string, number>;
    expect(result.blocksSent).toBe(4);
    expect(result.bytesDiffering).toBe(4 * 4096);

    // A fixed VHD is the raw disk followed by a 512-byte footer: compare its data with qemu-img.
    const blob = BlobServiceClient.fromConnectionString(azurite().connectionString).getContainerClient('resync').getPageBlobClient('disk0.vhd');
    const downloaded = await blob.downloadToBuffer();
    expect(downloaded.length).toBe(sizeBytes + 512);
    const down = path.join(dir, 'downloaded.img');
    fs.writeFileSync(down, downloaded.subarray(0, sizeBytes));
    const cmp = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, down], { encoding: 'utf8' });
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
  });
});
