/**
 * The bytes a socket delivered and the parser has not consumed yet, kept as
 * the chunks they arrived in. Taking bytes that lie inside one chunk returns
 * a view without copying; only messages that straddle chunks are copied.
 *
 * Chunks from `net.Socket` are fresh buffers the socket never reuses, so
 * views into them stay valid after they leave the queue.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  /** Index of the first chunk still holding unread bytes. */
  private head = 0;
  /** Bytes of `chunks[head]` already consumed. */
  private headOffset = 0;
  private availableBytes = 0;
  /** Whether the last `take` copied into a fresh buffer (true) or returned a view into a chunk (false). */
  lastTakeCopied = false;

  get length(): number {
    return this.availableBytes;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.availableBytes += chunk.length;
  }

  /**
   * Removes and returns the next `n` bytes; the caller checked `length >= n`.
   * Bytes that straddle chunks are copied into `alloc(n)` (default: a new
   * buffer), so a caller can supply pooled buffers; `lastTakeCopied` says
   * which happened.
   */
  take(n: number, alloc?: (n: number) => Buffer): Buffer {
    if (n > this.availableBytes) throw new Error(`ByteQueue.take(${n}) with ${this.availableBytes} available`);
    this.lastTakeCopied = false;
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[this.head]!;
    const inFirst = first.length - this.headOffset;
    if (n <= inFirst) {
      const view = first.subarray(this.headOffset, this.headOffset + n);
      this.advance(n);
      return view;
    }
    const out = alloc === undefined ? Buffer.allocUnsafe(n) : alloc(n);
    if (out.length !== n) throw new Error(`ByteQueue.take: alloc(${n}) returned ${out.length} bytes`);
    this.lastTakeCopied = true;
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[this.head]!;
      const from = this.headOffset;
      const count = Math.min(chunk.length - from, n - filled);
      chunk.copy(out, filled, from, from + count);
      filled += count;
      this.advance(count);
    }
    return out;
  }

  /** Drops up to `n` bytes without copying; returns how many were dropped. */
  skip(n: number): number {
    const count = Math.min(n, this.availableBytes);
    let left = count;
    while (left > 0) {
      const chunk = this.chunks[this.head]!;
      const step = Math.min(chunk.length - this.headOffset, left);
      this.advance(step);
      left -= step;
    }
    return count;
  }

  /** Drops everything. */
  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.headOffset = 0;
    this.availableBytes = 0;
  }

  private advance(n: number): void {
    this.headOffset += n;
    this.availableBytes -= n;
    const chunk = this.chunks[this.head]!;
    if (this.headOffset === chunk.length) {
      this.chunks[this.head] = undefined as unknown as Buffer;
      this.head++;
      this.headOffset = 0;
      // Compact now and then so the array does not grow without bound.
      if (this.head >= 64 && this.head * 2 >= this.chunks.length) {
        this.chunks = this.chunks.slice(this.head);
        this.head = 0;
      }
    }
  }
}
