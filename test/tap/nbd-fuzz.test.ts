import * as fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { useTempDirs } from '../helpers/tmp';
import { seededRandom } from '../targets/conformance';
import { RawPeer, rawHandshake, request, startTap, type TapFixture } from './nbd-fixtures';
import { NbdClient } from '../../src/tap/nbd-client';
import * as P from '../../src/tap/nbd-protocol';

/**
 * Fuzzes the server's parsers with a live server: random bytes and mutated
 * valid streams, in the handshake and in transmission. Seeded, bounded in
 * iterations and time. What must hold: the process never crashes, every
 * connection ends (answered or dropped), other connections keep working, and
 * nothing is written except the exact payload of a valid WRITE (or the range
 * of a valid WRITE_ZEROES/TRIM) that a correct framing of the bytes sent holds.
 */

const tempDir = useTempDirs();
const open: TapFixture[] = [];
afterEach(async () => {
  for (const f of open.splice(0)) await f.close();
});

const SIZE_BYTES = 1024 * 1024;
const SEED = 0x7a9c0de;

function randomBytes(rand: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(rand() * 256);
  return b;
}

/** Flips, overwrites, inserts or deletes a few bytes. */
function mutate(rand: () => number, input: Buffer): Buffer {
  let b = Buffer.from(input);
  const edits = 1 + Math.floor(rand() * 4);
  for (let e = 0; e < edits && b.length > 0; e++) {
    const at = Math.floor(rand() * b.length);
    const kind = Math.floor(rand() * 4);
    if (kind === 0) b[at] = b[at]! ^ (1 << Math.floor(rand() * 8));
    else if (kind === 1) b[at] = Math.floor(rand() * 256);
    else if (kind === 2) b = Buffer.concat([b.subarray(0, at), randomBytes(rand, 1 + Math.floor(rand() * 8)), b.subarray(at)]);
    else b = Buffer.concat([b.subarray(0, at), b.subarray(at + 1 + Math.floor(rand() * 8))]);
  }
  return b;
}

/** A valid stream of requests: writes, zeroes, trims, reads and flushes inside the export. */
function validRequests(rand: () => number, count: number, handleBase: number): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    const length = 1 + Math.floor(rand() * 8192);
    const offset = Math.floor(rand() * (SIZE_BYTES - length));
    const handle = handleBase + i;
    const pick = rand();
    if (pick < 0.5) parts.push(request(P.NBD_CMD_WRITE, offset, length, handle, { payload: randomBytes(rand, length), flags: rand() < 0.1 ? P.NBD_CMD_FLAG_FUA : 0 }));
    else if (pick < 0.6) parts.push(request(P.NBD_CMD_WRITE_ZEROES, offset, length, handle));
    else if (pick < 0.7) parts.push(request(P.NBD_CMD_TRIM, offset, length, handle));
    else if (pick < 0.95) parts.push(request(P.NBD_CMD_READ, offset, length, handle));
    else parts.push(request(P.NBD_CMD_FLUSH, 0, 0, handle));
  }
  return Buffer.concat(parts);
}

type Mutation = { kind: 'write'; offset: number; data: Buffer } | { kind: 'zero'; offset: number; length: number };

/**
 * The mutations a correct server applies for a byte stream: frames requests
 * exactly as the protocol does and keeps the valid WRITE/WRITE_ZEROES/TRIM.
 * Framing stops at a wrong magic (the server disconnects) or an incomplete
 * request (the connection ends before it is complete), and after DISC.
 */
function expectedMutations(stream: Buffer, maxBlockBytes: number): Mutation[] {
  const out: Mutation[] = [];
  let at = 0;
  while (at + P.REQUEST_HEADER_BYTES <= stream.length) {
    const h = P.decodeRequestHeader(stream, at, { magic: 0, flags: 0, type: 0, handleHi: 0, handleLo: 0, offset: 0, length: 0 });
    if (h.magic !== P.NBD_REQUEST_MAGIC) break;
    at += P.REQUEST_HEADER_BYTES;
    const inside = h.offset <= SIZE_BYTES && h.length <= SIZE_BYTES - h.offset;
    if (h.type === P.NBD_CMD_WRITE) {
      if (at + h.length > stream.length) break;
      const valid = (h.flags & ~P.NBD_CMD_FLAG_FUA) === 0 && h.length <= maxBlockBytes && inside;
      if (valid && h.length > 0) out.push({ kind: 'write', offset: h.offset, data: stream.subarray(at, at + h.length) });
      at += h.length;
    } else if (h.type === P.NBD_CMD_WRITE_ZEROES || h.type === P.NBD_CMD_TRIM) {
      const allowed = h.type === P.NBD_CMD_TRIM ? P.NBD_CMD_FLAG_FUA : P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE;
      const valid = (h.flags & ~allowed) === 0 && inside && (h.type === P.NBD_CMD_TRIM || h.length <= maxBlockBytes);
      if (valid && h.length > 0) out.push({ kind: 'zero', offset: h.offset, length: h.length });
    } else if (h.type === P.NBD_CMD_DISC) {
      break;
    }
  }
  return out;
}

function key(m: Mutation): string {
  return m.kind === 'write' ? `w:${m.offset}:${m.data.toString('base64')}` : `z:${m.offset}:${m.length}`;
}

async function settleConnection(f: TapFixture, peer: RawPeer): Promise<void> {
  // Give the server time to answer what it can, then leave.
  await new Promise((r) => setTimeout(r, 5));
  peer.destroy();
}

async function waitIdle(f: TapFixture, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (f.server.connectionCount > 0) {
    if (Date.now() > deadline) throw new Error(`${f.server.connectionCount} connections never ended`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function expectHealthy(f: TapFixture): Promise<void> {
  const client = await NbdClient.connect({ host: '127.0.0.1', port: f.port, exportName: 'disk0' });
  expect((await client.read(0, 4096)).length).toBe(4096);
  await client.close();
}

describe('NBD server fuzzing', () => {
  it('decodes NBD_OPT_GO data only when it re-encodes to the same bytes', () => {
    const rand = seededRandom(SEED + 2);
    const valid = P.encodeGoRequest('disk0', [P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME]);
    let accepted = 0;
    for (let i = 0; i < 20_000; i++) {
      const data = rand() < 0.5 ? mutate(rand, valid) : randomBytes(rand, Math.floor(rand() * 40));
      const decoded = P.decodeGoRequest(data);
      if (decoded === undefined) continue;
      accepted++;
      // Names are UTF-8; a lone invalid sequence decodes lossily, so compare the framing.
      expect(data.readUInt32BE(0) + 6 + decoded.infoRequests.length * 2).toBe(data.length);
      expect(decoded.infoRequests).toEqual(P.decodeGoRequest(P.encodeGoRequest(decoded.name, decoded.infoRequests))?.infoRequests);
    }
    expect(accepted).toBeGreaterThan(100);
  });

  it('survives random and mutated handshakes', async () => {
    const f = await startTap(tempDir(), { sizeBytes: SIZE_BYTES, fill: 0x5c });
    open.push(f);
    const rand = seededRandom(SEED);
    const valid = Buffer.concat([
      Buffer.from([0, 0, 0, 3]),
      P.encodeOption(P.NBD_OPT_LIST),
      P.encodeOption(P.NBD_OPT_INFO, P.encodeGoRequest('disk0', [P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME])),
      P.encodeOption(P.NBD_OPT_GO, P.encodeGoRequest('disk0', [P.NBD_INFO_BLOCK_SIZE])),
      request(P.NBD_CMD_READ, 0, 512, 1),
    ]);
    const started = Date.now();
    let iterations = 0;
    for (; iterations < 400 && Date.now() - started < 15_000; iterations++) {
      const peer = await RawPeer.connect(f.port);
      const bytes = rand() < 0.3 ? randomBytes(rand, Math.floor(rand() * 200)) : mutate(rand, valid);
      peer.send(bytes);
      await settleConnection(f, peer);
    }
    await waitIdle(f);
    await expectHealthy(f);
    expect(iterations).toBeGreaterThan(100);
    expect(fs.readFileSync(f.imagePath).every((b) => b === 0x5c)).toBe(true);
    expect(f.recorder.records).toEqual([]);
  }, 60_000);

  it('writes exactly the valid requests of random and mutated transmission streams', async () => {
    const f = await startTap(tempDir(), { sizeBytes: SIZE_BYTES, fill: 0 });
    open.push(f);
    const rand = seededRandom(SEED + 1);
    const expected = new Map<string, number>();
    const started = Date.now();
    let iterations = 0;
    for (; iterations < 300 && Date.now() - started < 20_000; iterations++) {
      const peer = await RawPeer.connect(f.port);
      await rawHandshake(peer, 'disk0');
      const clean = validRequests(rand, 1 + Math.floor(rand() * 12), iterations * 100);
      const r = rand();
      const stream = r < 0.15 ? randomBytes(rand, Math.floor(rand() * 300)) : r < 0.3 ? clean : mutate(rand, clean);
      for (const m of expectedMutations(stream, 32 * 1024 * 1024)) expected.set(key(m), (expected.get(key(m)) ?? 0) + 1);
      peer.send(stream);
      // Wait until the server consumed what it will, then hang up.
      await new Promise((res) => setTimeout(res, 15));
      peer.destroy();
    }
    await waitIdle(f);
    await expectHealthy(f);
    expect(iterations).toBeGreaterThan(100);
    // Every record is one a correct framing yields (the connection may end
    // before a request is carried out, so fewer is fine, never other ones).
    const seen = new Map<string, number>();
    for (const rec of f.recorder.records) {
      const m: Mutation = rec.kind === 'write' ? { kind: 'write', offset: rec.offset, data: rec.data } : { kind: 'zero', offset: rec.offset, length: rec.length };
      const k = key(m);
      seen.set(k, (seen.get(k) ?? 0) + 1);
      expect(seen.get(k)! <= (expected.get(k) ?? 0), `unexpected ${m.kind} at ${m.offset}`).toBe(true);
    }
    expect(f.recorder.records.length).toBeGreaterThan(100);
    // And the disk holds exactly what the records say.
    expect(f.recorder.replayOnto(Buffer.alloc(SIZE_BYTES)).equals(fs.readFileSync(f.imagePath))).toBe(true);
  }, 60_000);
});
