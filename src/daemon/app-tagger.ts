import type { Clock, TimerHandle } from '../platform/clock';
import { BlockrelayError } from '../retry/blockrelay-error';
import { withQuiesce, type QuiesceHook } from './quiesce-hook';

/** What a tag request selects: one disk, a replication group, or (neither) every disk. */
export interface TagRequest {
  readonly diskId?: string | undefined;
  readonly group?: string | undefined;
  readonly name?: string | undefined;
}

export interface TagResult {
  readonly name: string;
  readonly cutId: string;
  readonly cutTimeMs: number;
  readonly disks: readonly string[];
}

export interface AppTaggerOptions {
  readonly clock: Clock;
  readonly hook: QuiesceHook | undefined;
  /** App-consistent points are taken this often automatically (60 minutes by default; 0 turns it off). */
  readonly intervalMs: number;
  /** Resolves the disks a request selects; throws BR_DISK_UNKNOWN for unknown ones. */
  readonly select: (request: TagRequest) => string[];
  /** Cuts the selected disks at one point, carrying the app tag. */
  readonly cut: (disks: string[], appTag: string) => Promise<{ cutId: string; cutTimeMs: number }>;
  readonly onError?: (err: BlockrelayError) => void;
}

export const APP_TAG_NAME_MAX_BYTES = 200;

/**
 * Takes app-consistent points: on demand (`blockrelay tag`) and on a
 * schedule. One tag at a time: a quiesced application must be resumed before
 * the next freeze starts.
 */
export class AppTagger {
  private timer: TimerHandle | undefined;
  private running: Promise<unknown> = Promise.resolve();
  /**
   * Whether the schedule runs. A scheduled tag still in flight when stop()
   * is called must not arm the next one as it settles: the timer would keep
   * a stopped source alive and freeze the application on a closed role.
   */
  private scheduled = false;

  constructor(private readonly options: AppTaggerOptions) {}

  start(): void {
    if (this.options.intervalMs <= 0 || this.scheduled) return;
    this.scheduled = true;
    const schedule = (): void => {
      if (!this.scheduled) return;
      this.timer = this.options.clock.setTimer(() => {
        this.timer = undefined;
        this.tag({ name: 'scheduled' }).catch((err: unknown) => this.options.onError?.(err as BlockrelayError)).finally(schedule);
      }, this.options.intervalMs);
    };
    schedule();
  }

  stop(): void {
    this.scheduled = false;
    this.timer?.cancel();
    this.timer = undefined;
  }

  tag(request: TagRequest): Promise<TagResult> {
    const name = request.name ?? '';
    if (Buffer.byteLength(name) > APP_TAG_NAME_MAX_BYTES) {
      return Promise.reject(new BlockrelayError('BR_USAGE', `tag name is longer than ${APP_TAG_NAME_MAX_BYTES} bytes`));
    }
    const next = this.running.catch(() => undefined).then(async () => {
      const disks = this.options.select(request);
      const point = await withQuiesce(this.options.hook, { BLOCKRELAY_DISKS: disks.join(','), BLOCKRELAY_TAG: name }, () => this.options.cut(disks, name));
      return { name, cutId: point.cutId, cutTimeMs: point.cutTimeMs, disks };
    });
    this.running = next;
    return next;
  }
}
