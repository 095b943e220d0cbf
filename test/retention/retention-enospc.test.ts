import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { failover, loadPoints } from '../../src/retention/failover';
import { systemVolumeProbe } from '../../src/retention/retention-volume';
import type { ApplyingHop } from '../../src/transport/master-target';
import { useTempDirs } from '../helpers/tmp';
import { DISK_BYTES, makePatternLog, prng, retentionSetup, sendAll, startMasterTarget } from './retention-fixture';

/** Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN, as in the dev container). */
function canMountTmpfs(): boolean {
  if (process.getuid?.() !== 0) return false;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-mount-probe-'));
  try {
    if (spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', dir]).status !== 0) return false;
    spawnSync('umount', [dir]);
    return true;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

describe.skipIf(!canMountTmpfs())('a retention volume that really fills (ENOSPC on a 2 MiB tmpfs)', () => {
  const tmp = useTempDirs();
  const mounts: string[] = [];
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const mt of running.splice(0)) await mt.stop();
    for (const m of mounts.splice(0)) {
      spawnSync('umount', [m]);
      fs.rmSync(m, { recursive: true, force: true });
    }
  });

  it('prunes oldest first when a pre-image write fails with ENOSPC, keeps applying, and never leaves a torn segment', async () => {
    const dir = tmp();
    const retentionDir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockrelay-small-volume-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', retentionDir]);
    mounts.push(retentionDir);
    const setup = retentionSetup(dir, retentionDir);
    const model = Buffer.alloc(DISK_BYTES);
    const rand = prng(99);
    const images = new Map<number, Buffer>();
    const logs = [];
    // Pre-images of never-written ranges are holes taking no space, so the
    // logs overwrite enough earlier data for real pre-images to fill 2 MiB.
    for (let seq = 1; seq <= 12; seq++) {
      logs.push(await makePatternLog(path.join(dir, 'src'), 'disk0', { seq, cutTimeMs: Date.now() - (60 - seq) * 60_000, writes: 100 }, model, rand));
      images.set(seq, Buffer.from(model));
    }
    // The probe overstates free space, so the hooks' own estimate never
    // prunes ahead and every shortage shows up as a real ENOSPC mid-write.
    const lying = { ...systemVolumeProbe, capacity: () => ({ totalBytes: 2 ** 40, availableBytes: 2 ** 40 }) };
    const { mt } = await startMasterTarget(setup, { probe: lying, reserveBytes: 0 });
    running.push(mt);
    await sendAll(mt, logs);
    await mt.drain();

    const status = mt.diskStatus()[0]!;
    expect(status.appliedSeq).toBe(12);
    expect(status.reasons.join('\n')).toContain('BR_RETENTION_VOLUME_FULL');
    expect(fs.readFileSync(setup.targetSpec('disk0').slice(4)).equals(model)).toBe(true);
    const journalDir = path.join(retentionDir, 'disk0', 'journal');
    expect(fs.readdirSync(journalDir).filter((n) => n.endsWith('.tmp'))).toEqual([]);
    const { points } = await loadPoints(retentionDir, 'disk0');
    expect(points.length).toBeGreaterThanOrEqual(2);
    expect(points.length).toBeLessThan(12);
    expect(points.at(-1)!.seq).toBe(12);
    for (const p of points) {
      const out = path.join(dir, `p${p.seq}.img`);
      await failover({ retentionDir, diskId: 'disk0', point: p.id, out: `raw:${out}` });
      expect(fs.readFileSync(out).equals(images.get(p.seq)!), p.id).toBe(true);
    }
  });
});
