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
  /**
   * Uploads that may be started ahead of the one being waited on (default
   * 1). More than one suits a receiver that answers late (a master target
   * applying on receipt answers after the apply): the next upload but one
   * streams in while the next one waits for that apply. The receiver takes
   * up to RECEIVER_MAX_IN_FLIGHT uploads per disk (log-receiver.ts).
   */
  readonly maxAhead?: number;
  /**
   * Items never started ahead: they go only once the item before them was
   * answered. A resync log is one: a receiver admits it past a gap (it may
   * follow folded logs), so one arriving before its predecessor would be
   * taken, and the predecessor then answered as a duplicate and dropped.
   */
  readonly goesAlone?: (item: T) => boolean;
  /**
   * Whether an upload started ahead for `ahead` carried `item` (default:
   * the same sequence number is enough). A queue may replace an item under
   * its number while it is ahead (a spool taking a log again after a lost
   * ledger, with new content): adopting that upload would count the
   * replacement as sent, and the drain would then delete it unsent.
   */
  readonly sameItem?: (ahead: T, item: T) => boolean;
}

interface Ahead<T> {
  readonly key: number;
  readonly item: T;
  /** Settles with the upload's outcome (never rejects unobserved: a handler is attached at once). */
  done: Promise<void>;
  bodySent: boolean;
}

/** An upload started ahead: being looked up (value undefined), or started. */
interface AheadSlot<T> {
  readonly lookup: Promise<Ahead<T> | undefined>;
  value: Ahead<T> | undefined;
}

export class UploadPipeline<T> {
  /** Uploads started ahead (or being looked up), in order: at most `maxAhead`. */
  private aheads: Array<AheadSlot<T>> = [];
  /** The item the drain waits on now, and whether its body is out (the next may go then). */
  private current: { readonly key: number; readonly item: T; bodySent: boolean } | undefined;
  private stopped = false;
  /**
   * Whether the receiver holds a log of this disk: set by an upload that
   * succeeded, cleared by one that failed. Nothing starts ahead until then.
   * A receiver that never accepted a log of the disk takes any sequence
   * number as its first (a source may start anywhere): an upload ahead
   * arriving before the first log (whose connection failed before the
   * receiver saw it) would be taken first, and the first log then judged
   * a duplicate and dropped. After a failure (the receiver may have been
   * replaced) the next log goes alone until it is answered.
   */
  private established = false;
  private readonly maxAhead: number;

  constructor(private readonly options: UploadPipelineOptions<T>) {
    this.maxAhead = Math.max(1, options.maxAhead ?? 1);
  }

  /** Resolves once `item` is durable at the next hop; throws what its (own, fresh) upload threw. */
  async send(item: T): Promise<void> {
    const key = this.options.key(item);
    const current = { key, item, bodySent: false };
    this.current = current;
    const bodyOut = (): void => {
      current.bodySent = true;
      this.startNext();
    };
    try {
      const slot = this.aheads.shift();
      const ahead = slot === undefined ? undefined : await slot.lookup;
      if (ahead !== undefined) {
        if (ahead.key === key && (this.options.sameItem?.(ahead.item, item) ?? true)) {
          // Its body may be out already: the next one may go now (else its
          // own callback starts it once the body is out, this being current).
          if (ahead.bodySent) bodyOut();
          const adopted = await ahead.done.then(() => true, () => false);
          this.established = adopted;
          if (adopted) return;
          current.bodySent = false;
        } else {
          // Not the item the drain reached (e.g. the queue changed, or
          // replaced it under its number): the uploads ahead are of no
          // use; let them settle first.
          const stale = [ahead, ...(await this.takeAheads())];
          for (const a of stale) await a.done.catch(() => undefined);
        }
      }
      try {
        await this.options.send(item, bodyOut);
        this.established = true;
      } catch (err) {
        this.established = false;
        throw err;
      }
    } finally {
      if (this.current === current) this.current = undefined;
    }
  }

  /**
   * An item may have been queued: when the body of the last upload under
   * way (the item in hand, or the last one ahead) is out and fewer than
   * `maxAhead` are ahead, its successor starts now rather than after the
   * answer. Call it whenever the queue grows (a log sealed at the source,
   * a log accepted into the spool): a log queued after the body before it
   * went out would otherwise wait for that log's whole verification (and,
   * to a master target applying on receipt, its apply).
   */
  kick(): void {
    this.startNext();
  }

  /** No new upload starts ahead; resolves once those ahead (if any) settled. */
  async stop(): Promise<void> {
    this.stopped = true;
    for (const a of await this.takeAheads()) await a.done.catch(() => undefined);
  }

  /** Empties the list of uploads ahead, once their lookups ended. */
  private async takeAheads(): Promise<Array<Ahead<T>>> {
    const slots = this.aheads.splice(0);
    const out: Array<Ahead<T>> = [];
    for (const slot of slots) {
      const a = await slot.lookup;
      if (a !== undefined) out.push(a);
    }
    return out;
  }

  /** Starts the upload after the last one under way, if its body is out and there is room ahead. */
  private startNext(): void {
    if (this.stopped || !this.established || this.aheads.length >= this.maxAhead) return;
    let after: T;
    const last = this.aheads[this.aheads.length - 1];
    if (last !== undefined) {
      // Still being looked up, or its body not out yet: its own callback comes back here.
      if (last.value === undefined || !last.value.bodySent) return;
      after = last.value.item;
    } else {
      const current = this.current;
      if (current === undefined || !current.bodySent) return;
      after = current.item;
    }
    const drop = (): undefined => {
      // Nothing queued yet: the slot is free again, for a kick() once something is.
      const i = this.aheads.indexOf(slot);
      if (i >= 0) this.aheads.splice(i, 1);
      return undefined;
    };
    const slot: AheadSlot<T> = {
      value: undefined,
      lookup: this.options.next(after).then(
        (next) => {
          if (next === undefined || this.stopped || this.options.goesAlone?.(next) === true) return drop();
          const ahead: Ahead<T> = { key: this.options.key(next), item: next, bodySent: false, done: Promise.resolve() };
          ahead.done = this.options.send(next, () => {
            ahead.bodySent = true;
            const current = this.current;
            // The drain adopted it: the item in hand's body is out.
            if (current !== undefined && current.key === ahead.key) current.bodySent = true;
            this.startNext();
          });
          ahead.done.catch(() => undefined);
          slot.value = ahead;
          return ahead;
        },
        () => drop(),
      ),
    };
    this.aheads.push(slot);
  }
}
