import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { processServerFromConfig } from '../../src/transport/process-server';
import { runCli } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { requireTool } from '../helpers/tools';
import { DISK_SIZE, makeLog, MT_SECRET, prng, quiet, SECRET } from '../transport/transport-fixture';

describe('blockrelay resync SOURCE --process-server URL --disk ID', () => {
  const tmp = useTempDirs();
  const running: ApplyingHop[] = [];
  afterEach(async () => {
    for (const h of running.splice(0).reverse()) await h.stop();
  });

  it('resyncs over https through the process server into the master target and prints the figures as JSON', async () => {
    if (!requireTool('openssl')) return;
    const dir = tmp();
    const key = path.join(dir, 'key.pem');
    const cert = path.join(dir, 'cert.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'], { stdio: 'ignore' });
    const tls = { certFile: cert, keyFile: key };
    const targetFile = path.join(dir, 'target.img');
    const mt = masterTargetFromConfig(validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: MT_SECRET, tls, disks: [{ id: 'disk0', target: `raw:${targetFile}` }] }), hrlLogOps, quiet());
    await mt.start();
    running.push(mt);
    const ps = processServerFromConfig(validateConfig({ stateDir: path.join(dir, 'ps'), listen: '127.0.0.1:0', secret: SECRET, tls, forward: { url: mt.url, secret: MT_SECRET, caFile: cert } }), hrlLogOps, quiet());
    await ps.start();
    running.push(ps);
    expect(ps.url).toMatch(/^https:/);

    // The target holds log 1; the source has moved on without logs.
    const source = Buffer.alloc(DISK_SIZE);
    const log = await makeLog(path.join(dir, 'src'), 'disk0', 1, source, prng(4));
    await sendLog({ url: ps.url, secret: SECRET, ca: fs.readFileSync(cert) }, log.envelope, log.file);
    await ps.drain();
    await mt.drain();
    for (let i = 0; i < 40; i++) source.fill(i + 1, i * 64 * 1024, i * 64 * 1024 + 4096);
    const sourceFile = path.join(dir, 'source.img');
    fs.writeFileSync(sourceFile, source);

    const env = { BLOCKRELAY_SECRET: SECRET };
    const r = await runCli(['resync', `raw:${sourceFile}`, '--process-server', ps.url, '--disk', 'disk0', '--ca', cert, '--state', path.join(dir, 'state'), '--json'], { env });
    expect(r.status, r.stderr).toBe(0);
    const result = JSON.parse(r.stdout) as { bytesSent: number; blocksCompared: number; blocksSent: number; durationMs: number; attempts: number; afterSeq: number | null; diskId: string };
    expect(result).toMatchObject({ diskId: 'disk0', blocksCompared: DISK_SIZE / 4096, blocksSent: 40, attempts: 1, afterSeq: null });
    expect(result.bytesSent).toBeGreaterThan(40 * 4096);
    expect(result.bytesSent).toBeLessThan(40 * 4096 * 1.1);
    expect(fs.readFileSync(targetFile).equals(source)).toBe(true);
    expect(ps.resyncSessions.active('disk0')).toBeUndefined();
    expect(mt.resyncSessions.active('disk0')).toBeUndefined();

    // --after-seq anchors the session, but is no cut: the end still taints by what the hop received and the read-end time.
    const untilBefore = mt.resyncSessions.resyncState('disk0').taintedUntilMs!;
    source.fill(0x99, 0, 4096);
    fs.writeFileSync(sourceFile, source);
    const anchored = await runCli(['resync', `raw:${sourceFile}`, '--process-server', ps.url, '--disk', 'disk0', '--ca', cert, '--state', path.join(dir, 'state'), '--after-seq', '1', '--json'], { env });
    expect(anchored.status, anchored.stderr).toBe(0);
    expect(JSON.parse(anchored.stdout)).toMatchObject({ blocksSent: 1, afterSeq: 1 });
    expect(mt.resyncSessions.resyncState('disk0')).toMatchObject({ inProgress: false, taintedThrough: 1 });
    expect(mt.resyncSessions.resyncState('disk0').taintedUntilMs).toBeGreaterThan(untilBefore);
    expect(fs.readFileSync(targetFile).equals(source)).toBe(true);

    // Without the CA the process server's certificate is refused; the attempt is
    // a network failure, retried, so only the usage checks are run here.
    const noSecret = await runCli(['resync', `raw:${sourceFile}`, '--process-server', ps.url, '--disk', 'disk0'], { env: { BLOCKRELAY_SECRET: '' } });
    expect(noSecret.status).toBe(2);
    expect(noSecret.stderr).toMatch(/^BR_USAGE: .*BLOCKRELAY_SECRET/m);
  });

  it('validates the networked command line whole before connecting anywhere', async () => {
    const env = { BLOCKRELAY_SECRET: SECRET };
    for (const [args, pattern] of [
      [['raw:/x', '--process-server', 'http://127.0.0.1:1'], /--disk/],
      [['raw:/x', 'raw:/y', '--process-server', 'http://127.0.0.1:1', '--disk', 'disk0'], /SOURCE only/],
      [['raw:/x', '--process-server', 'ftp://h', '--disk', 'disk0'], /http/],
      [['raw:/x', '--process-server', 'http://127.0.0.1:1', '--disk', 'disk0', '--create'], /--create/],
      [['raw:/x', '--process-server', 'http://127.0.0.1:1', '--disk', 'disk0', '--retry-ms', '5'], /--retry-ms/],
      [['raw:/x', '--process-server', 'http://127.0.0.1:1', '--disk', 'disk0', '--max-read-rate', '0'], /--max-read-rate/],
    ] as const) {
      const r = await runCli(['resync', ...args], { env });
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(pattern);
    }
    const badDisk = await runCli(['resync', 'raw:/x', '--process-server', 'http://127.0.0.1:1', '--disk', '../etc'], { env });
    expect(badDisk.status).toBe(1);
    expect(badDisk.stderr).toMatch(/^BR_DISK_ID_INVALID: /m);
  });
});
