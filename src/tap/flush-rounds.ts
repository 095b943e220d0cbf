/**
 * Runs a sync (an fdatasync of a disk) in rounds that concurrent callers
 * share: a call while no round runs starts one; a call while one runs waits
 * for the next, which every such call joins. So N FLUSHes that arrive
 * while one sync runs cost one more sync, not N, and no call is answered by
 * a round that started before it (that round may miss what the caller
 * wrote just before asking).
 */
export class FlushRounds {
  private running: Promise<void> | undefined;
  private queued: Promise<void> | undefined;
  private started = 0;

  constructor(private readonly sync: () => Promise<void>) {}

  /** Rounds started so far. */
  get rounds(): number {
    return this.started;
  }

  /** Resolves once a round that started after this call has completed. */
  flush(): Promise<void> {
    if (this.queued !== undefined) return this.queued;
    if (this.running === undefined) return this.start();
    const queued = this.running.then(
      () => undefined,
      () => undefined,
    ).then(() => {
      this.queued = undefined;
      return this.start();
    });
    this.queued = queued;
    return queued;
  }

  private start(): Promise<void> {
    this.started++;
    const round = Promise.resolve().then(() => this.sync());
    const running = round.finally(() => {
      if (this.running === running) this.running = undefined;
    });
    this.running = running;
    return running;
  }
}
