import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../../src/tap/byte-queue';
import { PayloadPool } from '../../src/tap/payload-pool';

describe('PayloadPool', () => {
  it('hands back released buffers of the same size, within its byte bound', () => {
    const pool = new PayloadPool(100_000, 70_000);
    const a = pool.alloc(65536);
    pool.release(a);
    expect(pool.bytes).toBe(65536);
    expect(pool.alloc(65536)).toBe(a);
    expect(pool.alloc(65536)).not.toBe(a);
    pool.release(a);
    pool.release(pool.alloc(65536));
    // A second 64 KiB buffer would pass the 100 000-byte bound; one above 70 000 bytes is never kept.
    expect(pool.bytes).toBe(65536);
    pool.release(Buffer.alloc(80_000));
    expect(pool.bytes).toBe(65536);
  });
});

describe('ByteQueue', () => {
  it('returns views for bytes inside one chunk and copies straddling bytes into the supplied buffer', () => {
    const q = new ByteQueue();
    q.push(Buffer.from('abcdef'));
    q.push(Buffer.from('ghij'));
    const view = q.take(3);
    expect(view.toString()).toBe('abc');
    expect(q.lastTakeCopied).toBe(false);
    const dest = Buffer.alloc(5);
    const got = q.take(5, () => dest);
    expect(got).toBe(dest);
    expect(got.toString()).toBe('defgh');
    expect(q.lastTakeCopied).toBe(true);
    expect(q.skip(10)).toBe(2);
    expect(q.length).toBe(0);
    expect(() => q.take(1)).toThrow();
  });

  it('keeps its chunk list bounded and the byte order intact over many small chunks', () => {
    const q = new ByteQueue();
    const sent: number[] = [];
    const got: number[] = [];
    for (let i = 0; i < 10_000; i++) {
      const chunk = Buffer.from([i & 0xff, (i * 7) & 0xff]);
      sent.push(...chunk);
      q.push(chunk);
      if (q.length >= 3) got.push(...q.take(3));
    }
    got.push(...q.take(q.length));
    expect(got).toEqual(sent);
    expect((q as unknown as { chunks: Buffer[] }).chunks.length).toBeLessThan(200);
  });
});
