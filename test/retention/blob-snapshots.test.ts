import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlobServiceClient, type ContainerClient } from '@azure/storage-blob';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { SimulatedClock } from '../../src/platform/clock';
import { snapshotDue, snapshotIdOf } from '../../src/retention/blob-snapshots';
import { commitFailover, failover, loadPoints } from '../../src/retention/failover';
import { retentionHooksFromConfig } from '../../src/retention/retention-hooks';
import { openDisk } from '../../src/targets/disk-spec';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { useAzurite } from '../helpers/azurite';
import { useTempDirs } from '../helpers/tmp';
import { FAST_RETRY, quiet, SECRET } from '../transport/transport-fixture';
import { DISK_BYTES, makePatternLog, prng, sendAll, useRetentionDirs } from './retention-fixture';

const MINUTE_MS = 60_000;
const azurite = useAzurite();
let container: ContainerClient;
let blobs = 0;

beforeAll(async () => {
  // openDisk reads credentials from the environment, as the CLI does.
  process.env.AZURE_STORAGE_CONNECTION_STRING = azurite().connectionString;
  container = BlobServiceClient.fromConnectionString(azurite().connectionString).getContainerClient('retention');
  await container.createIfNotExists();
});

async function snapshotsOf(blobName: string): Promise<string[]> {
  const out: string[] = [];
  for await (const item of container.listBlobsFlat({ prefix: blobName, includeSnapshots: true })) if (item.name === blobName && item.snapshot) out.push(item.snapshot);
  return out.sort();
}

describe('page-blob targets keep points as snapshots', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
  });

  /** A master target config for one page-blob disk (a fresh blob) with retention kept `windowHours`. */
  function blobDisk(windowHours: number) {
    const dir = tmp();
    const retentionDir = retentionTmp();
    blobs++;
    const blobName = `disk-${blobs}.vhd`;
    const config = validateConfig({
      stateDir: path.join(dir, 'mt'),
      listen: '127.0.0.1:0',
      secret: SECRET,
      retention: { dir: retentionDir, windowHours },
      disks: [{ id: 'disk0', target: `blob:${azurite().blobEndpoint}/retention/${blobName}` }],
    });
    return { dir, retentionDir, blobName, config };
  }

  it('snapshots on app tags and every 5 minutes of cut time', () => {
    const env = { diskId: 'd', seq: 2, xxhash64: '0'.repeat(16), logLength: 1, cutTimeMs: 10 * MINUTE_MS, cutId: '', group: undefined, appTag: undefined, diskSizeBytes: 512 };
    const last = { id: 'd-1', seq: 1, timeMs: 6 * MINUTE_MS, kind: 'crash' as const, cutId: '' };
    expect(snapshotDue(undefined, env, 5 * MINUTE_MS)).toBe(true);
    expect(snapshotDue(last, env, 5 * MINUTE_MS)).toBe(false);
    expect(snapshotDue(last, { ...env, appTag: 'x' }, 5 * MINUTE_MS)).toBe(true);
    expect(snapshotDue(last, { ...env, cutTimeMs: 11 * MINUTE_MS }, 5 * MINUTE_MS)).toBe(true);
    expect(snapshotIdOf('blob:http://h/a/c/b.vhd?snapshot=2026-01-02T03%3A04%3A05.1234567Z')).toBe('2026-01-02T03:04:05.1234567Z');
  });

  it('fails over to every snapshot point byte for byte, prunes snapshots by the window and deletes them on commit', async () => {
    const { dir, retentionDir, blobName, config } = blobDisk(1);
    const t0 = Date.now() - 3 * 60 * MINUTE_MS;
    const clock = new SimulatedClock(t0);
    const hooks = retentionHooksFromConfig(config, { clock })!;
    const mt = masterTargetFromConfig(config, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY, hooks });
    await mt.start();
    running.push(mt);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(21);
    const images = new Map<number, Buffer>();
    // Cuts every 2 minutes; seq 4 carries an app tag. Due: 1 (first), 4 (app), 7 (6 min after 4).
    for (let seq = 1; seq <= 8; seq++) {
      const cutTimeMs = t0 + seq * 2 * MINUTE_MS;
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs, ...(seq === 4 ? { appTag: 'quiesced' } : {}) }, model, rand);
      images.set(seq, Buffer.from(model));
      await clock.advance(cutTimeMs + 1000 - clock.now());
      await sendAll(mt, [log]);
      await mt.drain();
    }
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => [p.seq, p.kind, p.name])).toEqual([
      [1, 'crash', undefined],
      [4, 'app', 'quiesced'],
      [7, 'crash', undefined],
    ]);
    expect(await snapshotsOf(blobName)).toHaveLength(3);
    expect(fs.readdirSync(path.join(retentionDir, 'disk0', 'journal'))).toEqual([]);
    for (const p of points) {
      const out = path.join(dir, `p${p.seq}.img`);
      const result = await failover({ retentionDir, diskId: 'disk0', point: p.id, out: `raw:${out}`, clock });
      expect(result.journalSegments).toBe(0);
      expect(fs.readFileSync(out).equals(images.get(p.seq)!), p.id).toBe(true);
    }

    // An hour later the first two points leave the window; their snapshots go with them.
    for (let seq = 9; seq <= 10; seq++) {
      const cutTimeMs = t0 + (seq === 9 ? 60 : 70) * MINUTE_MS;
      const log = await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs }, model, rand);
      images.set(seq, Buffer.from(model));
      await clock.advance(cutTimeMs + 1000 - clock.now());
      await sendAll(mt, [log]);
      await mt.drain();
    }
    const after = await loadPoints(retentionDir, 'disk0');
    expect(after.points.map((p) => p.seq)).toEqual([7, 9, 10]);
    const kept = await snapshotsOf(blobName);
    expect(kept).toEqual(after.points.map((p) => snapshotIdOf(p.snapshot!)).sort());
    const out = path.join(dir, 'p10.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'latest-processed', out: `raw:${out}`, clock });
    expect(fs.readFileSync(out).equals(images.get(10)!)).toBe(true);

    // Commit needs the blob's lease: with the master target stopped it deletes every snapshot.
    await mt.stop();
    running.splice(0);
    expect(await commitFailover(retentionDir, 'disk0')).toMatchObject({ pointsDeleted: 3 });
    expect(await snapshotsOf(blobName)).toEqual([]);
    const live = await openDisk(config.disks[0]!.target, { readOnly: true });
    try {
      expect((await live.read(0, DISK_BYTES)).equals(model)).toBe(true);
    } finally {
      await live.close();
    }
  });

  it('deletes its own snapshots that no point lists (a crash between snapshot and record), never anyone else\'s', async () => {
    const { dir, retentionDir, blobName, config } = blobDisk(24);
    const start = async (): Promise<ApplyingHop> => {
      const hooks = retentionHooksFromConfig(config)!;
      const mt = masterTargetFromConfig(config, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY, hooks });
      await mt.start();
      running.push(mt);
      return mt;
    };
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(4);
    const first = await start();
    await sendAll(first, [await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 1, cutTimeMs: Date.now() - 10 * MINUTE_MS }, model, rand)]);
    await first.drain();
    await first.stop();
    running.splice(0);
    // What a crash after Snapshot Blob and before the catalog append leaves,
    // and a snapshot someone else took (no blockrelay metadata).
    const blob = container.getBlobClient(blobName);
    const orphan = (await blob.createSnapshot({ metadata: { blockrelaypoint: '1' } })).snapshot!;
    const foreign = (await blob.createSnapshot()).snapshot!;
    const second = await start();
    await sendAll(second, [await makePatternLog(path.join(dir, 'src'), 'disk0', { seq: 2, cutTimeMs: Date.now() - 5 * MINUTE_MS, appTag: 'db' }, model, rand)]);
    await second.drain();
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => p.seq)).toEqual([1, 2]);
    const listed = points.map((p) => snapshotIdOf(p.snapshot!));
    expect(await snapshotsOf(blobName)).toEqual([...listed, foreign].sort());
    expect(await snapshotsOf(blobName)).not.toContain(orphan);
  });
});
