/**
 * Syncs a file in the background each time `stepBytes()` more bytes were
 * written, one sync at a time, so the device writes while the work goes
 * on and the final sync finds little left. The first failure is kept and
 * thrown by the next `settle()`: the kernel reports a writeback error to
 * one sync per file and may drop the pages it could not write, so a later
 * sync's success would hide it.
 */
export class BackgroundSync {
  private running: Promise<void> | undefined;
  private failure: unknown;
  private sinceBytes = 0;

  constructor(
    private readonly sync: () => Promise<void>,
    private readonly stepBytes: () => number,
  ) {}

  /** Counts `bytes` written; starts a sync when a step's worth were written since the last one, unless one runs or `mayStart` is false. */
  wrote(bytes: number, mayStart = true): void {
    this.sinceBytes += bytes;
    if (!mayStart || this.sinceBytes < this.stepBytes() || this.running !== undefined) return;
    this.sinceBytes = 0;
    this.running = this.sync()
      .catch((err: unknown) => {
        this.failure ??= err;
      })
      .finally(() => {
        this.running = undefined;
      });
  }

  /** Before the caller's own sync: waits for a running one, throws the first failure since the last settle (once), and counts from zero again. */
  async settle(): Promise<void> {
    await this.running;
    const failed = this.failure;
    this.failure = undefined;
    if (failed !== undefined) throw failed;
    this.sinceBytes = 0;
  }

  /** Waits for a running sync, whatever its outcome (before the file closes). */
  async idle(): Promise<void> {
    await this.running;
  }
}
