import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { writeImagePair } from './image-pair';

const MiB = 1024 * 1024;
const tempDir = useTempDirs();

describe.skipIf(!requireTool('qemu-img'))('resync byte accounting (acceptance)', () => {
  it('on a 512 MiB pair with 1% of 4 KiB blocks changed, sends at most 5% over the changed bytes plus the hashes', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'source.img');
    const dst = path.join(dir, 'target.img');
    const sizeBytes = 512 * MiB;
    const blocks = sizeBytes / 4096;
    const changed = writeImagePair(src, dst, sizeBytes, Math.round(blocks / 100), 512);
    const changedBytes = changed.length * 4096;

    const r = await runCli(['resync', `raw:${src}`, `raw:${dst}`, '--json'], { timeoutMs: 50_000 });
    expect(r.status, r.stderr).toBe(0);
    const result = JSON.parse(r.stdout) as Record<string, number>;
    expect(result.blocksCompared).toBe(blocks);
    expect(result.blocksSent).toBe(changed.length);
    expect(result.bytesDiffering).toBe(changedBytes);
    // Everything that crossed the seam, both ways, framing included.
    const crossed = result.bytesSent + result.bytesReceived;
    expect(crossed).toBeLessThanOrEqual(1.05 * changedBytes + result.hashBytes);
    // The coarse passes keep the hashes well below the 1 MiB a flat 4 KiB pass needs.
    expect(result.hashBytes).toBeLessThan(blocks * 8);

    const cmp = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, dst], { encoding: 'utf8' });
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
  });
});
