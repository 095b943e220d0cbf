/**
 * Keeps a disk's next log on its way while the log before it waits for its
 * durable answer: once the body of log N is handed to the socket (the
 * receiver is fsyncing and verifying it), the upload of log N+1 starts, so
 * the sender's read and the wire overlap the receiver's commit. The
 * receiver makes logs visible strictly in order (src/transport/log-receiver.ts).
 *
 * It sits inside a DiskDrain's `handle` and changes nothing of its contract:
 * `send(N)` still resolves only once N is durable at the next hop, and the
 * drain completes (deletes) N only then. An upload started ahead is only an
 * attempt: when the drain reaches N+1 it adopts that attempt's outcome if
 * it succeeded, and otherwise sends N+1 again under the drain's retry
 * policy. A receiver that got N+1 twice answers the second one as a
 * duplicate, so nothing is stored or applied twice. At most one upload is
 * ahead of the one being waited on.
 */
export interface UploadPipelineOptions<T> {
  /** The item's sequence number. */
  readonly key: (item: T) => number;
  /** Uploads one item; `onBodySent` is called once its body is out (see SendOptions.onBodySent). */
  readonly send: (item: T, onBodySent: () => void) => Promise<void>;
  /** The item queued right after `item` now, if any (and not held back). */
  readonly next: (item: T) => Promise<T | undefined>;
}

interface Ahead {
  readonly key: number;
  /** Settles with the upload's outcome (never rejects unobserved: a handler is attached at once). */
  done: Promise<void>;
  bodySent: boolean;
}

export class UploadPipeline<T> {
  /** The upload started ahead (or being looked up): at most one. */
  private ahead: Promise<Ahead | undefined> | undefined;
  /** The item the drain waits on now, and whether its body is out (the next may go then). */
  private current: { readonly key: number; readonly item: T; bodySent: boolean } | undefined;
  private stopped = false;

  constructor(private readonly options: UploadPipelineOptions<T>) {}

  /** Resolves once `item` is durable at the next hop; throws what its (own, fresh) upload threw. */
  async send(item: T): Promise<void> {
    const key = this.options.key(item);
    const current = { key, item, bodySent: false };
    this.current = current;
    const bodyOut = (): void => {
      current.bodySent = true;
      this.startAfter(item);
    };
    try {
      const pending = this.ahead;
      this.ahead = undefined;
      const ahead = pending === undefined ? undefined : await pending;
      if (ahead !== undefined) {
        if (ahead.key === key) {
          // Its body may be out already: the next one may go now (else its
          // own callback starts it once the body is out, this being current).
          if (ahead.bodySent) bodyOut();
          const adopted = await ahead.done.then(() => true, () => false);
          if (adopted) return;
          current.bodySent = false;
        } else {
          // Not the item the drain reached (e.g. the queue changed): let it settle first.
          await ahead.done.catch(() => undefined);
        }
      }
      await this.options.send(item, bodyOut);
    } finally {
      if (this.current === current) this.current = undefined;
    }
  }

  /**
   * An item may have been queued: when the body of the item in hand is out
   * and nothing is ahead, its successor starts now rather than after the
   * answer. Call it whenever the queue grows (a log sealed at the source,
   * a log accepted into the spool): a log queued after the body before it
   * went out would otherwise wait for that log's whole verification (and,
   * to a master target applying on receipt, its apply).
   */
  kick(): void {
    const current = this.current;
    if (current !== undefined && current.bodySent) this.startAfter(current.item);
  }

  /** No new upload starts ahead; resolves once the one ahead (if any) settled. */
  async stop(): Promise<void> {
    this.stopped = true;
    const ahead = await this.ahead;
    await ahead?.done.catch(() => undefined);
  }

  /** Starts the upload of the item after `item`, unless one is ahead already. */
  private startAfter(item: T): void {
    if (this.stopped || this.ahead !== undefined) return;
    const lookup: Promise<Ahead | undefined> = this.options.next(item).then(
      (next) => {
        if (next === undefined || this.stopped) {
          // Nothing queued yet: the slot is free again, for a kick() once something is.
          if (this.ahead === lookup) this.ahead = undefined;
          return undefined;
        }
        const ahead: Ahead = { key: this.options.key(next), bodySent: false, done: Promise.resolve() };
        ahead.done = this.options.send(next, () => {
          ahead.bodySent = true;
          // Chain on only once the drain adopted this one (the slot is free then).
          const current = this.current;
          if (current !== undefined && current.key === ahead.key) {
            current.bodySent = true;
            this.startAfter(next);
          }
        });
        ahead.done.catch(() => undefined);
        return ahead;
      },
      () => {
        if (this.ahead === lookup) this.ahead = undefined;
        return undefined;
      },
    );
    this.ahead = lookup;
  }
}
