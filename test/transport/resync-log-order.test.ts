import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { sendLog } from '../../src/transport/log-client';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, makeLog, prng, SECRET, startGatedHops } from './transport-fixture';

/** A TCP proxy to `target` that holds back, by `delayMs`, a connection from the chunk carrying `marker` on. */
function delayingProxy(target: { host: string; port: number }, marker: string, delayMs: number): Promise<{ url: string; close: () => void }> {
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host);
    let chain = Promise.resolve();
    let delayed = false;
    client.on('data', (chunk: Buffer) => {
      if (!delayed && chunk.toString('latin1').includes(marker)) {
        delayed = true;
        chain = chain.then(() => new Promise((r) => setTimeout(r, delayMs)));
      }
      chain = chain.then(() => {
        upstream.write(chunk);
      });
    });
    client.on('end', () => {
      chain = chain.then(() => {
        upstream.end();
      });
    });
    upstream.pipe(client);
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`, close: () => server.close() })));
}

/**
 * A resync round seals the active log N-1 and gives its resync log the next
 * sequence N. A receiver admits a resync log past a gap (it may follow
 * folded logs), so if N reached the master target before N-1 (another
 * connection, a slow handshake, a lost segment), N was taken and N-1 then
 * answered as a duplicate and dropped: its writes on no target (review s5,
 * R15). Here the connection carrying log 2 to the master target is held
 * back 300 ms while the resync log 3 follows it, through the cut-through
 * path and through the spool's pipeline (a paced link: no cut-through).
 */
describe('a resync log right after a normal one, forwarded while the normal one is held back on the way', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void> | void> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  for (const mode of ['cut-through', 'spool pipeline'] as const) {
    it(`applies both, in order (${mode})`, async () => {
      const dir = tmp();
      // The connection carrying log 2 to the master target is held back 300 ms.
      const forwardVia = async (mtUrl: string): Promise<string> => {
        const at = new URL(mtUrl);
        const proxy = await delayingProxy({ host: at.hostname, port: Number(at.port) }, 'PUT /v1/disks/disk0/logs/2 ', 300);
        cleanup.push(() => proxy.close());
        return proxy.url;
      };
      // A paced link has no cut-through: the spool's pipeline sends ahead instead.
      const { mt, ps, hold } = await startGatedHops(dir, cleanup, { forwardVia, forward: mode === 'cut-through' ? { cutThrough: true } : { bandwidthBytesPerSecond: 1_000_000_000 } });
      const model = Buffer.alloc(DISK_SIZE);
      const rand = prng(34);
      const peer = { url: ps.url, secret: SECRET };
      const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand, 40);
      await sendLog(peer, first.envelope, first.file);
      await ps.drain();
      const second = await makeLog(path.join(dir, 'src'), 'disk0', 2, model, rand, 40);
      const third = await makeLog(path.join(dir, 'src'), 'disk0', 3, model, rand, 40);
      // Log 2's verification at the process server waits for the test, so log 3 arrives meanwhile.
      const open = hold(2);
      const upload2 = sendLog(peer, second.envelope, second.file, { lz4: true });
      await new Promise((r) => setTimeout(r, 200));
      const upload3 = sendLog(peer, { ...third.envelope, resync: true }, third.file);
      await new Promise((r) => setTimeout(r, 300));
      open();
      expect((await upload2).status).toBe(201);
      expect((await upload3).status).toBe(201);
      await ps.drain();
      await mt.drain();
      expect(mt.diskStatus()[0]?.appliedSeq).toBe(3);
      expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model), 'the target holds logs 1 to 3').toBe(true);
    }, 60_000);
  }
});
