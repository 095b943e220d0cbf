import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { useTempDirs } from '../helpers/tmp';

const DISK = 4 * 1024 * 1024;

describe('ChangeTracker.open after a stop inside acknowledge', () => {
  const tmp = useTempDirs();

  it('deletes the sidecar of an acknowledged log left by a kill between the two unlinks, and keeps every other sidecar', async () => {
    const dir = tmp();
    const open = (): Promise<ChangeTracker> => ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0 });
    const t = await open();
    await t.recordWrite(0, Buffer.alloc(4096, 1));
    const first = (await t.rotate())!;
    await t.recordWrite(8192, Buffer.alloc(4096, 2));
    const second = (await t.rotate())!;
    const sidecar = fs.readFileSync(first.sidecarPath);
    expect(await t.acknowledge(first.name)).toBe(true);
    await t.close({ seal: false });
    // The state names the log shipped and the log is gone: acknowledge was
    // killed after unlinking the log, before its sidecar.
    fs.writeFileSync(first.sidecarPath, sidecar);
    // A sidecar whose log is gone but was never acknowledged is damage for
    // someone to look at, not a leftover: it stays.
    const strayPath = path.join(dir, path.basename(second.sidecarPath).replace(/\d{12}/, (s) => String(Number(s) + 50).padStart(12, '0')));
    fs.copyFileSync(second.sidecarPath, strayPath);

    const again = await open();
    try {
      expect(fs.existsSync(first.sidecarPath), 'the acknowledged log\'s sidecar').toBe(false);
      expect(fs.existsSync(second.sidecarPath), 'a listed log\'s sidecar').toBe(true);
      expect(fs.existsSync(strayPath), 'an unacknowledged sequence\'s sidecar').toBe(true);
      // The open log left by the stop is recovered after it.
      expect(again.sealedLogs().map((l) => l.name)[0]).toBe(second.name);
    } finally {
      await again.close({ seal: false });
    }
  });
});
