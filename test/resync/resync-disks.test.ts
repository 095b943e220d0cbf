import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { failbackAlternateLocation, failbackOriginalLocation, resyncDisks } from '../../src/resync/resync-disks';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { writeImagePair } from './image-pair';

const MiB = 1024 * 1024;
const tempDir = useTempDirs();

function identical(a: string, aFormat: string, b: string, bFormat: string): boolean {
  return spawnSync('qemu-img', ['compare', '-q', '-f', aFormat, '-F', bFormat, a, b]).status === 0;
}

describe.skipIf(!requireTool('qemu-img'))('failback helpers', () => {
  it('alternate location creates a new VMDK holding the disk; original location then sends only the changes', async () => {
    const dir = tempDir();
    const recovered = path.join(dir, 'recovered.img');
    const unused = path.join(dir, 'unused.img');
    const onPrem = path.join(dir, 'onprem.vmdk');
    writeImagePair(recovered, unused, 16 * MiB, 0, 41);

    const copy = await failbackAlternateLocation(`raw:${recovered}`, `vmdk:${onPrem}`);
    expect(copy.blocksSent).toBe(4096);
    expect(identical(recovered, 'raw', onPrem, 'vmdk')).toBe(true);
    // The alternate location refuses to overwrite what is already there.
    await expect(failbackAlternateLocation(`raw:${recovered}`, `vmdk:${onPrem}`)).rejects.toMatchObject({ code: expect.stringMatching(/^BR_TARGET_/) });

    // The recovered VM keeps running in Azure; failing back to the original disk moves only its new writes.
    const fd = fs.openSync(recovered, 'r+');
    fs.writeSync(fd, Buffer.alloc(3 * 4096, 0x77), 0, 3 * 4096, 8 * MiB);
    fs.closeSync(fd);
    const back = await failbackOriginalLocation(`raw:${recovered}`, `vmdk:${onPrem}`);
    expect(back.blocksSent).toBe(3);
    expect(back.bytesDiffering).toBe(3 * 4096);
    expect(identical(recovered, 'raw', onPrem, 'vmdk')).toBe(true);
  });

  it('hands out the job so writes during the resync can be noted, and reports them', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'a.img');
    const dst = path.join(dir, 'b.img');
    writeImagePair(src, dst, 4 * MiB, 3, 42);
    const result = await resyncDisks(`raw:${src}`, `raw:${dst}`, { onJob: (job) => job.noteWrite(MiB, 512) });
    expect(result.writesDuringResync).toEqual([{ offset: MiB, length: 4096 }]);
    expect(identical(src, 'raw', dst, 'raw')).toBe(true);
  });
});
