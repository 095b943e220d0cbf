import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { NbdWriteSource } from '../../src/tap/nbd-export';
import * as P from '../../src/tap/nbd-protocol';
import { NbdServer } from '../../src/tap/nbd-server';
import { RawTarget } from '../../src/targets/raw/raw-target';
import { useTempDirs } from '../helpers/tmp';
import { peer, useCleanups } from './native-tap-fixtures';
import { ListRecorder, rawHandshake, readSimpleReply, request } from './nbd-fixtures';

const tempDir = useTempDirs();
const cleanups = useCleanups();

describe('a tapped disk whose sync failed', () => {
  it('answers every later FLUSH with EIO, though the next sync would succeed', async () => {
    const target = await RawTarget.open(path.join(tempDir(), 'disk0.img'), { create: { sizeBytes: 1024 * 1024 } });
    cleanups.push(() => target.close());
    // The kernel reports a writeback error to one fdatasync: the next one returns 0
    // although the pages it could not write may be gone.
    let syncs = 0;
    const source: NbdWriteSource = {
      sizeBytes: target.sizeBytes,
      capabilities: target.capabilities,
      read: (o, l) => target.read(o, l),
      write: (o, d) => target.write(o, d),
      writeZeroes: (o, l) => target.writeZeroes(o, l),
      discard: (o, l) => target.discard(o, l),
      flush: async () => {
        if (++syncs === 1) throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
        await target.flush();
      },
    };
    const warnings: string[] = [];
    const server = new NbdServer({ exports: [{ name: 'disk0', readOnly: false, source, recorder: new ListRecorder() }], warn: (m) => warnings.push(m) });
    const { port } = await server.listen('127.0.0.1', 0);
    cleanups.push(() => server.close(2000));
    const p = await peer(port, cleanups);
    await rawHandshake(p, 'disk0');

    p.send(request(P.NBD_CMD_WRITE, 0, 4096, 1, { payload: Buffer.alloc(4096, 0x11) }));
    expect(await readSimpleReply(p)).toEqual({ error: 0, handle: 1 });
    p.send(request(P.NBD_CMD_FLUSH, 0, 0, 2));
    expect(await readSimpleReply(p)).toEqual({ error: P.NBD_EIO, handle: 2 });
    // Retried, and after a new write: still refused, without another sync that would "succeed".
    p.send(request(P.NBD_CMD_FLUSH, 0, 0, 3));
    expect(await readSimpleReply(p)).toEqual({ error: P.NBD_EIO, handle: 3 });
    p.send(request(P.NBD_CMD_WRITE, 4096, 4096, 4, { payload: Buffer.alloc(4096, 0x22), flags: P.NBD_CMD_FLAG_FUA }));
    expect(await readSimpleReply(p)).toEqual({ error: P.NBD_EIO, handle: 4 });
    expect(syncs).toBe(1);
    // Reads still work: the export refuses durability, not service.
    p.send(request(P.NBD_CMD_READ, 0, 4096, 5));
    expect((await readSimpleReply(p)).error).toBe(0);
  });
});
