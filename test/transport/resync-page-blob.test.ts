import { BlobServiceClient } from '@azure/storage-blob';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { networkedResync } from '../../src/resync/networked-resync';
import { openDisk } from '../../src/targets/disk-spec';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import type { ApplyingHop } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { useAzurite } from '../helpers/azurite';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET } from './transport-fixture';

const azurite = useAzurite();

beforeAll(async () => {
  // openDisk reads credentials from the environment, as the roles do.
  process.env.AZURE_STORAGE_CONNECTION_STRING = azurite().connectionString;
  await BlobServiceClient.fromConnectionString(azurite().connectionString).getContainerClient('resync-route').createIfNotExists();
});

describe('networked resync into a page blob a process server applies itself (Azurite)', () => {
  const tmp = useTempDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const h of running.splice(0)) await h.stop();
  });

  it('serves the session on the process server, holds its applier, and leaves the blob equal to the source', async () => {
    const dir = tmp();
    const blob = `blob:${azurite().blobEndpoint}/resync-route/disk0-${Date.now()}.vhd`;
    const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: blob }] }), hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await ps.start();
    running.push(ps);
    const source = Buffer.alloc(DISK_SIZE);
    const rand = prng(31);
    const log1 = await makeLog(path.join(dir, 'src'), 'disk0', 1, source, rand);
    await sendLog({ url: ps.url, secret: SECRET }, log1.envelope, log1.file);
    await ps.drain();
    for (let i = 0; i < 24; i++) source.fill(0x40 + i, i * 256 * 1024, i * 256 * 1024 + 8192);
    const sourceFile = path.join(dir, 'source.img');
    fs.writeFileSync(sourceFile, source);

    // Log 2 is written during the resync and arrives while the session holds the applier.
    let sent: Promise<void> | undefined;
    let heldSeen = false;
    const result = await networkedResync(`raw:${sourceFile}`, {
      peer: { url: ps.url, secret: SECRET },
      diskId: 'disk0',
      statePath: path.join(dir, 'state'),
      cut: async () => 1,
      retryPolicy: FAST_RETRY,
      windowBytes: 1024 * 1024,
      concurrency: 1,
      progressIntervalMs: 0,
      onProgress: () => {
        sent ??= (async () => {
          const log2 = await makeLog(path.join(dir, 'src'), 'disk0', 2, source, rand);
          fs.writeFileSync(sourceFile, source);
          await sendLog({ url: ps.url, secret: SECRET }, log2.envelope, log2.file);
          heldSeen = ps.ledger.get('disk0').appliedSeq === 1 && ps.resyncSessions.active('disk0') !== undefined;
        })();
      },
    });
    await sent;
    expect(result.blocksSent).toBeGreaterThanOrEqual(24 * 2);
    expect(heldSeen).toBe(true);
    await ps.drain();
    expect(ps.ledger.get('disk0').appliedSeq).toBe(2);
    await ps.stop();
    running.splice(0);
    const target = await openDisk(blob, { readOnly: true });
    try {
      expect((await target.read(0, DISK_SIZE)).equals(source)).toBe(true);
    } finally {
      await target.close();
    }
  });
});
