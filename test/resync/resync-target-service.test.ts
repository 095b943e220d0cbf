import { describe, expect, it } from 'vitest';
import { BlockHasher } from '../../src/resync/block-hasher';
import { ResyncTargetService } from '../../src/resync/resync-peer';
import { encodeFlushRequest, encodeWriteRequest, MSG_WRITE_REPLY, MSG_FLUSH_REPLY, expectReply, type WriteRun } from '../../src/resync/resync-wire';
import { MemoryDisk } from './memory-disk';

const KiB = 1024;

/**
 * A disk whose writes take the time the test says, so they finish out of
 * order, recording how many ran at once and in which order they landed.
 */
class SlowDisk extends MemoryDisk {
  running = 0;
  maxRunning = 0;
  landed: number[] = [];
  flushedAfter = -1;
  flushes = 0;
  failFlushes = false;

  constructor(private readonly delayMsOf: (data: Buffer) => number) {
    super('mem:slow', 16 * 1024 * KiB);
  }

  override async write(offset: number, data: Buffer): Promise<void> {
    this.running++;
    this.maxRunning = Math.max(this.maxRunning, this.running);
    try {
      await new Promise((resolve) => setTimeout(resolve, this.delayMsOf(data)));
      await super.write(offset, data);
      this.landed.push(data[0]);
    } finally {
      this.running--;
    }
  }

  override async flush(): Promise<void> {
    this.flushes++;
    const fail = this.failFlushes;
    await new Promise((resolve) => setTimeout(resolve, 10));
    if (fail) throw new Error('SlowDisk: injected flush failure');
    this.flushedAfter = this.landed.length;
  }
}

function run(offset: number, value: number, length = 4 * KiB): WriteRun {
  return { offset, data: Buffer.alloc(length, value) };
}

describe('ResyncTargetService writes', () => {
  it('writes the runs of a request at once, yet an overlapping run lands after the one it overlaps', async () => {
    // Value 1 is slow, the others fast: in parallel, 3 would land before 1 without the overlap rule.
    const disk = new SlowDisk((d) => (d[0] === 1 ? 40 : 1));
    const service = new ResyncTargetService(disk, await BlockHasher.create());
    const reply = await service.handle(encodeWriteRequest([run(0, 1, 8 * KiB), run(16 * KiB, 2), run(24 * KiB, 4), run(4 * KiB, 3)]));
    expect(expectReply(reply, MSG_WRITE_REPLY)).toBe(4);
    expect(disk.maxRunning).toBeGreaterThanOrEqual(3);
    expect(disk.data[0]).toBe(1);
    expect(disk.data[4 * KiB]).toBe(3);
    expect(disk.data[16 * KiB]).toBe(2);
    expect(disk.landed.indexOf(3)).toBeGreaterThan(disk.landed.indexOf(1));
  });

  it('orders overlapping writes of two requests by arrival, and a flush covers writes still running', async () => {
    const disk = new SlowDisk((d) => (d[0] === 5 ? 40 : 1));
    const service = new ResyncTargetService(disk, await BlockHasher.create());
    const first = service.handle(encodeWriteRequest([run(0, 5)]));
    const second = service.handle(encodeWriteRequest([run(0, 6)]));
    const flush = service.handle(encodeFlushRequest());
    expect(expectReply(await flush, MSG_FLUSH_REPLY)).toBe(0);
    expect(disk.flushedAfter).toBe(2);
    await Promise.all([first, second]);
    expect(disk.landed).toEqual([5, 6]);
    expect(disk.data[0]).toBe(6);
  });

  it('answers a request whose write failed with a coded error, after its other runs settled', async () => {
    const disk = new SlowDisk(() => 5);
    disk.failWritesAfter = 1;
    const service = new ResyncTargetService(disk, await BlockHasher.create());
    const reply = await service.handle(encodeWriteRequest([run(0, 1), run(8 * KiB, 2)]));
    expect(() => expectReply(reply, MSG_WRITE_REPLY)).toThrow(/injected write failure/);
    expect(disk.running).toBe(0);
    // The service is still usable.
    expect(expectReply(await service.handle(encodeFlushRequest()), MSG_FLUSH_REPLY)).toBe(0);
  });

  it('starts flushing in the background as writes add up, and a requested flush still flushes after it', async () => {
    const disk = new SlowDisk(() => 0);
    const service = new ResyncTargetService(disk, await BlockHasher.create());
    const runs = Array.from({ length: 5 }, (_, i) => run(i * 1024 * KiB, i + 1, 1024 * KiB));
    expect(expectReply(await service.handle(encodeWriteRequest(runs)), MSG_WRITE_REPLY)).toBe(5);
    // 5 MiB written: one background flush is under way without being asked for.
    expect(disk.flushes).toBe(1);
    expect(expectReply(await service.handle(encodeFlushRequest()), MSG_FLUSH_REPLY)).toBe(0);
    expect(disk.flushedAfter).toBe(5);
  });

  it('keeps a failed background flush: the requested flush and every later one fail, though the disk would sync cleanly again', async () => {
    const disk = new SlowDisk(() => 0);
    const service = new ResyncTargetService(disk, await BlockHasher.create());
    // The background flush these 4 MiB start fails once; after it the disk syncs
    // cleanly, as Linux's fdatasync does after reporting a writeback error once.
    disk.failFlushes = true;
    expect(expectReply(await service.handle(encodeWriteRequest([run(0, 9, 4 * 1024 * KiB)])), MSG_WRITE_REPLY)).toBe(1);
    expect(disk.flushes).toBe(1);
    disk.failFlushes = false;
    for (let i = 0; i < 2; i++) {
      const reply = await service.handle(encodeFlushRequest());
      expect(() => expectReply(reply, MSG_FLUSH_REPLY)).toThrow(/injected flush failure/);
    }
    // Nothing after the failure was taken as durable.
    expect(disk.flushedAfter).toBe(-1);
  });

  it('starts no background flush while a requested one runs', async () => {
    const disk = new SlowDisk(() => 0);
    const service = new ResyncTargetService(disk, await BlockHasher.create());
    const flushing = service.handle(encodeFlushRequest());
    // 4 MiB arrive while the requested flush runs: a background flush beside
    // it could take the kernel's one report of a failed write.
    expect(expectReply(await service.handle(encodeWriteRequest([run(0, 9, 4 * 1024 * KiB)])), MSG_WRITE_REPLY)).toBe(1);
    expect(expectReply(await flushing, MSG_FLUSH_REPLY)).toBe(0);
    expect(disk.flushes).toBe(1);
  });
});
