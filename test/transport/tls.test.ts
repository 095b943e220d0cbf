import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { DISK_SIZE, makeLog, MT_SECRET, prng, quiet, SECRET } from './transport-fixture';

describe('TLS between process server and master target', () => {
  const tmp = useTempDirs();
  const cleanup: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it('forwards over https to a master target whose certificate the config names, and refuses a missing CA file', async () => {
    if (!requireTool('openssl')) return;
    const dir = tmp();
    const key = path.join(dir, 'key.pem');
    const cert = path.join(dir, 'cert.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'], { stdio: 'ignore' });
    const mt = masterTargetFromConfig(
      validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, tls: { certFile: cert, keyFile: key }, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] }),
      hrlLogOps,
      quiet(),
    );
    await mt.start();
    cleanup.push(() => mt.stop());
    expect(mt.url).toMatch(/^https:\/\//);

    const missing = validateConfig({ stateDir: path.join(dir, 'ps0'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: mt.url, secret: MT_SECRET, caFile: path.join(dir, 'nope.pem') } });
    expect(() => processServerFromConfig(missing, hrlLogOps, quiet())).toThrow(expect.objectContaining({ code: 'BR_CONFIG_INVALID' }));

    const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, forward: { url: mt.url, secret: MT_SECRET, caFile: cert } }), hrlLogOps, quiet());
    await ps.start();
    cleanup.push(() => ps.stop());
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(9);
    for (let seq = 1; seq <= 3; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand);
      await sendLog({ url: ps.url, secret: SECRET }, log.envelope, log.file);
    }
    await ps.drain();
    await mt.drain();
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);
    // Without the CA, the certificate is not trusted: a coded, recoverable network error.
    await expect(sendLog({ url: mt.url, secret: MT_SECRET, timeoutMs: 5000 }, { ...(await makeLog(path.join(dir, 'src2'), 'disk0', 4, Buffer.alloc(DISK_SIZE), rand)).envelope }, path.join(dir, 'src2', 'disk0-000004.hrl'))).rejects.toMatchObject({ code: 'BR_NET_UNREACHABLE' });
  });
});
