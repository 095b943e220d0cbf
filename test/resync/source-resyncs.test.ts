import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SourceControl } from '../../src/daemon/source-control';
import { systemClock } from '../../src/platform/clock';
import { SourceResyncs } from '../../src/resync/source-resyncs';
import { DiskHealth } from '../../src/retry/health';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { callJson } from '../../src/transport/log-client';
import { LogShipper } from '../../src/transport/log-shipper';
import { trackerShippingSource } from '../../src/transport/tracker-shipping';
import { useTempDirs } from '../helpers/tmp';
import { FAST_RETRY, prng, quiet, SECRET, startHops } from '../transport/transport-fixture';

const SIZE = 16 * 1024 * 1024;
const CONTROL_SECRET = 'control-secret-0123456789';

describe("the source control API's POST /v1/disks/:disk/resync", () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it('cuts the tracked disk, resyncs it through the process server while writes go on, and reports the result', async () => {
    const dir = tmp();
    const targetFile = path.join(dir, 'target.img');
    const { mt, ps, stop } = await startHops(dir, `raw:${targetFile}`);
    cleanup.push(stop);
    const sourceFile = path.join(dir, 'source.img');
    fs.writeFileSync(sourceFile, Buffer.alloc(SIZE));
    const fd = fs.openSync(sourceFile, 'r+');
    cleanup.push(async () => fs.closeSync(fd));
    const tracker = await ChangeTracker.open({ dir: path.join(dir, 'logs'), diskId: 'disk0', diskSizeBytes: SIZE, persistIntervalMs: 0 });
    cleanup.push(() => tracker.close());
    const shipper = new LogShipper(trackerShippingSource(tracker), { peer: { url: ps.url, secret: SECRET }, clock: systemClock, ...quiet(), health: new DiskHealth('disk0'), retryPolicy: FAST_RETRY });
    shipper.start();
    cleanup.push(() => shipper.stop());
    const rand = prng(13);
    const write = async (tracked: boolean): Promise<void> => {
      const offset = Math.floor(rand() * (SIZE / 4096 - 4)) * 4096;
      const data = Buffer.alloc(4 * 4096);
      for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
      if (tracked) await tracker.recordWrite(offset, data);
      fs.writeSync(fd, data, 0, data.length, offset);
    };
    for (let i = 0; i < 20; i++) await write(true);
    await ChangeTracker.cut([tracker]);
    shipper.wake();
    for (let i = 0; i < 100; i++) await write(false);

    const resyncs = new SourceResyncs({
      diskSpecs: new Map([['disk0', `raw:${sourceFile}`]]),
      peer: { url: ps.url, secret: SECRET },
      stateDir: path.join(dir, 'resync'),
      cut: async () => {
        const [sealed] = await ChangeTracker.cut([tracker]);
        shipper.wake();
        return sealed?.sequence;
      },
      clock: systemClock,
      ...quiet(),
      retryPolicy: FAST_RETRY,
    });
    cleanup.push(() => resyncs.stop());
    const control = new SourceControl({ diskIds: ['disk0'], cut: async () => ({ cutId: 'x', cutTimeMs: 0 }), status: () => ({}), hook: undefined, appIntervalMs: 0, secret: CONTROL_SECRET, clock: systemClock, ...quiet(), extraRoutes: resyncs.routes() });
    await control.listen('127.0.0.1', 0);
    cleanup.push(() => control.close());
    const api = { url: control.url, secret: CONTROL_SECRET };

    let writing = true;
    const writer = (async () => {
      while (writing) {
        await write(true);
        await new Promise((r) => setTimeout(r, 3));
      }
    })();
    expect(await callJson(api, 'POST', '/v1/disks/disk0/resync')).toMatchObject({ diskId: 'disk0', state: 'running' });
    await expect(callJson(api, 'POST', '/v1/disks/disk0/resync')).rejects.toMatchObject({ code: 'BR_RESYNC_SESSION_BUSY' });
    await expect(callJson(api, 'POST', '/v1/disks/disk9/resync')).rejects.toMatchObject({ code: 'BR_DISK_UNKNOWN' });
    await expect(callJson({ ...api, secret: 'wrong-secret-0123456789' }, 'GET', '/v1/disks/disk0/resync')).rejects.toMatchObject({ code: 'BR_AUTH_FAILED' });
    const final = await resyncs.whenDone('disk0');
    writing = false;
    await writer;
    expect(final.state).toBe('done');
    const reported = (await callJson(api, 'GET', '/v1/disks/disk0/resync')) as { state: string; result: { blocksSent: number; afterSeq: number | null; attempts: number } };
    expect(reported.state).toBe('done');
    expect(reported.result.blocksSent).toBeGreaterThan(0);
    expect(reported.result.afterSeq).not.toBeNull();

    await ChangeTracker.cut([tracker]);
    shipper.wake();
    await shipper.whenIdle();
    await ps.drain();
    await mt.drain();
    expect(fs.readFileSync(targetFile).equals(fs.readFileSync(sourceFile))).toBe(true);
  });

  it('resumes a resync the source was stopped in the middle of when it starts again, from the saved progress', async () => {
    const dir = tmp();
    const targetFile = path.join(dir, 'target.img');
    const { mt, ps, stop } = await startHops(dir, `raw:${targetFile}`);
    cleanup.push(stop);
    const sourceFile = path.join(dir, 'source.img');
    const rand = prng(29);
    const bytes = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i += 4) bytes.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
    fs.writeFileSync(sourceFile, bytes);
    const stateDir = path.join(dir, 'resync');
    const options = { diskSpecs: new Map([['disk0', `raw:${sourceFile}`]]), peer: { url: ps.url, secret: SECRET }, stateDir, cut: async () => undefined, clock: systemClock, ...quiet(), retryPolicy: FAST_RETRY };
    // The first source process reads slowly and stops (SIGTERM) once progress is saved.
    const first = new SourceResyncs({ ...options, readRateBytesPerSec: 8 * 1024 * 1024 });
    expect(first.interrupted()).toEqual([]);
    first.start('disk0');
    for (let waited = 0; !fs.existsSync(first.statePath('disk0')) && waited < 10_000; waited += 10) await new Promise((r) => setTimeout(r, 10));
    await first.stop();
    expect(first.state('disk0').state).toBe('failed');
    // A request that reaches the control API while the source stops starts nothing.
    expect(() => first.start('disk0')).toThrow(expect.objectContaining({ code: 'BR_SOURCE_STOPPING' }));

    // The next one finds it and resumes it on its own.
    const next = new SourceResyncs(options);
    cleanup.push(() => next.stop());
    expect(next.interrupted()).toEqual(['disk0']);
    expect(next.resumeInterrupted()).toEqual(['disk0']);
    const final = await next.whenDone('disk0');
    expect(final.state).toBe('done');
    const result = (final as { result: { resumedFromBytes: number; totals: { blocksCompared: number } } }).result;
    expect(result.resumedFromBytes).toBeGreaterThan(0);
    expect(result.totals.blocksCompared).toBeLessThan(1.2 * (SIZE / 4096));
    expect(next.interrupted()).toEqual([]);
    await ps.drain();
    await mt.drain();
    expect(fs.readFileSync(targetFile).equals(bytes)).toBe(true);
  });
});
