import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { UndoJournal } from '../../src/retention/undo-journal';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { pageCacheDroppable, residentBytes } from '../helpers/page-cache';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';

const MIB = 1024 * 1024;
/** Past SparseSegmentFile's 32 MiB background-sync step, so both drop paths run. */
const TARGET_BYTES = 48 * MIB;

describe('undo journal and the page cache', () => {
  const tmp = useTempDirs();

  it('leaves a durable pre-image out of the page cache, and it still reads back exactly', async () => {
    if (!requireTool('fincore')) return;
    const dir = tmp();
    const content = crypto.randomBytes(TARGET_BYTES);
    const targetFile = path.join(dir, 'target.img');
    fs.writeFileSync(targetFile, content);
    const ranges = [
      { offset: 0, length: 40 * MIB },
      { offset: 41 * MIB + 4096, length: 3 * MIB },
      { offset: TARGET_BYTES - 65536, length: 65536 },
    ];
    const journal = new UndoJournal(path.join(dir, 'journal'));
    await journal.open();
    const target = await openDisk(`raw:${targetFile}`);
    let sizeBytes: number;
    try {
      ({ sizeBytes } = await journal.write(7, ranges, target));
    } finally {
      await target.close();
    }
    // What stays is what the check after the seal read back: header and metadata blocks.
    expect(sizeBytes).toBeGreaterThan(43 * MIB);
    // On tmpfs the pages cannot be dropped (see pageCacheDroppable).
    if (pageCacheDroppable(dir)) expect(residentBytes(journal.file(7))).toBeLessThan(MIB);

    // Read back from the device: applied to a zero image, the pre-image restores each range.
    const restoredFile = path.join(dir, 'restored.img');
    fs.writeFileSync(restoredFile, Buffer.alloc(TARGET_BYTES));
    const restored = await openDisk(`raw:${restoredFile}`);
    try {
      await applyHrlLogs(restored, [journal.file(7)], { checkChain: false });
    } finally {
      await restored.close();
    }
    const back = fs.readFileSync(restoredFile);
    for (const r of ranges) expect(back.subarray(r.offset, r.offset + r.length).equals(content.subarray(r.offset, r.offset + r.length))).toBe(true);
    expect(back.subarray(40 * MIB, 41 * MIB + 4096).equals(Buffer.alloc(MIB + 4096))).toBe(true);
  });
});
