import type { Clock } from '../platform/clock';

/**
 * A token bucket limiting one link to `bytesPerSecond`, shared by every
 * stream on that link. The bucket holds at most one second of tokens (and at
 * least `minBurstBytes`), so an idle link cannot save up a burst that
 * overruns the limit later. Zero means unlimited.
 */
export class BandwidthLimiter {
  private tokens: number;
  private lastMs: number;
  private readonly burstBytes: number;
  private queue: Promise<void> = Promise.resolve();

  constructor(
    readonly bytesPerSecond: number,
    private readonly clock: Clock,
    minBurstBytes = 64 * 1024,
  ) {
    this.burstBytes = Math.max(bytesPerSecond, minBurstBytes);
    this.tokens = this.burstBytes;
    this.lastMs = clock.now();
  }

  get unlimited(): boolean {
    return this.bytesPerSecond <= 0;
  }

  /** Largest piece one `take` may ask for. */
  get chunkBytes(): number {
    return this.burstBytes;
  }

  /** Waits until `bytes` may be sent; callers are served in arrival order. */
  take(bytes: number): Promise<void> {
    if (this.unlimited) return Promise.resolve();
    const turn = this.queue.then(() => this.waitFor(Math.min(bytes, this.burstBytes)));
    this.queue = turn;
    return turn;
  }

  private async waitFor(bytes: number): Promise<void> {
    for (;;) {
      this.refill();
      if (this.tokens >= bytes) {
        this.tokens -= bytes;
        return;
      }
      const waitMs = Math.ceil(((bytes - this.tokens) / this.bytesPerSecond) * 1000);
      await new Promise<void>((resolve) => this.clock.setTimer(resolve, waitMs));
    }
  }

  private refill(): void {
    const now = this.clock.now();
    this.tokens = Math.min(this.burstBytes, this.tokens + ((now - this.lastMs) / 1000) * this.bytesPerSecond);
    this.lastMs = now;
  }
}
