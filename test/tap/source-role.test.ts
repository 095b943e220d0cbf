import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { useTempDirs } from '../helpers/tmp';
import { NbdClient } from '../../src/tap/nbd-client';
import { SourceRole } from '../../src/tap/source-role';
import { SimulatedClock } from '../../src/platform/clock';
import type { SealedLogInfo } from '../../src/tracking/change-tracker';
import { RawTarget } from '../../src/targets/raw/raw-target';

const tempDir = useTempDirs();
const roles: SourceRole[] = [];
afterEach(async () => {
  for (const r of roles.splice(0)) await r.stop(1000).catch(() => undefined);
});

const MiB = 1024 * 1024;

async function startRole(dir: string, clock: SimulatedClock, onSealed?: (logs: readonly SealedLogInfo[]) => void): Promise<SourceRole> {
  const a = await RawTarget.open(path.join(dir, 'a.img'), { create: { sizeBytes: 4 * MiB } });
  const b = await RawTarget.open(path.join(dir, 'b.img'), { create: { sizeBytes: 2 * MiB } });
  const role = await SourceRole.start({
    disks: [{ id: 'a', target: a }, { id: 'b', target: b }],
    logDir: path.join(dir, 'logs'),
    listenHost: '127.0.0.1',
    listenPort: 0,
    intervalMs: 1000,
    clock,
    onSealed,
  });
  roles.push(role);
  return role;
}

async function writeVia(role: SourceRole, id: string, offset: number, fill: number): Promise<void> {
  const url = new URL(role.exportUris[id]!);
  const client = await NbdClient.connect({ host: url.hostname, port: Number(url.port), exportName: id });
  await client.write(offset, Buffer.alloc(4096, fill));
  await client.close();
}

describe('SourceRole', () => {
  it('cuts all disks together each interval, skips intervals without writes, and seals the active logs on stop', async () => {
    const dir = tempDir();
    const clock = new SimulatedClock();
    const cuts: (readonly SealedLogInfo[])[] = [];
    const role = await startRole(dir, clock, (logs) => cuts.push(logs));
    expect(Object.keys(role.exportUris)).toEqual(['a', 'b']);

    await clock.advance(1000);
    expect(cuts).toEqual([]);

    await writeVia(role, 'a', 0, 1);
    await clock.advance(1000);
    await role.cutNow();
    expect(cuts.length).toBe(1);
    // Disk b had no writes, yet it is sealed at the same cut: one common point.
    expect(cuts[0]!.map((l) => l.diskId).sort()).toEqual(['a', 'b']);
    expect(new Set(cuts[0]!.map((l) => l.cutId)).size).toBe(1);

    await clock.advance(1000);
    await role.cutNow();
    expect(cuts.length).toBe(1);

    await writeVia(role, 'b', 8192, 2);
    await role.stop(1000);
    const logs = fs.readdirSync(path.join(dir, 'logs'));
    expect(logs.filter((n) => n.endsWith('.hrl.open'))).toEqual([]);
    expect(logs.filter((n) => /^a-\d{12}\.hrl$/.test(n)).length).toBe(2);
    expect(logs.filter((n) => /^b-\d{12}\.hrl$/.test(n)).length).toBe(2);
  });

  it('refuses duplicate ids, bad ids and read-only disks before serving anything', async () => {
    const dir = tempDir();
    const t = await RawTarget.open(path.join(dir, 'x.img'), { create: { sizeBytes: MiB } });
    const ro = await RawTarget.open(path.join(dir, 'x.img'), { readOnly: true });
    const base = { logDir: path.join(dir, 'logs'), listenHost: '127.0.0.1', listenPort: 0 };
    await expect(SourceRole.start({ ...base, disks: [{ id: 'x', target: t }, { id: 'x', target: t }] })).rejects.toMatchObject({ code: 'BR_USAGE' });
    await expect(SourceRole.start({ ...base, disks: [{ id: 'no/slash', target: t }] })).rejects.toMatchObject({ code: 'BR_USAGE' });
    await expect(SourceRole.start({ ...base, disks: [{ id: 'x', target: ro }] })).rejects.toMatchObject({ code: 'BR_USAGE' });
    await expect(SourceRole.start({ ...base, disks: [] })).rejects.toMatchObject({ code: 'BR_USAGE' });
    await t.close();
    await ro.close();
  });
});
