import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import type { ResyncResult } from '../../src/resync/resync-engine';
import { diskResyncRunner } from '../../src/resync/resync-runner';
import { ResyncScheduler, type OfficeHours } from '../../src/resync/resync-schedule';
import { useTempDirs } from '../helpers/tmp';
import { writeImagePair } from './image-pair';

const MiB = 1024 * 1024;
const tempDir = useTempDirs();
const UTC_OFFICE: OfficeHours = { days: [1, 2, 3, 4, 5], startMinute: 480, endMinute: 1080, timeZone: 'UTC' };

describe('diskResyncRunner with the scheduler', () => {
  it('resyncs a disk after office hours, comparing only the dirty map of an overflow', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'disk0.img');
    const dst = path.join(dir, 'disk0-target.img');
    const changed = writeImagePair(src, dst, 8 * MiB, 6, 51);
    const extents = changed.map((b) => ({ offset: b * 4096, length: 4096 }));
    const done: ResyncResult[] = [];
    const started: string[] = [];
    const clock = new SimulatedClock(Date.UTC(2026, 0, 5, 17, 0)); // Monday 17:00
    const scheduler = new ResyncScheduler({
      clock,
      officeHours: UTC_OFFICE,
      run: diskResyncRunner(
        (diskId) => ({ sourceSpec: `raw:${src}`, targetSpec: `raw:${dst}`, statePath: path.join(dir, `${diskId}.resync`) }),
        { onStart: (id) => started.push(id), onDone: (_id, r) => done.push(r) },
      ),
    });
    scheduler.start();
    scheduler.onOverflow('disk0', extents);
    await clock.advance(59 * 60_000);
    expect(scheduler.runningDisk()).toBeUndefined();
    await clock.advance(60_000);
    expect(scheduler.runningDisk()).toBe('disk0');
    // The resync itself does real I/O: wait for it in real time.
    for (let i = 0; i < 400 && done.length === 0; i++) await new Promise((r) => setTimeout(r, 25));
    expect(started).toEqual(['disk0']);
    await clock.advance(1);
    expect(done).toHaveLength(1);
    expect(done[0].blocksCompared).toBe(6);
    expect(done[0].blocksSent).toBe(6);
    expect(fs.readFileSync(dst).equals(fs.readFileSync(src))).toBe(true);
    expect(scheduler.pending()).toEqual([]);
    expect(fs.existsSync(path.join(dir, 'disk0.resync'))).toBe(false);
    await scheduler.stop();
  });
});
