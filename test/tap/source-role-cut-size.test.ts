import * as path from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { useTempDirs } from '../helpers/tmp';
import { NbdClient } from '../../src/tap/nbd-client';
import { SOURCE_ROLE_CUT_BYTES_MAX, SOURCE_ROLE_CUT_BYTES_MIN, SOURCE_ROLE_DEFAULTS, SourceRole, type SourceRoleOptions } from '../../src/tap/source-role';
import { SimulatedClock } from '../../src/platform/clock';
import { ChangeTracker, type SealedLogInfo } from '../../src/tracking/change-tracker';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { RawTarget } from '../../src/targets/raw/raw-target';

/**
 * The size trigger of the source role's cuts (SourceRoleOptions.cutBytes):
 * a busy disk is cut as soon as its active log holds `cutBytes`, a quiet
 * one only when the interval ends, and every disk of the role at one cut.
 */

const tempDir = useTempDirs();
const roles: SourceRole[] = [];
const clients: NbdClient[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) await c.close().catch(() => undefined);
  for (const r of roles.splice(0)) await r.stop(1000).catch(() => undefined);
});

const MiB = 1024 * 1024;
const INTERVAL_MS = 10_000;
const POLL_MS = SOURCE_ROLE_DEFAULTS.sizeCheckIntervalMs;

async function startRole(dir: string, options: Partial<SourceRoleOptions> & { onSealed: (logs: readonly SealedLogInfo[]) => void }): Promise<SourceRole> {
  const a = await RawTarget.open(path.join(dir, 'a.img'), { create: { sizeBytes: 64 * MiB } });
  const b = await RawTarget.open(path.join(dir, 'b.img'), { create: { sizeBytes: 16 * MiB } });
  const role = await SourceRole.start({
    disks: [{ id: 'a', target: a }, { id: 'b', target: b }],
    logDir: path.join(dir, 'logs'),
    listenHost: '127.0.0.1',
    listenPort: 0,
    intervalMs: INTERVAL_MS,
    cutBytes: MiB,
    ...options,
  });
  roles.push(role);
  return role;
}

async function connect(role: SourceRole, id: string): Promise<NbdClient> {
  const url = new URL(role.exportUris[id]!);
  const client = await NbdClient.connect({ host: url.hostname, port: Number(url.port), exportName: id });
  clients.push(client);
  return client;
}

/** Writes `totalBytes` from `offset` in 64 KiB writes, each with its own fill byte. */
async function writeStream(client: NbdClient, offset: number, totalBytes: number): Promise<void> {
  for (let done = 0; done < totalBytes; done += 64 * 1024) await client.write(offset + done, Buffer.alloc(64 * 1024, (done >> 16) & 0xff));
}

describe('SourceRole cuts by size', () => {
  it('cuts every disk at one cut as soon as a busy disk\'s log holds cutBytes, and counts the next interval from that cut', async () => {
    const dir = tempDir();
    const clock = new SimulatedClock();
    const cuts: (readonly SealedLogInfo[])[] = [];
    const triggers: unknown[] = [];
    const logger = { info: (obj: object, msg: string) => msg === 'sealed logs at a cut' && triggers.push((obj as { trigger?: unknown }).trigger), warn: () => {} };
    const role = await startRole(dir, { clock, logger, onSealed: (logs) => cuts.push(logs) });
    const a = await connect(role, 'a');
    const b = await connect(role, 'b');

    // Below cutBytes: polls see the log but do not cut.
    await writeStream(a, 0, MiB / 2);
    await b.write(0, Buffer.alloc(4096, 7));
    await clock.advance(5 * POLL_MS);
    expect(cuts).toEqual([]);

    // Past cutBytes, 1 s into a 10 s interval: the next poll cuts.
    await clock.advance(1000 - 5 * POLL_MS);
    await writeStream(a, MiB, MiB);
    expect(role.trackers.get('a')!.status().activeLogBytes).toBeGreaterThanOrEqual(MiB);
    await clock.advance(POLL_MS);
    await vi.waitFor(() => expect(cuts.length).toBe(1), { timeout: 10_000 });
    await clock.advance(0);
    const sizeCutMs = clock.now();
    // The quiet disk b is sealed at the same cut: one common point.
    expect(cuts[0]!.map((l) => l.diskId).sort()).toEqual(['a', 'b']);
    expect(new Set(cuts[0]!.map((l) => l.cutId)).size).toBe(1);
    expect(cuts[0]!.find((l) => l.diskId === 'a')!.sizeBytes).toBeGreaterThanOrEqual(MiB + MiB / 2);
    expect(role.cutsByTrigger()).toEqual({ interval: 0, size: 1 });

    // The interval restarted at the size cut: nothing at the old 10 s mark...
    await b.write(8192, Buffer.alloc(4096, 8));
    await clock.advance(sizeCutMs + INTERVAL_MS - 1 - clock.now());
    expect(cuts.length).toBe(1);
    // ...and a cut 10 s after the size cut.
    await clock.advance(1);
    await vi.waitFor(() => expect(cuts.length).toBe(2), { timeout: 10_000 });
    await clock.advance(0);
    expect(role.cutsByTrigger()).toEqual({ interval: 1, size: 1 });
    expect(new Set(cuts[1]!.map((l) => l.cutId)).size).toBe(1);
    // What an operator reads in the log: why the cut came, at most one line
    // a minute for the role's own cuts (the interval cut 10 s later has none)...
    expect(triggers).toEqual(['size']);
    // ...and the next line, a minute on, counts the cuts since the last.
    const lines: Array<{ trigger?: unknown; cutsSinceLastLine?: unknown }> = [];
    logger.info = (obj: object, msg: string) => msg === 'sealed logs at a cut' && lines.push(obj as { trigger?: unknown; cutsSinceLastLine?: unknown });
    for (let i = 0; i < 6; i++) {
      await b.write(16384 + i * 4096, Buffer.alloc(4096, 9));
      await clock.advance(INTERVAL_MS);
      await vi.waitFor(() => expect(cuts.length).toBe(3 + i), { timeout: 10_000 });
      await clock.advance(0);
    }
    expect(lines).toEqual([expect.objectContaining({ trigger: 'interval', cutsSinceLastLine: 6 })]);
  });

  it('cuts a quiet disk only when the interval ends, and an idle role not at all', async () => {
    const dir = tempDir();
    const clock = new SimulatedClock();
    const cuts: (readonly SealedLogInfo[])[] = [];
    const role = await startRole(dir, { clock, onSealed: (logs) => cuts.push(logs) });

    await clock.advance(3 * INTERVAL_MS);
    expect(cuts).toEqual([]);
    expect(role.cutsByTrigger()).toEqual({ interval: 0, size: 0 });

    const a = await connect(role, 'a');
    const startMs = clock.now();
    await writeStream(a, 0, MiB / 4);
    // The interval timer runs from the last scheduled cut, at a multiple of INTERVAL_MS.
    const dueMs = startMs + INTERVAL_MS;
    await clock.advance(dueMs - 1 - clock.now());
    expect(cuts).toEqual([]);
    await clock.advance(1);
    await vi.waitFor(() => expect(cuts.length).toBe(1), { timeout: 10_000 });
    await clock.advance(0);
    expect(role.cutsByTrigger()).toEqual({ interval: 1, size: 0 });
  });

  it('retries a failed size cut at the next interval, not at every poll', async () => {
    const dir = tempDir();
    const clock = new SimulatedClock();
    const cuts: (readonly SealedLogInfo[])[] = [];
    const failures: unknown[] = [];
    const logger = { info: () => {}, warn: (obj: object, msg: string) => msg.startsWith('cut failed') && failures.push((obj as { trigger?: unknown }).trigger) };
    const role = await startRole(dir, { clock, logger, onSealed: (logs) => cuts.push(logs) });
    const a = await connect(role, 'a');
    await writeStream(a, 0, 2 * MiB);
    // The trackers fold their logs on I/O errors rather than fail a cut, so
    // the one failure is injected at the group cut the role calls.
    const cut = vi.spyOn(ChangeTracker, 'cut').mockRejectedValueOnce(new BlockrelayError('BR_IO', 'injected: the cut failed'));
    await clock.advance(POLL_MS);
    await vi.waitFor(() => expect(failures.length + cuts.length).toBeGreaterThan(0), { timeout: 10_000 });
    await clock.advance(0);
    // The cut failed; the log is still full, yet the polls of the next second start none.
    expect(cuts).toEqual([]);
    expect(failures).toEqual(['size']);
    expect(role.trackers.get('a')!.status().activeLogBytes).toBeGreaterThanOrEqual(MiB);
    await clock.advance(1000);
    expect(failures).toEqual(['size']);
    expect(cuts).toEqual([]);
    // The interval retries it; once a cut succeeds, size cuts resume.
    cut.mockRestore();
    await clock.advance(INTERVAL_MS - 1000);
    await vi.waitFor(() => expect(cuts.length).toBe(1), { timeout: 10_000 });
    await clock.advance(0);
    expect(role.cutsByTrigger()).toEqual({ interval: 1, size: 0 });
    await writeStream(a, 4 * MiB, MiB + 64 * 1024);
    await clock.advance(POLL_MS);
    await vi.waitFor(() => expect(cuts.length).toBe(2), { timeout: 10_000 });
    await clock.advance(0);
    expect(role.cutsByTrigger()).toEqual({ interval: 1, size: 1 });
  });

  it('refuses a cutBytes that is not a whole number from 1 MiB to 4 GiB before serving anything', async () => {
    const dir = tempDir();
    await (await RawTarget.open(path.join(dir, 'x.img'), { create: { sizeBytes: MiB } })).close();
    for (const cutBytes of [0, -MiB, MiB - 1, MiB + 0.5, SOURCE_ROLE_CUT_BYTES_MAX + 1, Number.NaN, Number.POSITIVE_INFINITY]) {
      const t = await RawTarget.open(path.join(dir, 'x.img'));
      await expect(SourceRole.start({ disks: [{ id: 'x', target: t }], logDir: path.join(dir, 'logs'), listenHost: '127.0.0.1', listenPort: 0, cutBytes })).rejects.toMatchObject({
        code: 'BR_USAGE',
        message: expect.stringContaining('cutBytes'),
      });
      await t.close();
    }
    expect(SOURCE_ROLE_CUT_BYTES_MIN).toBe(MiB);
    expect(SOURCE_ROLE_DEFAULTS.cutBytes).toBeGreaterThanOrEqual(SOURCE_ROLE_CUT_BYTES_MIN);
    expect(SOURCE_ROLE_DEFAULTS.cutBytes).toBeLessThanOrEqual(SOURCE_ROLE_CUT_BYTES_MAX);
  });

  describe.each([
    { name: 'native data path', nativeDataPath: true },
    { name: 'TypeScript data path', nativeDataPath: false },
  ])('on the $name', ({ nativeDataPath }) => {
    it('makes logs of about cutBytes each under a write stream many times that size', async () => {
      const dir = tempDir();
      const cuts: (readonly SealedLogInfo[])[] = [];
      const cutBytes = 2 * MiB;
      const role = await startRole(dir, { cutBytes, intervalMs: 600_000, nativeDataPath, onSealed: (logs) => cuts.push(logs) });
      const a = await connect(role, 'a');
      // About 20-30 MB/s, paced on this event loop so a delayed poll is met by a delayed writer.
      const streamBytes = 16 * MiB;
      for (let done = 0; done < streamBytes; done += 256 * 1024) {
        await writeStream(a, done, 256 * 1024);
        await new Promise((r) => setTimeout(r, 8));
      }
      expect(role.trackers.get('a')!.canAttachNative, 'whether the native writers are attached').toBe(!nativeDataPath);
      await vi.waitFor(() => expect(role.trackers.get('a')!.status().activeLogBytes).toBeLessThan(cutBytes), { timeout: 10_000 });
      const sizes = cuts.map((c) => c.find((l) => l.diskId === 'a')!.sizeBytes);
      // Every log cut by size: at least cutBytes, and not much more: what the
      // stream writes in one 25 ms poll period, plus the previous cut's seal
      // when it ran long (the poll waits for it) on a loaded machine.
      expect(sizes.length).toBeGreaterThanOrEqual(4);
      for (const s of sizes) {
        expect(s).toBeGreaterThanOrEqual(cutBytes);
        expect(s).toBeLessThan(3 * cutBytes);
      }
      expect([...sizes].sort((x, y) => x - y)[Math.floor(sizes.length / 2)]).toBeLessThan(1.5 * cutBytes);
      expect(role.cutsByTrigger()).toEqual({ interval: 0, size: sizes.length });
      for (const c of cuts) expect(new Set(c.map((l) => l.cutId)).size).toBe(1);
    });
  });
});
