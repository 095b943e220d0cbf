import * as fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { useTempDirs } from '../helpers/tmp';
import { ListRecorder, RawPeer, rawHandshake, readOptionReply, readSimpleReply, request, startTap, type TapFixture } from './nbd-fixtures';
import { NbdClient } from '../../src/tap/nbd-client';
import type { NbdWriteSource } from '../../src/tap/nbd-export';
import * as P from '../../src/tap/nbd-protocol';
import { NbdServer } from '../../src/tap/nbd-server';
import { SimulatedClock } from '../../src/platform/clock';

const tempDir = useTempDirs();
const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const MiB = 1024 * 1024;

async function tap(options: Parameters<typeof startTap>[1] = {}): Promise<TapFixture> {
  const f = await startTap(tempDir(), options);
  cleanups.push(() => f.close());
  return f;
}

async function peer(port: number): Promise<RawPeer> {
  const p = await RawPeer.connect(port);
  cleanups.push(() => p.destroy());
  return p;
}

function clientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0);
  return b;
}

/** A second, well-behaved connection still works: the bad one affected nobody else. */
async function expectServerHealthy(f: TapFixture): Promise<void> {
  const client = await NbdClient.connect({ host: '127.0.0.1', port: f.port, exportName: 'disk0' });
  await client.write(0, Buffer.alloc(512, 0x99));
  expect((await client.read(0, 512)).every((b) => b === 0x99)).toBe(true);
  await client.close();
}

describe('NBD server handshake with bad input', () => {
  it('drops a client that sets client flags it was not offered', async () => {
    const f = await tap();
    const p = await peer(f.port);
    await p.read(P.GREETING_BYTES);
    p.send(clientFlags(0x80000001));
    expect(await p.waitClosed()).toBe(true);
    await expectServerHealthy(f);
  });

  it('drops a client whose option lacks the IHAVEOPT magic, and keeps serving others', async () => {
    const f = await tap();
    const p = await peer(f.port);
    await p.read(P.GREETING_BYTES);
    p.send(clientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));
    p.send(Buffer.from('IHAVEOPX\0\0\0\x07\0\0\0\0', 'latin1'));
    expect(await p.waitClosed()).toBe(true);
    await expectServerHealthy(f);
  });

  it('answers unknown and unsupported options with NBD_REP_ERR_UNSUP and carries on', async () => {
    const f = await tap();
    const p = await peer(f.port);
    await p.read(P.GREETING_BYTES);
    p.send(clientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
    for (const option of [99, P.NBD_OPT_STRUCTURED_REPLY, P.NBD_OPT_STARTTLS, P.NBD_OPT_SET_META_CONTEXT]) {
      p.send(P.encodeOption(option, Buffer.from('some data')));
      const r = await readOptionReply(p);
      expect(r.option).toBe(option);
      expect(r.type).toBe(P.NBD_REP_ERR_UNSUP);
    }
    p.send(P.encodeOption(P.NBD_OPT_LIST, Buffer.from('x')));
    expect((await readOptionReply(p)).type).toBe(P.NBD_REP_ERR_INVALID);
    p.send(P.encodeOption(P.NBD_OPT_GO, Buffer.from([0, 0, 0, 200, 1])));
    expect((await readOptionReply(p)).type).toBe(P.NBD_REP_ERR_INVALID);
    p.send(P.encodeOption(P.NBD_OPT_GO, P.encodeGoRequest('nope', [])));
    const unknown = await readOptionReply(p);
    expect(unknown.type).toBe(P.NBD_REP_ERR_UNKNOWN);
    expect(unknown.data.toString()).toContain('nope');
    // NBD_OPT_INFO answers and stays in the handshake; NBD_OPT_GO then enters transmission.
    p.send(P.encodeOption(P.NBD_OPT_INFO, P.encodeGoRequest('disk0', [P.NBD_INFO_NAME, P.NBD_INFO_BLOCK_SIZE])));
    const infos: number[] = [];
    for (;;) {
      const r = await readOptionReply(p);
      if (r.type === P.NBD_REP_ACK) break;
      expect(r.type).toBe(P.NBD_REP_INFO);
      infos.push(r.data.readUInt16BE(0));
    }
    expect(infos.sort()).toEqual([P.NBD_INFO_EXPORT, P.NBD_INFO_NAME, P.NBD_INFO_BLOCK_SIZE].sort());
    p.send(P.encodeOption(P.NBD_OPT_GO, P.encodeGoRequest('disk0', [])));
    for (let r = await readOptionReply(p); r.type !== P.NBD_REP_ACK; r = await readOptionReply(p)) expect(r.type).toBe(P.NBD_REP_INFO);
    p.send(request(P.NBD_CMD_READ, 0, 4096, 7));
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 7 });
    expect((await p.read(4096)).length).toBe(4096);
  });

  it('pads the NBD_OPT_EXPORT_NAME reply with 124 zeroes only when NO_ZEROES was not agreed', async () => {
    const f = await tap({ sizeBytes: 2 * MiB });
    for (const noZeroes of [false, true]) {
      const p = await peer(f.port);
      await p.read(P.GREETING_BYTES);
      p.send(clientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0)));
      p.send(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk0')));
      const reply = await p.read(noZeroes ? 10 : 134);
      expect(P.readU64(reply, 0)).toBe(2 * MiB);
      expect(reply.readUInt16BE(8) & P.NBD_FLAG_HAS_FLAGS).toBe(P.NBD_FLAG_HAS_FLAGS);
      p.send(request(P.NBD_CMD_READ, 0, 16, 1));
      expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 1 });
      await p.read(16);
      expect(p.pending).toBe(0);
    }
  });

  it('hard-disconnects NBD_OPT_EXPORT_NAME for an unknown export, and acknowledges NBD_OPT_ABORT before closing', async () => {
    const f = await tap();
    const a = await peer(f.port);
    await a.read(P.GREETING_BYTES);
    a.send(clientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));
    a.send(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('missing')));
    expect(await a.waitClosed()).toBe(true);
    const b = await peer(f.port);
    await b.read(P.GREETING_BYTES);
    b.send(clientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));
    b.send(P.encodeOption(P.NBD_OPT_ABORT));
    expect((await readOptionReply(b)).type).toBe(P.NBD_REP_ACK);
    expect(await b.waitClosed()).toBe(true);
  });

  it('drops a client that floods oversized options', async () => {
    const f = await tap();
    const p = await peer(f.port);
    await p.read(P.GREETING_BYTES);
    p.send(clientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE));
    const head = P.encodeOption(99);
    head.writeUInt32BE(0x7fffffff, 12);
    p.send(head);
    expect(await p.waitClosed()).toBe(true);
    await expectServerHealthy(f);
  });

  it('disconnects a client that does not finish the handshake in time', async () => {
    const clock = new SimulatedClock();
    const f = await tap({ server: { clock } });
    const p = await peer(f.port);
    await p.read(P.GREETING_BYTES);
    await clock.advance(29_000);
    expect(p.closed).toBe(false);
    await clock.advance(2_000);
    expect(await p.waitClosed()).toBe(true);
  });
});

describe('NBD server transmission with bad input', () => {
  it('answers bad requests with the protocol error values and writes nothing', async () => {
    const f = await tap({ fill: 0x22, sizeBytes: MiB });
    const p = await peer(f.port);
    await rawHandshake(p, 'disk0');
    const cases: [Buffer, number][] = [
      [request(99, 0, 512, 1), P.NBD_EINVAL],
      [request(P.NBD_CMD_READ, MiB - 256, 512, 2), P.NBD_EINVAL],
      [request(P.NBD_CMD_READ, 2 ** 63, 512, 3), P.NBD_EINVAL],
      [request(P.NBD_CMD_READ, 0, 64 * MiB, 4), P.NBD_EINVAL],
      [request(P.NBD_CMD_READ, 0, 512, 5, { flags: P.NBD_CMD_FLAG_DF }), P.NBD_EINVAL],
      [request(P.NBD_CMD_WRITE, MiB - 256, 512, 6, { payload: Buffer.alloc(512, 0xee) }), P.NBD_ENOSPC],
      [request(P.NBD_CMD_WRITE, 0, 512, 7, { flags: 0x40, payload: Buffer.alloc(512, 0xee) }), P.NBD_EINVAL],
      [request(P.NBD_CMD_WRITE_ZEROES, MiB, 1, 8), P.NBD_ENOSPC],
      [request(P.NBD_CMD_WRITE_ZEROES, 0, 512, 9, { flags: P.NBD_CMD_FLAG_FAST_ZERO }), P.NBD_EINVAL],
      [request(P.NBD_CMD_TRIM, MiB - 1, 2, 10), P.NBD_EINVAL],
      [request(P.NBD_CMD_BLOCK_STATUS, 0, 512, 11), P.NBD_EINVAL],
      [request(P.NBD_CMD_CACHE, 0, 512, 12), P.NBD_EINVAL],
      [request(P.NBD_CMD_FLUSH, 0, 0, 13, { flags: P.NBD_CMD_FLAG_NO_HOLE }), P.NBD_EINVAL],
    ];
    for (const [bytes] of cases) p.send(bytes);
    const replies = new Map<number, number>();
    for (let i = 0; i < cases.length; i++) {
      const r = await readSimpleReply(p);
      replies.set(r.handle, r.error);
    }
    cases.forEach(([, error], i) => expect([i + 1, replies.get(i + 1)]).toEqual([i + 1, error]));
    // A write far longer than the maximum is refused and its payload skipped
    // without buffering it; the stream stays framed for the next request.
    const huge = 40 * MiB;
    p.send(request(P.NBD_CMD_WRITE, 0, huge, 20));
    expect(await readSimpleReply(p)).toEqual({ error: P.NBD_EINVAL, handle: 20 });
    for (let sent = 0; sent < huge; sent += MiB) p.send(Buffer.alloc(MiB, 0xee));
    p.send(request(P.NBD_CMD_READ, 0, 8, 21));
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 21 });
    expect((await p.read(8)).every((b) => b === 0x22)).toBe(true);
    expect(fs.readFileSync(f.imagePath).every((b) => b === 0x22)).toBe(true);
    expect(f.recorder.records).toEqual([]);
  });

  it('refuses writes, trims and zeroes on a read-only export with EPERM', async () => {
    const f = await tap({ fill: 0x33, sizeBytes: MiB, readOnly: true });
    const p = await peer(f.port);
    await rawHandshake(p, 'disk0');
    p.send(request(P.NBD_CMD_WRITE, 0, 512, 1, { payload: Buffer.alloc(512, 1) }));
    p.send(request(P.NBD_CMD_TRIM, 0, 512, 2));
    p.send(request(P.NBD_CMD_WRITE_ZEROES, 0, 512, 3));
    p.send(request(P.NBD_CMD_FLUSH, 0, 0, 4));
    const got = new Map<number, number>();
    for (let i = 0; i < 4; i++) {
      const r = await readSimpleReply(p);
      got.set(r.handle, r.error);
    }
    expect(Object.fromEntries(got)).toEqual({ 1: P.NBD_EPERM, 2: P.NBD_EPERM, 3: P.NBD_EPERM, 4: 0 });
    expect(fs.readFileSync(f.imagePath).every((b) => b === 0x33)).toBe(true);
  });

  it('drops a connection whose request has a wrong magic and keeps the others', async () => {
    const f = await tap();
    const p = await peer(f.port);
    await rawHandshake(p, 'disk0');
    const bad = request(P.NBD_CMD_READ, 0, 512, 1);
    bad.writeUInt32BE(0x12345678, 0);
    p.send(bad);
    expect(await p.waitClosed()).toBe(true);
    await expectServerHealthy(f);
  });

  it('applies nothing of a write whose client vanished mid-payload', async () => {
    const f = await tap({ fill: 0x44, sizeBytes: MiB });
    const p = await peer(f.port);
    await rawHandshake(p, 'disk0');
    p.send(request(P.NBD_CMD_WRITE, 0, 65536, 1));
    p.send(Buffer.alloc(30000, 0xfe));
    await new Promise((r) => setTimeout(r, 50));
    p.destroy();
    for (let i = 0; i < 100 && f.server.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(f.server.connectionCount).toBe(0);
    expect(fs.readFileSync(f.imagePath).every((b) => b === 0x44)).toBe(true);
    expect(f.recorder.records).toEqual([]);
    await expectServerHealthy(f);
  });

  it('answers every request sent before NBD_CMD_DISC, then closes', async () => {
    const f = await tap();
    const p = await peer(f.port);
    await rawHandshake(p, 'disk0');
    for (let i = 0; i < 20; i++) p.send(request(P.NBD_CMD_WRITE, i * 4096, 4096, 100 + i, { payload: Buffer.alloc(4096, i) }));
    p.send(request(P.NBD_CMD_DISC, 0, 0, 999));
    const handles = new Set<number>();
    for (let i = 0; i < 20; i++) handles.add((await readSimpleReply(p)).handle);
    expect(handles.size).toBe(20);
    expect(await p.waitClosed()).toBe(true);
    expect(f.recorder.records.length).toBe(20);
  });
});

/** A writable in-memory source whose writes wait until the test releases them. */
class HeldSource implements NbdWriteSource {
  readonly bytes: Buffer;
  readonly held: { offset: number; data: Buffer; done: () => void }[] = [];
  concurrent = 0;
  maxConcurrent = 0;

  constructor(readonly sizeBytes: number) {
    this.bytes = Buffer.alloc(sizeBytes);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return Buffer.from(this.bytes.subarray(offset, offset + length));
  }

  /** When set, released writes fail with an I/O error instead of landing. */
  failWrites = false;

  write(offset: number, data: Buffer): Promise<void> {
    this.concurrent++;
    this.maxConcurrent = Math.max(this.maxConcurrent, this.concurrent);
    return new Promise((resolve, reject) => {
      this.held.push({
        offset,
        data,
        done: () => {
          this.concurrent--;
          if (this.failWrites) return reject(new Error('EIO: disk write failed'));
          data.copy(this.bytes, offset);
          resolve();
        },
      });
    });
  }

  /** Releases every held write as it arrives, until the returned function is called. */
  releaseContinuously(): () => void {
    let released = 0;
    const timer = setInterval(() => {
      while (released < this.held.length) this.held[released++]!.done();
    }, 2);
    return () => clearInterval(timer);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.bytes.fill(0, offset, offset + length);
  }

  async discard(offset: number, length: number): Promise<void> {
    this.bytes.fill(0, offset, offset + length);
  }

  async flush(): Promise<void> {}
}

async function until(cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('condition not reached');
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('NBD server ordering and back-pressure', () => {
  it('replies out of order, yet keeps overlapping writes in arrival order on the disk and in the recorder', async () => {
    const source = new HeldSource(MiB);
    const recorder = new ListRecorder();
    const server = new NbdServer({ exports: [{ name: 'd', readOnly: false, source, recorder }] });
    const { port } = await server.listen('127.0.0.1', 0);
    cleanups.push(() => server.close(1000));
    const p = await peer(port);
    await rawHandshake(p, 'd');
    p.send(request(P.NBD_CMD_WRITE, 0, 8192, 1, { payload: Buffer.alloc(8192, 0xaa) }));
    p.send(request(P.NBD_CMD_WRITE, 4096, 8192, 2, { payload: Buffer.alloc(8192, 0xbb) }));
    p.send(request(P.NBD_CMD_WRITE, 65536, 4096, 3, { payload: Buffer.alloc(4096, 0xcc) }));
    // Writes 1 and 3 reach the disk at once; 2 overlaps 1 and waits for it.
    await until(() => source.held.length === 2);
    expect(source.held.map((h) => h.offset)).toEqual([0, 65536]);
    source.held[1]!.done();
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 3 });
    source.held[0]!.done();
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 1 });
    await until(() => source.held.length === 3);
    source.held[2]!.done();
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 2 });
    expect(source.bytes.subarray(4096, 8192).every((b) => b === 0xbb)).toBe(true);
    // Records are made in arrival order, which for the overlapping pair is also disk order.
    expect(recorder.records.map((r) => r.offset)).toEqual([0, 4096, 65536]);
    expect(recorder.replayOnto(Buffer.alloc(MiB)).equals(source.bytes)).toBe(true);
  });

  it('bounds requests in flight per connection by pausing the socket', async () => {
    const source = new HeldSource(MiB);
    const server = new NbdServer({ exports: [{ name: 'd', readOnly: false, source }], limits: { maxInFlightRequests: 4 } });
    const { port } = await server.listen('127.0.0.1', 0);
    cleanups.push(() => server.close(1000));
    const p = await peer(port);
    await rawHandshake(p, 'd');
    for (let i = 0; i < 50; i++) p.send(request(P.NBD_CMD_WRITE, i * 4096, 4096, i, { payload: Buffer.alloc(4096, i) }));
    await until(() => source.held.length === 4);
    await new Promise((r) => setTimeout(r, 50));
    expect(source.held.length).toBe(4);
    const stop = source.releaseContinuously();
    const handles = new Set<number>();
    while (handles.size < 50) {
      const r = await readSimpleReply(p);
      expect(r.error).toBe(0);
      handles.add(r.handle);
    }
    stop();
    expect(source.maxConcurrent).toBe(4);
    for (let i = 0; i < 50; i++) expect(source.bytes[i * 4096]).toBe(i);
  });

  it('bounds buffered bytes per connection', async () => {
    const source = new HeldSource(64 * MiB);
    const server = new NbdServer({ exports: [{ name: 'd', readOnly: false, source }], maxBlockBytes: MiB, limits: { maxBufferedBytes: 4 * MiB, maxInFlightRequests: 1000 } });
    const { port } = await server.listen('127.0.0.1', 0);
    cleanups.push(() => server.close(1000));
    const p = await peer(port);
    await rawHandshake(p, 'd');
    for (let i = 0; i < 32; i++) p.send(request(P.NBD_CMD_WRITE, i * MiB, MiB, i, { payload: Buffer.alloc(MiB, i) }));
    await until(() => source.held.length >= 4);
    await new Promise((r) => setTimeout(r, 100));
    // 4 MiB of held payload is the bound: at most 4 one-MiB writes are in flight.
    expect(source.held.length).toBe(4);
    const stop = source.releaseContinuously();
    for (let n = 0; n < 32; n++) expect((await readSimpleReply(p)).error).toBe(0);
    stop();
    expect(source.maxConcurrent).toBeLessThanOrEqual(4);
  });
});

/** A recorder whose records finish only when the test says so, and can fail. */
class SlowRecorder {
  readonly calls: number[] = [];
  private readonly waiting: { resolve: () => void; reject: (e: Error) => void }[] = [];
  flushes = 0;

  recordWrite(offset: number): Promise<void> {
    this.calls.push(offset);
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }));
  }

  recordZeroes(offset: number): Promise<void> {
    return this.recordWrite(offset);
  }

  async flush(): Promise<void> {
    this.flushes++;
  }

  finishAll(error?: Error): void {
    for (const w of this.waiting.splice(0)) if (error) w.reject(error); else w.resolve();
  }

  get unfinished(): number {
    return this.waiting.length;
  }
}

describe('NBD server record queue', () => {
  it('answers writes before their records finish, up to the bound, and FLUSH waits for them', async () => {
    const source = new HeldSource(MiB);
    const recorder = new SlowRecorder();
    const server = new NbdServer({ exports: [{ name: 'd', readOnly: false, source, recorder }], recordLimits: { maxRecords: 3 } });
    const { port } = await server.listen('127.0.0.1', 0);
    cleanups.push(() => server.close(1000));
    const stop = source.releaseContinuously();
    cleanups.push(stop);
    const p = await peer(port);
    await rawHandshake(p, 'd');
    for (let i = 0; i < 3; i++) p.send(request(P.NBD_CMD_WRITE, i * 4096, 4096, i, { payload: Buffer.alloc(4096, i) }));
    for (let i = 0; i < 3; i++) expect((await readSimpleReply(p)).error).toBe(0);
    expect(recorder.unfinished).toBe(3);
    // The fourth record is over the bound: its reply waits for it.
    p.send(request(P.NBD_CMD_WRITE, 3 * 4096, 4096, 3, { payload: Buffer.alloc(4096, 3) }));
    p.send(request(P.NBD_CMD_FLUSH, 0, 0, 4));
    await until(() => recorder.unfinished === 4);
    await new Promise((r) => setTimeout(r, 50));
    expect(p.pending).toBe(0);
    recorder.finishAll();
    const replies = [await readSimpleReply(p), await readSimpleReply(p)];
    expect(replies.map((r) => r.error)).toEqual([0, 0]);
    expect(recorder.flushes).toBe(1);
    expect(recorder.calls).toEqual([0, 4096, 8192, 12288]);
  });

  it('fails every FLUSH after a record failed, so a lost log entry is never reported durable', async () => {
    const source = new HeldSource(MiB);
    const recorder = new SlowRecorder();
    const warnings: string[] = [];
    const server = new NbdServer({ exports: [{ name: 'd', readOnly: false, source, recorder }], warn: (m) => warnings.push(m) });
    const { port } = await server.listen('127.0.0.1', 0);
    cleanups.push(() => server.close(1000));
    const stop = source.releaseContinuously();
    cleanups.push(stop);
    const p = await peer(port);
    await rawHandshake(p, 'd');
    p.send(request(P.NBD_CMD_WRITE, 0, 4096, 1, { payload: Buffer.alloc(4096, 1) }));
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 1 });
    recorder.finishAll(new Error('log volume full'));
    p.send(request(P.NBD_CMD_FLUSH, 0, 0, 2));
    expect(await readSimpleReply(p)).toEqual({ error: P.NBD_EIO, handle: 2 });
    p.send(request(P.NBD_CMD_FLUSH, 0, 0, 3));
    expect(await readSimpleReply(p)).toEqual({ error: P.NBD_EIO, handle: 3 });
    p.send(request(P.NBD_CMD_WRITE, 0, 4096, 4, { flags: P.NBD_CMD_FLAG_FUA, payload: Buffer.alloc(4096, 1) }));
    await until(() => recorder.unfinished === 1);
    recorder.finishAll();
    expect(await readSimpleReply(p)).toEqual({ error: P.NBD_EIO, handle: 4 });
    expect(warnings.some((w) => w.includes('recording a write failed'))).toBe(true);
  });
});

describe('NBD server with a failing disk', () => {
  it('answers EIO and fails later FLUSHes when a recorded write fails on the disk', async () => {
    const source = new HeldSource(MiB);
    const recorder = new ListRecorder();
    const warnings: string[] = [];
    const server = new NbdServer({ exports: [{ name: 'd', readOnly: false, source, recorder }], warn: (m) => warnings.push(m) });
    const { port } = await server.listen('127.0.0.1', 0);
    cleanups.push(() => server.close(1000));
    const p = await peer(port);
    await rawHandshake(p, 'd');
    p.send(request(P.NBD_CMD_FLUSH, 0, 0, 1));
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 1 });
    source.failWrites = true;
    p.send(request(P.NBD_CMD_WRITE, 0, 4096, 2, { payload: Buffer.alloc(4096, 7) }));
    await until(() => source.held.length === 1);
    source.held[0]!.done();
    expect(await readSimpleReply(p)).toEqual({ error: P.NBD_EIO, handle: 2 });
    expect(recorder.records.length).toBe(1);
    p.send(request(P.NBD_CMD_FLUSH, 0, 0, 3));
    expect(await readSimpleReply(p)).toEqual({ error: P.NBD_EIO, handle: 3 });
    expect(warnings.some((w) => w.includes('needs a resync'))).toBe(true);
  });
});

describe('NBD server lifecycle', () => {
  it('finishes requests in flight before closing on shutdown', async () => {
    const source = new HeldSource(MiB);
    const server = new NbdServer({ exports: [{ name: 'd', readOnly: false, source }] });
    const { port } = await server.listen('127.0.0.1', 0);
    const p = await peer(port);
    await rawHandshake(p, 'd');
    p.send(request(P.NBD_CMD_WRITE, 0, 4096, 1, { payload: Buffer.alloc(4096, 9) }));
    await until(() => source.held.length === 1);
    const closed = server.close(5000);
    await new Promise((r) => setTimeout(r, 20));
    source.held[0]!.done();
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 1 });
    await closed;
    expect(await p.waitClosed()).toBe(true);
    expect(source.bytes[0]).toBe(9);
  });
});
