import type { Clock, TimerHandle } from '../platform/clock';
import { BlockrelayError, isBlockrelayError } from '../retry/blockrelay-error';
import type { Extent } from '../targets/disk-target';
import { mergeExtents } from './extent-list';

/**
 * Office hours: when resyncs triggered automatically must not run, because
 * reading every block of a production disk competes with its users.
 */
export interface OfficeHours {
  /** Days that have office hours, 0 = Sunday … 6 = Saturday. */
  readonly days: readonly number[];
  /** Minutes after local midnight when office hours start and end (end excluded). */
  readonly startMinute: number;
  readonly endMinute: number;
  /** IANA time zone (e.g. `Europe/Berlin`); the host's local zone when omitted. */
  readonly timeZone?: string;
}

/** 08:00-18:00 local time, Monday to Friday. */
export const DEFAULT_OFFICE_HOURS: OfficeHours = { days: [1, 2, 3, 4, 5], startMinute: 8 * 60, endMinute: 18 * 60 };

const DAY_NAMES = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'];
const MINUTE_MS = 60_000;
/** Steps a boundary search may take: each step reaches a boundary or a midnight, so 8 days is plenty. */
const MAX_SEARCH_STEPS = 64;

function parseMinute(text: string, whole: string): number {
  const m = /^(\d{1,2}):(\d{2})$/.exec(text);
  if (m === null || Number(m[1]) > 24 || Number(m[2]) > 59 || (Number(m[1]) === 24 && Number(m[2]) !== 0)) {
    throw new BlockrelayError('BR_CONFIG_INVALID', `office hours '${whole}': '${text}' is not a time HH:MM`);
  }
  return Number(m[1]) * 60 + Number(m[2]);
}

/**
 * Parses `Mon-Fri 08:00-18:00` (days as a range or a comma list, e.g.
 * `Mon,Wed,Fri 07:30-17:00`), optionally followed by an IANA time zone.
 * `none` means there are no office hours: automatic resyncs run at any time.
 */
export function parseOfficeHours(text: string): OfficeHours {
  const whole = text.trim();
  if (whole.toLowerCase() === 'none') return { days: [], startMinute: 0, endMinute: 0 };
  const parts = whole.split(/\s+/);
  if (parts.length < 2 || parts.length > 3) throw new BlockrelayError('BR_CONFIG_INVALID', `office hours '${whole}' must look like 'Mon-Fri 08:00-18:00 [Time/Zone]'`);
  const dayIndex = (name: string): number => {
    const i = DAY_NAMES.indexOf(name.toLowerCase().slice(0, 3));
    if (i < 0 || name.length < 3) throw new BlockrelayError('BR_CONFIG_INVALID', `office hours '${whole}': '${name}' is not a day name`);
    return i;
  };
  const days = new Set<number>();
  for (const item of parts[0].split(',')) {
    const range = item.split('-');
    if (range.length === 1) days.add(dayIndex(range[0]));
    else if (range.length === 2) {
      const from = dayIndex(range[0]);
      const to = dayIndex(range[1]);
      for (let d = from; ; d = (d + 1) % 7) {
        days.add(d);
        if (d === to) break;
      }
    } else throw new BlockrelayError('BR_CONFIG_INVALID', `office hours '${whole}': bad day range '${item}'`);
  }
  const times = parts[1].split('-');
  if (times.length !== 2) throw new BlockrelayError('BR_CONFIG_INVALID', `office hours '${whole}': '${parts[1]}' is not HH:MM-HH:MM`);
  const startMinute = parseMinute(times[0], whole);
  const endMinute = parseMinute(times[1], whole);
  if (endMinute <= startMinute) throw new BlockrelayError('BR_CONFIG_INVALID', `office hours '${whole}': end ${times[1]} is not after start ${times[0]}`);
  if (days.size === 7 && startMinute === 0 && endMinute === 24 * 60) {
    throw new BlockrelayError('BR_CONFIG_INVALID', `office hours '${whole}' cover the whole week: automatic resyncs could never run (use 'none' for no office hours)`);
  }
  const hours: OfficeHours = { days: [...days].sort(), startMinute, endMinute, ...(parts[2] === undefined ? {} : { timeZone: parts[2] }) };
  localTime(0, hours); // refuses an unknown time zone now, not at the first check
  return hours;
}

const formatters = new Map<string, Intl.DateTimeFormat>();

/** Weekday and minute of the day at `ms` in the office hours' time zone. */
function localTime(ms: number, hours: OfficeHours): { day: number; minute: number } {
  const key = hours.timeZone ?? '';
  let f = formatters.get(key);
  if (f === undefined) {
    try {
      f = new Intl.DateTimeFormat('en-US', { timeZone: hours.timeZone, weekday: 'short', hour: 'numeric', minute: 'numeric', hourCycle: 'h23' });
    } catch (err) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `office hours: unknown time zone '${hours.timeZone}'`, { cause: err });
    }
    formatters.set(key, f);
  }
  let day = 0;
  let hour = 0;
  let minute = 0;
  for (const p of f.formatToParts(ms)) {
    if (p.type === 'weekday') day = DAY_NAMES.indexOf(p.value.toLowerCase());
    else if (p.type === 'hour') hour = Number(p.value);
    else if (p.type === 'minute') minute = Number(p.value);
  }
  return { day, minute: hour * 60 + minute };
}

export function isOfficeHours(ms: number, hours: OfficeHours): boolean {
  const t = localTime(ms, hours);
  return hours.days.includes(t.day) && t.minute >= hours.startMinute && t.minute < hours.endMinute;
}

/** The first moment at or after `ms` outside office hours (to the minute). */
export function nextOffHours(ms: number, hours: OfficeHours): number {
  let at = ms;
  for (let i = 0; i < MAX_SEARCH_STEPS; i++) {
    if (!isOfficeHours(at, hours)) return at;
    const t = localTime(at, hours);
    // Jump to the end of today's office hours, at a whole minute; a DST
    // shift on the way only means one more step.
    at = (Math.floor(at / MINUTE_MS) + Math.max(1, hours.endMinute - t.minute)) * MINUTE_MS;
  }
  throw new BlockrelayError('BR_CONFIG_INVALID', 'office hours leave no time outside them: automatic resyncs could never run');
}

/** The next moment after `ms` at which office hours begin, or undefined when there are none. */
export function nextOfficeStart(ms: number, hours: OfficeHours): number | undefined {
  if (hours.days.length === 0) return undefined;
  let at = nextOffHours(ms, hours);
  for (let i = 0; i < MAX_SEARCH_STEPS; i++) {
    const t = localTime(at, hours);
    if (hours.days.includes(t.day) && t.minute >= hours.startMinute && t.minute < hours.endMinute) return at;
    const step = hours.days.includes(t.day) && t.minute < hours.startMinute ? hours.startMinute - t.minute : 24 * 60 - t.minute;
    at = (Math.floor(at / MINUTE_MS) + Math.max(1, step)) * MINUTE_MS;
  }
  throw new Error('nextOfficeStart: no office hours found within the search bound');
}

/** Why a disk needs a resync. */
export type ResyncReason = 'overflow' | 'unclean-tracker' | 'operator';

/** One disk's pending resync: what to compare and whether it may wait for off hours. */
export interface ResyncRequest {
  readonly diskId: string;
  readonly reasons: readonly ResyncReason[];
  /** Extents to compare (the dirty map); undefined means the whole disk. */
  readonly extents: readonly Extent[] | undefined;
  /** An operator asked for it: it runs at once, office hours or not. */
  readonly immediate: boolean;
  readonly requestedAtMs: number;
  /** After a failed run: not tried again before this time. */
  readonly notBeforeMs?: number;
}

/** Runs one disk's resync (the daemon wires this to resyncDisks with the disk's state file). */
export type ResyncRunner = (request: ResyncRequest, signal: AbortSignal) => Promise<void>;

export interface ResyncSchedulerOptions {
  readonly clock: Clock;
  readonly run: ResyncRunner;
  readonly officeHours?: OfficeHours;
  /** Disk size, to merge extents of repeated overflow reports. */
  readonly diskSizeBytes?: (diskId: string) => number;
  /** Told about a failed run; the request stays pending and is tried in the next window. */
  readonly onError?: (diskId: string, err: unknown) => void;
  /** Most disks waiting at once: a bound, not a real-world limit. */
  readonly maxPending?: number;
}

const DEFAULT_MAX_PENDING = 4096;
/** Wait after a failed run before trying that disk again (the retry policy's first step is longer). */
export const RESYNC_RETRY_DELAY_MS = 60_000;
/** Merge granularity for extents reported across several overflows. */
const MERGE_GRANULARITY_BYTES = 4096;

/**
 * Decides when resyncs run. The daemon calls the hooks; the scheduler keeps
 * one pending request per disk and runs them one at a time:
 * - `onOverflow` (the logs overflowed, the dirty map is known) and
 *   `onUncleanTracker` (tracking was lost: compare everything) wait until
 *   office hours are over; if office hours begin while such a resync runs,
 *   it is stopped (its progress is saved) and resumes in the next window;
 * - `requestNow` (the operator command) runs at once and is never stopped
 *   by office hours.
 */
export class ResyncScheduler {
  private readonly pendingByDisk = new Map<string, ResyncRequest>();
  private readonly officeHours: OfficeHours;
  private timer: TimerHandle | undefined;
  private running: { request: ResyncRequest; controller: AbortController; done: Promise<void> } | undefined;
  private stopped = true;

  constructor(private readonly options: ResyncSchedulerOptions) {
    this.officeHours = options.officeHours ?? DEFAULT_OFFICE_HOURS;
  }

  /** Hook: the disk's delta logs overflowed; `extents` is its dirty map. */
  onOverflow(diskId: string, extents: readonly Extent[]): void {
    this.add(diskId, 'overflow', extents, false);
  }

  /** Hook: the tracker stopped uncleanly and lost what changed: compare the whole disk. */
  onUncleanTracker(diskId: string): void {
    this.add(diskId, 'unclean-tracker', undefined, false);
  }

  /** The operator command: resync now, whole disk unless extents are given. */
  requestNow(diskId: string, extents?: readonly Extent[]): void {
    this.add(diskId, 'operator', extents, true);
  }

  /** Requests waiting (or running), in the order they will run. */
  pending(): ResyncRequest[] {
    return [...this.pendingByDisk.values()];
  }

  /** The disk whose resync is running, if any. */
  runningDisk(): string | undefined {
    return this.running?.request.diskId;
  }

  start(): void {
    this.stopped = false;
    this.wake();
  }

  /** Stops scheduling and stops a running resync (its progress is saved). */
  async stop(): Promise<void> {
    this.stopped = true;
    this.timer?.cancel();
    this.timer = undefined;
    this.running?.controller.abort();
    await this.running?.done;
  }

  private add(diskId: string, reason: ResyncReason, extents: readonly Extent[] | undefined, immediate: boolean): void {
    const old = this.pendingByDisk.get(diskId);
    if (old === undefined && this.pendingByDisk.size >= (this.options.maxPending ?? DEFAULT_MAX_PENDING)) {
      throw new BlockrelayError('BR_INTERNAL', `more than ${this.options.maxPending ?? DEFAULT_MAX_PENDING} disks wait for a resync`);
    }
    let merged: readonly Extent[] | undefined;
    if (old !== undefined && (old.extents === undefined || extents === undefined)) merged = undefined; // the whole disk covers any extents
    else if (old !== undefined) merged = mergeExtents([...old.extents!, ...extents!], MERGE_GRANULARITY_BYTES, this.options.diskSizeBytes?.(diskId) ?? Number.MAX_SAFE_INTEGER);
    else merged = extents === undefined ? undefined : [...extents];
    this.pendingByDisk.set(diskId, {
      diskId,
      reasons: [...new Set([...(old?.reasons ?? []), reason])],
      extents: merged,
      immediate: immediate || (old?.immediate ?? false),
      requestedAtMs: old?.requestedAtMs ?? this.options.clock.now(),
    });
    this.wake();
  }

  /** Starts the next runnable request, or sets a timer for when one becomes runnable. */
  private wake(): void {
    if (this.stopped || this.running !== undefined) return;
    this.timer?.cancel();
    this.timer = undefined;
    const now = this.options.clock.now();
    const office = isOfficeHours(now, this.officeHours);
    const ready = [...this.pendingByDisk.values()].filter((r) => (r.notBeforeMs ?? 0) <= now);
    const next = ready.find((r) => r.immediate) ?? (office ? undefined : ready[0]);
    if (next !== undefined) {
      this.launch(next);
      return;
    }
    let wakeAtMs = Number.POSITIVE_INFINITY;
    for (const r of this.pendingByDisk.values()) {
      const earliest = Math.max(now, r.notBeforeMs ?? 0);
      wakeAtMs = Math.min(wakeAtMs, r.immediate ? earliest : nextOffHours(earliest, this.officeHours));
    }
    if (wakeAtMs !== Number.POSITIVE_INFINITY) this.timer = this.options.clock.setTimer(() => this.wake(), wakeAtMs - now);
  }

  private launch(request: ResyncRequest): void {
    const controller = new AbortController();
    let officeTimer: TimerHandle | undefined;
    if (!request.immediate) {
      const start = nextOfficeStart(this.options.clock.now(), this.officeHours);
      if (start !== undefined) officeTimer = this.options.clock.setTimer(() => controller.abort(), start - this.options.clock.now());
    }
    const done = this.options.run(request, controller.signal).then(
      () => {
        // Requests that arrived while it ran were merged into this entry; a
        // finished run settles only what it was asked for.
        if (this.pendingByDisk.get(request.diskId) === request) this.pendingByDisk.delete(request.diskId);
      },
      (err: unknown) => {
        const stoppedOnPurpose = isBlockrelayError(err) && err.code === 'BR_RESYNC_ABORTED';
        if (!stoppedOnPurpose) this.options.onError?.(request.diskId, err);
        // It stays pending (its progress is saved); after a failure it waits
        // a while and goes to the back, so other disks get their turn.
        const current = this.pendingByDisk.get(request.diskId);
        if (current !== undefined && !stoppedOnPurpose) {
          this.pendingByDisk.delete(request.diskId);
          this.pendingByDisk.set(request.diskId, { ...current, notBeforeMs: this.options.clock.now() + RESYNC_RETRY_DELAY_MS });
        }
      },
    ).finally(() => {
      officeTimer?.cancel();
      this.running = undefined;
      this.wakeLater();
    });
    this.running = { request, controller, done };
  }

  /** Re-evaluates once the current call stack unwinds (never synchronously from a timer). */
  private wakeLater(): void {
    if (this.stopped) return;
    this.timer?.cancel();
    this.timer = this.options.clock.setTimer(() => this.wake(), 0);
  }
}
