import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { sendLog } from '../../src/transport/log-client';
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
