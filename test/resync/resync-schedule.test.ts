import { describe, expect, it } from 'vitest';
import { SimulatedClock } from '../../src/platform/clock';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import {
  DEFAULT_OFFICE_HOURS,
  isOfficeHours,
  nextOfficeStart,
  nextOffHours,
  parseOfficeHours,
  RESYNC_RETRY_DELAY_MS,
  ResyncScheduler,
  type OfficeHours,
  type ResyncRequest,
} from '../../src/resync/resync-schedule';

const UTC_OFFICE: OfficeHours = { ...DEFAULT_OFFICE_HOURS, timeZone: 'UTC' };
const HOUR_MS = 3_600_000;
/** Monday 5 January 2026, at the given UTC hour and minute. */
const monday = (hour: number, minute = 0): number => Date.UTC(2026, 0, 5, hour, minute);

describe('office hours', () => {
  it('knows office hours from evenings and weekends', () => {
    expect(isOfficeHours(monday(10), UTC_OFFICE)).toBe(true);
    expect(isOfficeHours(monday(8), UTC_OFFICE)).toBe(true);
    expect(isOfficeHours(monday(7, 59), UTC_OFFICE)).toBe(false);
    expect(isOfficeHours(monday(18), UTC_OFFICE)).toBe(false);
    expect(isOfficeHours(monday(10) + 5 * 24 * HOUR_MS, UTC_OFFICE)).toBe(false); // Saturday
  });

  it('parses a window with day ranges, lists and a time zone', () => {
    expect(parseOfficeHours('Mon-Fri 08:00-18:00')).toEqual({ days: [1, 2, 3, 4, 5], startMinute: 480, endMinute: 1080 });
    expect(parseOfficeHours('Fri-Mon 07:30-17:00').days).toEqual([0, 1, 5, 6]);
    expect(parseOfficeHours('mon,wed 09:00-12:00 Europe/Berlin')).toEqual({ days: [1, 3], startMinute: 540, endMinute: 720, timeZone: 'Europe/Berlin' });
    expect(parseOfficeHours('none').days).toEqual([]);
  });

  it('refuses malformed windows naming the problem', () => {
    for (const bad of ['Mon-Fri', 'Mon-Fri 18:00-08:00', 'Moon 08:00-18:00', 'Mon-Fri 8-18', 'Mon-Fri 08:00-18:00 Not/AZone', 'Mon-Sun 00:00-24:00']) {
      expect(() => parseOfficeHours(bad), bad).toThrow(BlockrelayError);
    }
  });

  it('applies the time zone of the window', () => {
    const berlin = parseOfficeHours('Mon-Fri 08:00-18:00 Europe/Berlin');
    expect(isOfficeHours(monday(7, 30), berlin)).toBe(true); // 08:30 in Berlin (UTC+1 in winter)
    expect(isOfficeHours(monday(17, 30), berlin)).toBe(false); // 18:30 in Berlin
  });

  it('finds the end of office hours and the next start across a weekend', () => {
    expect(nextOffHours(monday(10), UTC_OFFICE)).toBe(monday(18));
    expect(nextOffHours(monday(20), UTC_OFFICE)).toBe(monday(20));
    const fridayEvening = monday(19) + 4 * 24 * HOUR_MS;
    expect(nextOfficeStart(fridayEvening, UTC_OFFICE)).toBe(monday(8) + 7 * 24 * HOUR_MS);
    expect(nextOfficeStart(monday(6), UTC_OFFICE)).toBe(monday(8));
    expect(nextOfficeStart(monday(6), { days: [], startMinute: 0, endMinute: 0 })).toBeUndefined();
  });
});

/** A runner that records requests and finishes when told, or stops with BR_RESYNC_ABORTED on abort. */
function controlledRunner() {
  const calls: Array<{ request: ResyncRequest; finish: (err?: unknown) => void; signal: AbortSignal }> = [];
  const run = (request: ResyncRequest, signal: AbortSignal): Promise<void> =>
    new Promise<void>((resolve, reject) => {
      const finish = (err?: unknown): void => (err === undefined ? resolve() : reject(err));
      signal.addEventListener('abort', () => reject(new BlockrelayError('BR_RESYNC_ABORTED', 'stopped')));
      calls.push({ request, finish, signal });
    });
  return { calls, run };
}

describe('ResyncScheduler', () => {
  it('holds an overflow resync until office hours end, then runs it with the dirty map', async () => {
    const clock = new SimulatedClock(monday(10));
    const runner = controlledRunner();
    const scheduler = new ResyncScheduler({ clock, run: runner.run, officeHours: UTC_OFFICE });
    scheduler.start();
    scheduler.onOverflow('disk0', [{ offset: 0, length: 4096 }]);
    await clock.advance(7 * HOUR_MS + 59 * 60_000);
    expect(runner.calls).toHaveLength(0);
    await clock.advance(60_000);
    expect(runner.calls).toHaveLength(1);
    expect(clock.now()).toBe(monday(18));
    expect(runner.calls[0].request).toMatchObject({ diskId: 'disk0', reasons: ['overflow'], extents: [{ offset: 0, length: 4096 }], immediate: false });
    runner.calls[0].finish();
    await clock.advance(1);
    expect(scheduler.pending()).toEqual([]);
    await scheduler.stop();
  });

  it('runs an operator request at once, even in office hours', async () => {
    const clock = new SimulatedClock(monday(10));
    const runner = controlledRunner();
    const scheduler = new ResyncScheduler({ clock, run: runner.run, officeHours: UTC_OFFICE });
    scheduler.start();
    scheduler.requestNow('disk1');
    await clock.advance(0);
    expect(runner.calls).toHaveLength(1);
    expect(runner.calls[0].request).toMatchObject({ diskId: 'disk1', extents: undefined, immediate: true });
    // Office hours never stop an operator's resync.
    await clock.advance(24 * HOUR_MS);
    expect(runner.calls[0].signal.aborted).toBe(false);
    await scheduler.stop();
  });

  it('stops a scheduled resync when office hours begin and resumes it in the evening', async () => {
    const clock = new SimulatedClock(monday(7));
    const runner = controlledRunner();
    const scheduler = new ResyncScheduler({ clock, run: runner.run, officeHours: UTC_OFFICE });
    scheduler.start();
    scheduler.onUncleanTracker('disk2');
    await clock.advance(0);
    expect(runner.calls).toHaveLength(1);
    await clock.advance(HOUR_MS);
    expect(runner.calls[0].signal.aborted).toBe(true);
    expect(scheduler.pending().map((r) => r.diskId)).toEqual(['disk2']);
    await clock.advance(9 * HOUR_MS);
    expect(runner.calls).toHaveLength(1);
    await clock.advance(HOUR_MS);
    expect(runner.calls).toHaveLength(2);
    expect(clock.now()).toBe(monday(18));
    runner.calls[1].finish();
    await clock.advance(1);
    expect(scheduler.pending()).toEqual([]);
    await scheduler.stop();
  });

  it('merges repeated triggers for a disk: a lost tracker widens a dirty map to the whole disk', async () => {
    const clock = new SimulatedClock(monday(10));
    const runner = controlledRunner();
    const scheduler = new ResyncScheduler({ clock, run: runner.run, officeHours: UTC_OFFICE, diskSizeBytes: () => 1 << 30 });
    scheduler.start();
    scheduler.onOverflow('d', [{ offset: 0, length: 4096 }]);
    scheduler.onOverflow('d', [{ offset: 4096, length: 100 }]);
    expect(scheduler.pending()[0].extents).toEqual([{ offset: 0, length: 8192 }]);
    scheduler.onUncleanTracker('d');
    expect(scheduler.pending()).toHaveLength(1);
    expect(scheduler.pending()[0]).toMatchObject({ extents: undefined, reasons: ['overflow', 'unclean-tracker'] });
    await scheduler.stop();
  });

  it('reports a failed run and retries it after a delay, not in a tight loop', async () => {
    const clock = new SimulatedClock(monday(20));
    const runner = controlledRunner();
    const errors: string[] = [];
    const scheduler = new ResyncScheduler({ clock, run: runner.run, officeHours: UTC_OFFICE, onError: (id) => errors.push(id) });
    scheduler.start();
    scheduler.onUncleanTracker('disk3');
    await clock.advance(0);
    runner.calls[0].finish(new BlockrelayError('BR_IO', 'disk went away'));
    await clock.advance(RESYNC_RETRY_DELAY_MS - 1000);
    expect(errors).toEqual(['disk3']);
    expect(runner.calls).toHaveLength(1);
    await clock.advance(1000);
    expect(runner.calls).toHaveLength(2);
    await scheduler.stop();
  });
});
