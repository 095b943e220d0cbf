/**
 * Reusable buffers for WRITE payloads that arrive split across socket
 * chunks (every 64 KiB write does: Node reads at most 64 KiB at a time).
 *
 * Without it each such write allocates a fresh buffer that lives until the
 * disk write and the change-log record are done; under load those buffers
 * outlive young-generation collections and external memory churns, and the
 * tap spent up to a third of its time in the garbage collector. A payload is
 * returned here only when nothing refers to it any longer: the disk write
 * has finished and the recorder's promise has settled (recorders copy what
 * they keep; see WriteRecorder).
 *
 * Bounded: buffers above `maxBufferBytes` are never pooled, and at most
 * `maxPooledBytes` wait in the pool.
 */
export class PayloadPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  constructor(
    private readonly maxPooledBytes = 32 * 1024 * 1024,
    private readonly maxBufferBytes = 1024 * 1024,
  ) {}

  /** Bytes waiting in the pool. */
  get bytes(): number {
    return this.pooledBytes;
  }

  /** A buffer of exactly `n` bytes, reused when one is free. Its contents are stale. */
  readonly alloc = (n: number): Buffer => {
    const list = this.free.get(n);
    const reused = list?.pop();
    if (reused !== undefined) {
      this.pooledBytes -= n;
      return reused;
    }
    return Buffer.allocUnsafeSlow(n);
  };

  /** Returns a buffer from `alloc` that nothing refers to any more. */
  release(buf: Buffer): void {
    const n = buf.length;
    if (n > this.maxBufferBytes || this.pooledBytes + n > this.maxPooledBytes) return;
    let list = this.free.get(n);
    if (list === undefined) {
      list = [];
      this.free.set(n, list);
    }
    list.push(buf);
    this.pooledBytes += n;
  }
}
