import * as fs from 'node:fs';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/daemon/logger';
import { createMetrics } from '../../src/daemon/metrics';
import { failover, loadPoints } from '../../src/retention/failover';
import { resyncJournalFor } from '../../src/retention/resync-journal';
import { retentionHooksFromConfig } from '../../src/retention/retention-hooks';
import { openDisk } from '../../src/targets/disk-spec';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { useTempDirs } from '../helpers/tmp';
import { FAST_RETRY } from '../transport/transport-fixture';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, useRetentionDirs, type RetentionSetup } from './retention-fixture';

const MINUTE_MS = 60_000;

/** A master target with retention whose log lines are kept for the test to read. */
async function startLoggedMasterTarget(setup: RetentionSetup): Promise<{ mt: ApplyingHop; hooks: NonNullable<ReturnType<typeof retentionHooksFromConfig>>; lines: string[] }> {
  const lines: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(...chunk.toString('utf8').split('\n').filter((l) => l !== ''));
      done();
    },
  });
  const logger = createLogger({ level: 'warn', name: 'master-target', destination });
  const hooks = retentionHooksFromConfig(setup.config)!;
  const mt = masterTargetFromConfig(setup.config, hrlLogOps, { logger, metrics: createMetrics({ defaultMetrics: false }), retryPolicy: FAST_RETRY, hooks });
  await mt.start();
  return { mt, hooks, lines };
}

function findFiles(dir: string, suffix: string): string[] {
  return fs.readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter((n) => n.endsWith(suffix)).map((n) => path.join(dir, n));
}

describe('the journal of a resync session the master target died in', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
  });

  it('drops the history explicitly, in the hop\'s own log, when the session\'s pre-images cannot be read back', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const first = await startLoggedMasterTarget(setup);
    running.push(first.mt);
    const rand = prng(41);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const logDir = path.join(dir, 'src');
    for (const seq of [1, 2]) await sendAll(first.mt, [await makePatternLog(logDir, 'disk0', { seq, cutTimeMs: baseMs + seq * MINUTE_MS }, source, rand)]);
    await first.mt.drain();

    const target = await openDisk(setup.targetSpec('disk0'));
    const session = (await resyncJournalFor(first.hooks)!.openSession('disk0', target, 2, 'd'.repeat(32)))!;
    await session.preserve(target, 8192, 4096);
    await target.write(8192, Buffer.alloc(4096, 0xdd));
    await target.close();
    await (session as unknown as { writer: { close(): Promise<void> } }).writer.close();
    await first.mt.stop();
    running.splice(0);
    // What the dead hop left of its session journal is unreadable (its first block lost).
    const [sessionFile] = findFiles(retentionDir, '.session.hrl');
    expect(sessionFile).toBeDefined();
    const fd = fs.openSync(sessionFile!, 'r+');
    fs.writeSync(fd, Buffer.alloc(4096), 0, 4096, 4096);
    fs.closeSync(fd);

    const second = await startLoggedMasterTarget(setup);
    running.push(second.mt);
    source.fill(0xdd, 8192, 8192 + 4096);
    await sendAll(second.mt, [await makePatternLog(logDir, 'disk0', { seq: 3, cutTimeMs: baseMs + 3 * MINUTE_MS }, source, rand)]);
    await second.mt.drain();
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.map((p) => p.seq)).toEqual([3]);
    expect(second.lines.some((l) => l.includes('"code":"BR_RESYNC_HISTORY_DROPPED"')), second.lines.join('\n')).toBe(true);
    await expect(failover({ retentionDir, diskId: 'disk0', point: 'disk0-1', out: `raw:${path.join(dir, 'gone.img')}` })).rejects.toMatchObject({ code: 'BR_POINT_UNKNOWN' });
    const out = path.join(dir, 'point-3.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-3', out: `raw:${out}` });
    expect(fs.readFileSync(out).equals(source)).toBe(true);
  });

  it('says in the hop\'s log that it recovered an interrupted session\'s pre-images and kept the history', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const first = await startLoggedMasterTarget(setup);
    running.push(first.mt);
    const rand = prng(43);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const logDir = path.join(dir, 'src');
    await sendAll(first.mt, [await makePatternLog(logDir, 'disk0', { seq: 1, cutTimeMs: baseMs }, source, rand)]);
    await first.mt.drain();
    const point1 = Buffer.from(source);
    const target = await openDisk(setup.targetSpec('disk0'));
    const session = (await resyncJournalFor(first.hooks)!.openSession('disk0', target, 1, 'e'.repeat(32)))!;
    // Several writes, each journaled (durably) before it lands.
    for (const offset of [0, 65536, 131072]) {
      await session.preserve(target, offset, 8192);
      await target.write(offset, Buffer.alloc(8192, 0xcc));
    }
    await target.close();
    await (session as unknown as { writer: { close(): Promise<void> } }).writer.close();
    await first.mt.stop();
    running.splice(0);

    const second = await startLoggedMasterTarget(setup);
    running.push(second.mt);
    for (const offset of [0, 65536, 131072]) source.fill(0xcc, offset, offset + 8192);
    await sendAll(second.mt, [await makePatternLog(logDir, 'disk0', { seq: 2, cutTimeMs: baseMs + MINUTE_MS }, source, rand)]);
    await second.mt.drain();
    expect(second.lines.some((l) => l.includes('were recovered')), second.lines.join('\n')).toBe(true);
    expect(second.lines.some((l) => l.includes('BR_RESYNC_HISTORY_DROPPED'))).toBe(false);
    const out = path.join(dir, 'point-1.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-1', out: `raw:${out}` });
    expect(fs.readFileSync(out).equals(point1)).toBe(true);
  });
  it('keeps an earlier session\'s pre-images when a second session in the slot died while opening', async () => {
    const dir = tmp();
    const retentionDir = retentionTmp();
    const setup = retentionSetup(dir, retentionDir);
    const first = await startLoggedMasterTarget(setup);
    running.push(first.mt);
    const rand = prng(9);
    const baseMs = Date.now() - 60 * MINUTE_MS;
    const source = Buffer.alloc(DISK_BYTES);
    const logDir = path.join(dir, 'src');
    await sendAll(first.mt, [await makePatternLog(logDir, 'disk0', { seq: 1, cutTimeMs: baseMs + MINUTE_MS }, source, rand)]);
    await sendAll(first.mt, [await makePatternLog(logDir, 'disk0', { seq: 2, cutTimeMs: baseMs + 2 * MINUTE_MS }, source, rand)]);
    await first.mt.drain();
    const point2 = Buffer.from(source);
    // Session 1 in slot 3 overwrites 8 KiB and seals: its pre-images are 3.undo.hrl.
    const target = await openDisk(setup.targetSpec('disk0'));
    const s1 = (await resyncJournalFor(first.hooks)!.openSession('disk0', target, 2, 'a'.repeat(32)))!;
    await s1.preserve(target, 8192, 8192);
    await target.write(8192, Buffer.alloc(8192, 0xdd));
    await target.flush();
    await s1.finish(target);
    source.fill(0xdd, 8192, 16384);
    await target.close();
    await first.mt.stop();
    running.splice(0);
    // Session 2 in the same slot dies right after its marker says open, before
    // 3.undo.hrl was moved aside: the state a crash leaves there.
    const journalDir = path.join(retentionDir, 'disk0', 'journal');
    fs.writeFileSync(path.join(journalDir, `resync-${String(3).padStart(20, '0')}.json`), JSON.stringify({ version: 1, seq: 3, state: 'open', sessionId: 'b'.repeat(32) }));

    const second = await startLoggedMasterTarget(setup);
    running.push(second.mt);
    await sendAll(second.mt, [await makePatternLog(logDir, 'disk0', { seq: 3, cutTimeMs: baseMs + 3 * MINUTE_MS, region: { offset: 1 << 20, length: 1 << 20 } }, source, rand)]);
    await second.mt.drain();
    const out = path.join(dir, 'point-2.img');
    await failover({ retentionDir, diskId: 'disk0', point: 'disk0-2', out: `raw:${out}` });
    expect(fs.readFileSync(out).equals(point2)).toBe(true);
  });
});
