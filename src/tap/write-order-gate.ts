/**
 * Keeps overlapping writes to one export in arrival order.
 *
 * The tap runs many requests at once and the disk completes them in any
 * order. For ranges that do not overlap that is harmless, but if two
 * in-flight writes overlap, the disk's final bytes would depend on which
 * finished last while the change log records them in another order, and
 * applying the log would not reproduce the disk. The gate holds a write
 * until every earlier write that overlaps it has left, so the disk, the log
 * and the arrival order agree. One gate is shared by every connection to an
 * export.
 *
 * The active list is bounded by the connections' in-flight limits, so a
 * linear scan stays short.
 */
export interface GateTicket {
  readonly offset: number;
  readonly end: number;
  /** True while an earlier overlapping write is still inside; `onUnblocked` fires when it turns false. */
  blocked: boolean;
  /** Callbacks of later overlapping writes waiting for this one; null until one waits. */
  waiters: (() => void)[] | null;
}

export class WriteOrderGate {
  private readonly active: GateTicket[] = [];

  /** Number of writes currently inside or waiting at the gate. */
  get size(): number {
    return this.active.length;
  }

  /**
   * Registers a write of `[offset, offset + length)`. When the returned
   * ticket is not `blocked` the caller starts the write at once; otherwise
   * `onUnblocked` is called once every earlier overlapping write has left.
   * The ticket must be passed to `leave` when the write and its record are done.
   */
  enter(offset: number, length: number, onUnblocked: () => void): GateTicket {
    const ticket: GateTicket = { offset, end: offset + length, blocked: false, waiters: null };
    let blockers = 0;
    let release: (() => void) | undefined;
    for (const other of this.active) {
      if (other.offset < ticket.end && offset < other.end) {
        blockers++;
        release ??= () => {
          blockers--;
          if (blockers === 0) {
            ticket.blocked = false;
            onUnblocked();
          }
        };
        (other.waiters ??= []).push(release);
      }
    }
    ticket.blocked = blockers > 0;
    this.active.push(ticket);
    return ticket;
  }

  /** Removes the ticket and lets the writes that waited for it proceed. */
  leave(ticket: GateTicket): void {
    const i = this.active.indexOf(ticket);
    if (i < 0) throw new Error('WriteOrderGate.leave: ticket is not active');
    this.active.splice(i, 1);
    const waiters = ticket.waiters;
    ticket.waiters = null;
    if (waiters !== null) for (const w of waiters) w();
  }
}
