import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { RawPeer, rawHandshake, readSimpleReply, request, run } from './nbd-fixtures';
import { expectLogsRebuildDisk, loggedWrites, MiB, NATIVE_TAP_SIZE_BYTES as SIZE_BYTES, nativeTap as startNativeTap, type NativeTap, peer as connectPeer, seededRandom, useCleanups, waitIdle } from './native-tap-fixtures';
import { NbdClient } from '../../src/tap/nbd-client';
import * as P from '../../src/tap/nbd-protocol';
import { recoverHrlLog } from '../../src/tracking/hrl-recovery';

/**
 * The native data path (native/tap-transmission.cc): a writable raw disk
 * tracked by a real ChangeTracker hands READ and WRITE to a thread per
 * connection after the handshake. These tests drive it with raw bytes and
 * real clients and check the disk against the tracker's log.
 */

const tempDir = useTempDirs();
const cleanups = useCleanups();

function nativeTap(options: { sizeBytes?: number; maxBlockBytes?: number; overflowRatio?: number } = {}): Promise<NativeTap> {
  return startNativeTap(tempDir(), cleanups, options);
}

function peer(port: number): Promise<RawPeer> {
  return connectPeer(port, cleanups);
}

describe('native tap data path', () => {
  it('answers bad requests with the protocol error values, writes and logs nothing of them, and keeps the stream framed', async () => {
    const t = await nativeTap({ maxBlockBytes: MiB });
    const p = await peer(t.port);
    await rawHandshake(p, 'disk0');
    const cases: [Buffer, number][] = [
      [request(P.NBD_CMD_WRITE, SIZE_BYTES - 512, 1024, 1, { payload: Buffer.alloc(1024, 1) }), P.NBD_ENOSPC],
      [request(P.NBD_CMD_WRITE, 2 ** 52, 512, 2, { payload: Buffer.alloc(512, 2) }), P.NBD_ENOSPC],
      [request(P.NBD_CMD_WRITE, 0, MiB + 512, 3, { payload: Buffer.alloc(MiB + 512, 3) }), P.NBD_EINVAL],
      [request(P.NBD_CMD_WRITE, 0, 512, 4, { flags: 1 << 7, payload: Buffer.alloc(512, 4) }), P.NBD_EINVAL],
      [request(P.NBD_CMD_READ, SIZE_BYTES, 512, 5), P.NBD_EINVAL],
      [request(P.NBD_CMD_READ, 0, 2 * MiB, 6), P.NBD_EINVAL],
      [request(99, 0, 512, 7), P.NBD_EINVAL],
      [request(P.NBD_CMD_FLUSH, 0, 0, 8, { flags: 1 << 5 }), P.NBD_EINVAL],
      [request(P.NBD_CMD_TRIM, SIZE_BYTES - 512, 4096, 9), P.NBD_EINVAL],
    ];
    for (const [bytes, error] of cases) {
      p.send(bytes);
      expect(await readSimpleReply(p)).toMatchObject({ error });
    }
    // The same connection still works: a valid write, then a read of it.
    p.send(request(P.NBD_CMD_WRITE, 4096, 512, 20, { payload: Buffer.alloc(512, 0x77) }));
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 20 });
    p.send(request(P.NBD_CMD_READ, 4096, 512, 21));
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 21 });
    expect((await p.read(512)).every((b) => b === 0x77)).toBe(true);
    p.destroy();
    await waitIdle(t.server);
    const image = fs.readFileSync(t.imagePath);
    expect(image.subarray(4096, 4608).every((b) => b === 0x77)).toBe(true);
    image.fill(0, 4096, 4608);
    expect(image.every((b) => b === 0)).toBe(true);
    const logged = await loggedWrites(t);
    expect(logged.map((w) => [w.offset, w.data.length])).toEqual([[4096, 512]]);
  });

  it('drops a connection with a wrong magic or one that vanishes mid-payload, writes nothing of it, and keeps serving others', async () => {
    const t = await nativeTap();
    const bad = await peer(t.port);
    await rawHandshake(bad, 'disk0');
    const header = request(P.NBD_CMD_WRITE, 0, 512, 1, { payload: Buffer.alloc(512, 1) });
    header.writeUInt32BE(0xdeadbeef, 0);
    bad.send(header);
    await expect(bad.read(1, 2000)).rejects.toThrow();
    const vanishing = await peer(t.port);
    await rawHandshake(vanishing, 'disk0');
    vanishing.send(request(P.NBD_CMD_WRITE, 65536, 65536, 2, { payload: Buffer.alloc(65536, 2) }).subarray(0, 28 + 40_000));
    await new Promise((r) => setTimeout(r, 50));
    vanishing.destroy();
    await waitIdle(t.server);
    const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port, exportName: 'disk0' });
    await client.write(0, Buffer.alloc(512, 0x99));
    await client.close();
    await waitIdle(t.server);
    const image = fs.readFileSync(t.imagePath);
    expect(image.subarray(0, 512).every((b) => b === 0x99)).toBe(true);
    expect(image.subarray(512).every((b) => b === 0)).toBe(true);
    expect((await loggedWrites(t)).map((w) => w.offset)).toEqual([0]);
  });

  it('answers every request sent before NBD_CMD_DISC, then closes', async () => {
    const t = await nativeTap();
    const p = await peer(t.port);
    await rawHandshake(p, 'disk0');
    const parts: Buffer[] = [];
    for (let i = 0; i < 20; i++) parts.push(request(P.NBD_CMD_WRITE, i * 4096, 4096, 100 + i, { flags: i % 5 === 0 ? P.NBD_CMD_FLAG_FUA : 0, payload: Buffer.alloc(4096, i + 1) }));
    parts.push(request(P.NBD_CMD_FLUSH, 0, 0, 200));
    parts.push(request(P.NBD_CMD_DISC, 0, 0, 201));
    p.send(Buffer.concat(parts));
    const handles: number[] = [];
    for (let i = 0; i < 21; i++) {
      const reply = await readSimpleReply(p);
      expect(reply.error).toBe(0);
      handles.push(reply.handle);
    }
    expect(handles.sort((a, b) => a - b)).toEqual([...Array.from({ length: 20 }, (_, i) => 100 + i), 200]);
    await expect(p.read(1, 2000)).rejects.toThrow();
    await waitIdle(t.server);
    await expectLogsRebuildDisk(t);
  });

  it('makes a FLUSHed write durable in the open log before the reply', async () => {
    const t = await nativeTap();
    const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port, exportName: 'disk0' });
    await client.write(3 * MiB, Buffer.alloc(65536, 0x42));
    await client.flush();
    // What a crash now would leave: the open log as it is on disk.
    const open = fs.readdirSync(path.join(t.dir, 'logs')).find((n) => n.endsWith('.hrl.open'))!;
    const crashCopy = path.join(t.dir, 'crash.hrl');
    fs.copyFileSync(path.join(t.dir, 'logs', open), crashCopy);
    const recovered = await recoverHrlLog(crashCopy);
    expect(recovered.entryCount).toBe(1);
    await client.close();
  });

  it('holds a write back from the disk until its write intent is durable', async () => {
    const t = await nativeTap();
    let allow!: () => void;
    const gate = new Promise<void>((resolve) => { allow = resolve; });
    const intendNative = t.tracker.intendNative.bind(t.tracker);
    t.tracker.intendNative = async (o: number, l: number) => {
      await gate;
      await intendNative(o, l);
    };
    const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port, exportName: 'disk0' });
    const writing = client.write(5 * MiB, Buffer.alloc(4096, 0xee));
    await new Promise((r) => setTimeout(r, 150));
    expect(fs.readFileSync(t.imagePath).subarray(5 * MiB, 5 * MiB + 4096).every((b) => b === 0)).toBe(true);
    allow();
    await writing;
    expect(fs.readFileSync(t.imagePath).subarray(5 * MiB, 5 * MiB + 4096).every((b) => b === 0xee)).toBe(true);
    await client.close();
  });

  it('keeps log order equal to disk order for overlapping writes, zeroes and trims from several connections', async () => {
    const t = await nativeTap();
    const clients = await Promise.all([0, 1, 2].map(() => NbdClient.connect({ host: '127.0.0.1', port: t.port, exportName: 'disk0' })));
    const rand = seededRandom(7);
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 300; i++) {
      const c = clients[i % clients.length]!;
      const offset = Math.floor(rand() * 64) * 4096;
      const length = (1 + Math.floor(rand() * 16)) * 4096;
      const r = rand();
      if (r < 0.1) ops.push(c.writeZeroes(offset, length));
      else if (r < 0.15) ops.push(c.trim(offset, length));
      else ops.push(c.write(offset, Buffer.alloc(length, 1 + (i % 250))));
    }
    await Promise.all(ops);
    for (const c of clients) await c.close();
    await waitIdle(t.server);
    await expectLogsRebuildDisk(t);
  });

  it('logs exactly the valid writes of random and mutated transmission streams', async () => {
    const t = await nativeTap();
    const rand = seededRandom(0x5eed);
    const expected = new Set<string>();
    const started = Date.now();
    let iterations = 0;
    for (; iterations < 150 && Date.now() - started < 15_000; iterations++) {
      const p = await RawPeer.connect(t.port);
      await rawHandshake(p, 'disk0');
      const parts: Buffer[] = [];
      for (let i = 0; i < 1 + Math.floor(rand() * 8); i++) {
        const length = Math.floor(rand() * 3) * 4096 + Math.floor(rand() * 2) * 512;
        const offset = Math.floor(rand() * (SIZE_BYTES / 512 + 64)) * 512;
        parts.push(request(P.NBD_CMD_WRITE, offset, length, i, { payload: Buffer.alloc(length, (iterations * 7 + i) % 255) }));
      }
      let stream = Buffer.concat(parts);
      if (rand() < 0.5 && stream.length > 0) {
        stream = Buffer.from(stream);
        for (let k = 0; k < 1 + Math.floor(rand() * 3); k++) stream[Math.floor(rand() * stream.length)] = Math.floor(rand() * 256);
      }
      // What a correct framing carries out of this stream.
      for (let at = 0; at + 28 <= stream.length; ) {
        const h = P.decodeRequestHeader(stream, at, { magic: 0, flags: 0, type: 0, handleHi: 0, handleLo: 0, offset: 0, length: 0 });
        if (h.magic !== P.NBD_REQUEST_MAGIC) break;
        at += 28;
        if (h.type !== P.NBD_CMD_WRITE) continue;
        if (at + h.length > stream.length) break;
        const valid = (h.flags & ~P.NBD_CMD_FLAG_FUA) === 0 && h.offset <= SIZE_BYTES && h.length <= SIZE_BYTES - h.offset && h.length <= 32 * MiB;
        if (valid && h.length > 0) expected.add(`${h.offset}:${stream.subarray(at, at + h.length).toString('base64')}`);
        at += h.length;
      }
      p.send(stream);
      await new Promise((r) => setTimeout(r, 10));
      p.destroy();
    }
    await waitIdle(t.server);
    expect(iterations).toBeGreaterThan(50);
    const logged = await loggedWrites(t);
    expect(logged.length).toBeGreaterThan(50);
    for (const w of logged) expect(expected.has(`${w.offset}:${w.data.toString('base64')}`), `unexpected write at ${w.offset}`).toBe(true);
    await expectLogsRebuildDisk(t);
  }, 60_000);

  it('folds into dirty-map-only tracking when natively logged writes pass the overflow limit, keeping every written block', async () => {
    const t = await nativeTap({ overflowRatio: 0.25 });
    const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port, exportName: 'disk0' });
    for (let at = 0; at < 4 * MiB; at += 65536) await client.write(at, Buffer.alloc(65536, 0x31));
    // Writes after the fold are tracked in the maps only, and still reach the disk.
    await client.write(6 * MiB, Buffer.alloc(4096, 0x32));
    await client.flush();
    await client.close();
    await waitIdle(t.server);
    expect(t.tracker.status()).toMatchObject({ mode: 'dirty-only', lastResyncReason: 'overflow', sealedLogs: 0 });
    expect([...t.tracker.resyncExtents()]).toEqual([{ offset: 0, length: 4 * MiB }, { offset: 6 * MiB, length: 4096 }]);
    expect(fs.readFileSync(t.imagePath).subarray(6 * MiB, 6 * MiB + 4096).every((b) => b === 0x32)).toBe(true);
  });

  it('passes fio random writes with verification, and its log rebuilds the disk', async () => {
    if (!requireTool('fio')) return;
    const t = await nativeTap({ sizeBytes: 64 * MiB });
    await run('fio', ['--name=n', '--ioengine=nbd', `--uri=${t.uri}`, '--rw=randwrite', '--bsrange=4k-64k', '--iodepth=16', '--size=64m', '--io_size=16m',
      '--norandommap', '--randrepeat=0', '--verify=crc32c', '--verify_state_save=0', `--output=${path.join(t.dir, 'fio.txt')}`]);
    await waitIdle(t.server);
    await expectLogsRebuildDisk(t);
  }, 60_000);
});
