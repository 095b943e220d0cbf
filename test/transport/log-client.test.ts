import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { peerRequest, sendLog } from '../../src/transport/log-client';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, makeLog, prng, SECRET } from './transport-fixture';

const tmp = useTempDirs();

/** This process's open descriptors that point at `file`. */
function descriptorsOn(file: string): number {
  let n = 0;
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    try {
      if (fs.readlinkSync(`/proc/self/fd/${fd}`) === file) n++;
    } catch {
      // Closed between the listing and the look.
    }
  }
  return n;
}

/** A loopback port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

describe('sendLog', () => {
  it('closes the log file when the peer refuses the connection, with or without lz4', async () => {
    // A hop restarting refuses connections while the uploader opens the
    // file: the upload must fail and let go of the file, not leave its
    // handle to the garbage collector.
    const dir = tmp();
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, Buffer.alloc(DISK_SIZE), prng(3));
    const port = await closedPort();
    for (const lz4 of [false, true]) {
      for (let i = 0; i < 5; i++) {
        await expect(sendLog({ url: `http://127.0.0.1:${port}`, secret: SECRET, timeoutMs: 2000 }, log.envelope, log.file, { lz4 })).rejects.toMatchObject({ code: expect.stringMatching(/^BR_/) });
      }
    }
    // The body writer settles after the request failed; give it a moment.
    for (let waited = 0; waited < 2000 && descriptorsOn(fs.realpathSync(log.file)) > 0; waited += 20) await new Promise((r) => setTimeout(r, 20));
    expect(descriptorsOn(fs.realpathSync(log.file))).toBe(0);
  });
});

/** A peer that answers every request with `body`, or, with `cutAfterBytes`, sends that much of it and drops the connection. */
async function answering(body: Buffer, cutAfterBytes?: number): Promise<{ url: string; close: () => Promise<void> }> {
  const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.writeHead(200, { 'content-length': String(body.length) });
      if (cutAfterBytes === undefined) {
        res.end(body);
        return;
      }
      res.write(body.subarray(0, cutAfterBytes), () => res.socket?.destroy());
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  return { url, close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

describe('peerRequest', () => {
  const big = Buffer.alloc(300_000, 0x61);

  it('refuses an answer longer than its bound with the code asked for, naming the byte offset', async () => {
    const peer = await answering(big);
    try {
      const asked = peerRequest({ url: peer.url, secret: SECRET }, { method: 'POST', path: '/x', headers: {}, agent: false, maxAnswerBytes: 100_000, answerTooLarge: 'BR_RESYNC_PROTOCOL' });
      const err = await asked.then(() => undefined, (e: unknown) => e);
      expect(err).toMatchObject({ code: 'BR_RESYNC_PROTOCOL', message: expect.stringMatching(/answer exceeds 100000 bytes/) });
      expect((err as { details: { offset: number } }).details.offset).toBeGreaterThan(100_000);
    } finally {
      await peer.close();
    }
  });

  it('keeps the first bytes of a long answer when no code is asked for', async () => {
    const peer = await answering(big);
    try {
      const answer = await peerRequest({ url: peer.url, secret: SECRET }, { method: 'GET', path: '/x', headers: {}, agent: false });
      expect(answer.status).toBe(200);
      expect(answer.body.equals(big.subarray(0, 64 * 1024))).toBe(true);
    } finally {
      await peer.close();
    }
  });

  it('fails with a recoverable network code when the answer is cut short', async () => {
    const peer = await answering(big, 1000);
    try {
      await expect(peerRequest({ url: peer.url, secret: SECRET }, { method: 'GET', path: '/x', headers: {}, agent: false })).rejects.toMatchObject({ code: 'BR_NET_UNREACHABLE', recoverable: true });
    } finally {
      await peer.close();
    }
  });
});
