import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { AlignedExtents, loadPoints } from '../../src/retention/failover';
import type { AllocationExtent, DiskTarget } from '../../src/targets/disk-target';
import { fillGaps, PointView, type OverlaySegment } from '../../src/retention/point-view';
import { readManifest } from '../../src/retention/retention-manifest';
import type { ApplyingHop } from '../../src/transport/master-target';
import { REPO_ROOT } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, startMasterTarget, useRetentionDirs, type LogSpec } from './retention-fixture';

const MINUTE_MS = 60_000;

/** Starts `blockrelay export` and resolves with its NBD URI once it says it is ready. */
function startExport(args: string[]): Promise<{ child: ChildProcess; uri: string; stderr: () => string }> {
  // Through `--import tsx` the export runs in this one child, so signals reach it directly.
  const child = spawn(process.execPath, ['--import', 'tsx', path.join(REPO_ROOT, 'src', 'daemon', 'cli.ts'), 'export', ...args], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`export did not start: ${text}`)), 30_000);
    child.stderr!.on('data', (d: Buffer) => {
      text += d.toString();
      const m = /ready: (nbd:\/\/\S+)/.exec(text);
      if (m) {
        clearTimeout(timer);
        resolve({ child, uri: m[1]!, stderr: () => text });
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`export exited ${code}: ${text}`));
    });
  });
}

function exitOf(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}

describe('point view', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const running: ApplyingHop[] = [];
  const children: ChildProcess[] = [];
  afterEach(async () => {
    for (const c of children.splice(0)) if (c.exitCode === null) c.kill('SIGKILL');
    for (const mt of running.splice(0)) await mt.stop();
  });

  /**
   * Applies logs 1..count (one a minute, ending 10 minutes ago or earlier)
   * through a master target with retention on a raw target; `images[seq]`
   * is the disk at point `seq`.
   */
  async function history(count: number, seed: number, spec: (seq: number) => Partial<LogSpec> = () => ({})) {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const { mt } = await startMasterTarget(retentionSetup(dir, retentionDir));
    running.push(mt);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(seed);
    const images: Buffer[] = [];
    const logs = [];
    for (let seq = 1; seq <= count; seq++) {
      logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: Date.now() - (10 + count - seq) * MINUTE_MS, ...spec(seq) }, model, rand));
      images[seq] = Buffer.from(model);
    }
    await sendAll(mt, logs);
    await mt.drain();
    const manifest = await readManifest(retentionDir, 'disk0');
    const { points } = await loadPoints(retentionDir, 'disk0');
    return { dir, retentionDir, mt, images, manifest, points, rand };
  }

  it('keeps the oldest pre-image of each byte when overlaying', () => {
    const seg = (start: number, end: number, log: number, fileOffset = start * 10): OverlaySegment => ({ start, end, log, fileOffset });
    const older = [seg(10, 20, 0), seg(30, 40, 0)];
    const newer = [seg(5, 12, 1), seg(15, 35, 1), seg(38, 50, 1)];
    expect(fillGaps(older, newer)).toEqual([seg(5, 10, 1, 50), seg(10, 20, 0), seg(20, 30, 1, 155), seg(30, 40, 0), seg(40, 50, 1, 382)]);
    expect(fillGaps([], newer)).toEqual(newer);
    expect(fillGaps(older, [])).toEqual(older);
    // An existing segment reaching past one incoming range still shadows the next.
    expect(fillGaps([seg(0, 100, 0)], [seg(10, 20, 1), seg(50, 120, 1)])).toEqual([seg(0, 100, 0), seg(100, 120, 1, 550)]);
  });

  it('widens a source\'s data extents to whole 64 KiB blocks for the copy, covering every data byte', async () => {
    const K = 1024;
    const inner: AllocationExtent[] = [
      { offset: 0, length: 4 * K, zero: true },
      { offset: 4 * K, length: 512, zero: false },
      { offset: 4 * K + 512, length: 70 * K, zero: true },
      { offset: 74.5 * K, length: 1 * K, zero: false },
      { offset: 75.5 * K, length: 300 * K, zero: true },
      { offset: 375.5 * K, length: 4.5 * K, zero: false },
      { offset: 380 * K, length: 132 * K, zero: true },
    ];
    const source = { sizeBytes: 512 * K, extents: async function* () { yield* inner; } } as unknown as DiskTarget;
    const out: AllocationExtent[] = [];
    for await (const e of new AlignedExtents(source).extents(0, 512 * K)) out.push(e);
    expect(out).toEqual([
      { offset: 0, length: 128 * K, zero: false },
      { offset: 128 * K, length: 192 * K, zero: true },
      { offset: 320 * K, length: 64 * K, zero: false },
      { offset: 384 * K, length: 128 * K, zero: true },
    ]);
  });

  it('serves every point through blockrelay export and nbdcopy, while the master target keeps applying', async () => {
    if (!requireTool('nbdcopy')) return;
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(77);
    const t0 = Date.now() - 60 * MINUTE_MS;
    const images = new Map<number, Buffer>();
    const logs = [];
    for (let seq = 1; seq <= 4; seq++) {
      logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: t0 + seq * MINUTE_MS, ...(seq === 3 ? { appTag: 'db' } : {}) }, model, rand));
      images.set(seq, Buffer.from(model));
    }
    await sendAll(mt, logs);
    await mt.drain();

    const exp = await startExport(['--retention', retentionDir, '--disk', 'disk0', '--point', 'disk0-2', '--listen', '127.0.0.1:0']);
    children.push(exp.child);
    expect(exp.uri).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/disk0$/);
    const copy = (name: string): Buffer => {
      const file = path.join(dir, name);
      execFileSync('nbdcopy', [exp.uri, file]);
      return fs.readFileSync(file);
    };
    expect(copy('view2-a.raw').equals(images.get(2)!)).toBe(true);
    // Replication goes on underneath the view: two more logs are applied.
    const more = [];
    for (let seq = 5; seq <= 6; seq++) {
      more.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: t0 + seq * MINUTE_MS, writes: 64 }, model, rand));
      images.set(seq, Buffer.from(model));
    }
    await sendAll(mt, more);
    await mt.drain();
    expect(copy('view2-b.raw').equals(images.get(2)!)).toBe(true);
    exp.child.kill('SIGTERM');
    expect(await exitOf(exp.child)).toBe(0);

    // Every other point, a time between points 4 and 5, latest-app and latest (the newest applied here).
    const between = new Date(t0 + 4.5 * MINUTE_MS).toISOString();
    for (const [point, seq] of [['disk0-1', 1], ['latest-app', 3], [between, 4], ['disk0-5', 5], ['latest', 6]] as const) {
      const e = await startExport(['--retention', retentionDir, '--disk', 'disk0', '--point', point, '--listen', '127.0.0.1:0']);
      children.push(e.child);
      const file = path.join(dir, `view-${seq}.raw`);
      execFileSync('nbdcopy', [e.uri, file]);
      expect(fs.readFileSync(file).equals(images.get(seq)!), point).toBe(true);
      e.child.kill('SIGTERM');
      expect(await exitOf(e.child)).toBe(0);
    }
  });

  it('checks pre-image payloads at open, or on first use for an instant view, naming the damaged segment', async () => {
    const { retentionDir, images, manifest, points } = await history(3, 8);
    const point = points[0]!;
    const segment = path.join(retentionDir, 'disk0', 'journal', `${'2'.padStart(20, '0')}.undo.hrl`);
    // Damage the first payload byte of segment 2 (payloads start after the header and the anchor block).
    const bytes = fs.readFileSync(segment);
    bytes[8192] ^= 0xff;
    fs.writeFileSync(segment, bytes);
    await expect(PointView.open({ retentionDir, manifest, point, newestSeq: 3 })).rejects.toMatchObject({ code: 'BR_RETENTION_JOURNAL_CORRUPT', details: { file: segment, seq: 2 } });

    const view = await PointView.open({ retentionDir, manifest, point, newestSeq: 3, verifyPayloads: 'first-read' });
    try {
      // Segment 2 is the view's first pre-image log (index 0).
      const damaged = view.overlaySegments.find((s) => s.log === 0 && s.fileOffset === 8192)!;
      const err = await view.read(damaged.start, damaged.end - damaged.start).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'BR_RETENTION_JOURNAL_CORRUPT', details: { file: segment, seq: 2, offset: 8192 } });
      // Bytes that do not need the damaged entry are still served.
      const clean = view.overlaySegments.find((s) => s.log !== damaged.log)!;
      expect((await view.read(clean.start, clean.end - clean.start)).equals(images[1]!.subarray(clean.start, clean.end))).toBe(true);
    } finally {
      await view.close();
    }
  });

  it('checks at open only the payloads the overlay uses: damage older segments shadow does not stop a failover', async () => {
    // Log 2 covers the region densely; log 3 rewrites a little of it, so for
    // point 1 every pre-image in segment 3 is shadowed by segment 2's.
    const region = { offset: 0, length: 16 * 1024 };
    const { retentionDir, images, manifest, points } = await history(3, 21, (seq) => ({ region, writes: seq === 2 ? 64 : 2 }));
    const segment3 = path.join(retentionDir, 'disk0', 'journal', `${'3'.padStart(20, '0')}.undo.hrl`);
    const bytes = fs.readFileSync(segment3);
    bytes[8192] ^= 0xff;
    fs.writeFileSync(segment3, bytes);
    const view = await PointView.open({ retentionDir, manifest, point: points[0]!, newestSeq: 3 });
    try {
      // Segment 2 fills every byte segment 3 has (precondition of this case).
      expect(new Set(view.overlaySegments.map((seg) => seg.log))).toEqual(new Set([0]));
      expect((await view.read(0, DISK_BYTES)).equals(images[1]!)).toBe(true);
    } finally {
      await view.close();
    }
    // Point 2 needs segment 3's pre-images: its view refuses at open.
    await expect(PointView.open({ retentionDir, manifest, point: points[1]!, newestSeq: 3 })).rejects.toMatchObject({ code: 'BR_RETENTION_JOURNAL_CORRUPT', details: { file: segment3, seq: 3 } });
  });

  it('reads every point of a VMDK target in process, at random ranges, as the image was', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir, ['disk0'], 'vmdk');
    const { mt } = await startMasterTarget(setup);
    running.push(mt);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(5);
    const images: Buffer[] = [];
    const logs = [];
    for (let seq = 1; seq <= 5; seq++) {
      logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: Date.now() - (10 - seq) * MINUTE_MS }, model, rand));
      images.push(Buffer.from(model));
    }
    await sendAll(mt, logs);
    await mt.drain();
    // A VMDK is opened once per process (uuid registry): the view opens it read-only after the master target.
    await mt.stop();
    running.splice(0);
    const manifest = await readManifest(retentionDir, 'disk0');
    const { points } = await loadPoints(retentionDir, 'disk0');
    for (const point of points) {
      const view = await PointView.open({ retentionDir, manifest, point, newestSeq: 5 });
      try {
        const expected = images[point.seq - 1]!;
        for (let i = 0; i < 50; i++) {
          const a = view.capabilities.alignmentBytes;
          const offset = Math.floor(rand() * (DISK_BYTES / a - 1)) * a;
          const length = a * (1 + Math.floor(rand() * Math.min(400, (DISK_BYTES - offset) / a)));
          expect((await view.read(offset, length)).equals(expected.subarray(offset, offset + length))).toBe(true);
        }
        await expect(view.write()).rejects.toMatchObject({ code: 'BR_TARGET_READ_ONLY' });
      } finally {
        await view.close();
      }
    }
  });
  it('keeps a bounded number of segments open, and reads pruned ones through its own links', async () => {
    const newestSeq = 40;
    const { retentionDir, mt, images, manifest, points, rand } = await history(newestSeq, 14, () => ({ writes: 6 }));
    const atPoint1 = images[1]!;
    const point = points.find((p) => p.seq === 1)!;
    const viewsDir = path.join(retentionDir, 'disk0', 'views');
    // A view directory left by a process that died (no such pid) goes when the next view opens.
    fs.mkdirSync(path.join(viewsDir, '999999999-abcdef'), { recursive: true });
    const fdsBefore = fs.readdirSync('/proc/self/fd').length;
    const view = await PointView.open({ retentionDir, manifest, point, newestSeq, maxOpenSegments: 4 });
    try {
      expect(view.overlayLogs).toBe(newestSeq - 1);
      expect(fs.readdirSync(viewsDir)).toHaveLength(1);
      expect(view.openSegments).toBeLessThanOrEqual(4);
      // Far more segments hold bytes of point 1 than the view keeps open.
      expect(new Set(view.overlaySegments.map((s) => s.log)).size).toBeGreaterThan(30);
      const check = async (): Promise<void> => {
        for (let i = 0; i < 40; i++) {
          const offset = Math.floor(rand() * (DISK_BYTES / 512 - 1)) * 512;
          const length = 512 * (1 + Math.floor(rand() * Math.min(2048, (DISK_BYTES - offset) / 512)));
          expect((await view.read(offset, length)).equals(atPoint1.subarray(offset, offset + length))).toBe(true);
        }
        expect((await view.read(0, DISK_BYTES)).equals(atPoint1)).toBe(true);
        expect(view.openSegments).toBeLessThanOrEqual(4);
        expect(fs.readdirSync('/proc/self/fd').length - fdsBefore).toBeLessThan(20);
      };
      await check();
      // A prune deletes the segments while the view reads them: its links keep them.
      await mt.stop();
      running.splice(0);
      for (const name of fs.readdirSync(path.join(retentionDir, 'disk0', 'journal'))) fs.rmSync(path.join(retentionDir, 'disk0', 'journal', name));
      await check();
    } finally {
      await view.close();
    }
    expect(fs.readdirSync(viewsDir)).toEqual([]);
  });
});
