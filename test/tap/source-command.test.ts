import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { cliCommand, runCli } from '../helpers/cli';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { run } from './nbd-fixtures';
import { systemClock } from '../../src/platform/clock';
import { SourceResyncs } from '../../src/resync/source-resyncs';
import { parseDiskFlags, parseListen, PROCESS_SERVER_SECRET_ENV, SOURCE_READY_PREFIX } from '../../src/tap/source-command';
import { FAST_RETRY, quiet, SECRET, startHops } from '../transport/transport-fixture';

const tempDir = useTempDirs();
const children: ChildProcess[] = [];
afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});

const MiB = 1024 * 1024;

interface RunningSource {
  child: ChildProcess;
  ready: { listen: string; exports: Record<string, string>; logDir: string };
  stderr: () => string;
  exit: Promise<number | null>;
}

/** Starts `blockrelay source` and waits for its ready line. */
async function startSource(args: string[], env: Record<string, string> = {}): Promise<RunningSource> {
  const { command, args: full } = cliCommand(['source', ...args]);
  const child = spawn(command, full, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LOG_LEVEL: 'warn', ...env } });
  children.push(child);
  let stderr = '';
  const exit = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const ready = await new Promise<RunningSource['ready']>((resolve, reject) => {
    child.stderr!.on('data', (d) => {
      stderr += d;
      const line = stderr.split('\n').find((l) => l.startsWith(SOURCE_READY_PREFIX));
      if (line !== undefined) resolve(JSON.parse(line.slice(SOURCE_READY_PREFIX.length)));
    });
    void exit.then((code) => reject(new Error(`source exited with ${code} before it was ready: ${stderr}`)));
  });
  return { child, ready, stderr: () => stderr, exit };
}

/** A disk image with a recognisable non-zero pattern, so a replay onto the wrong base would show. */
function patternImage(file: string, sizeBytes: number, seed: number): void {
  const buf = Buffer.alloc(sizeBytes);
  for (let i = 0; i < sizeBytes; i += 512) buf.writeUInt32LE((i * 2654435761 + seed) >>> 0, i);
  fs.writeFileSync(file, buf);
}

function sealedLogs(dir: string, id: string): string[] {
  return fs.readdirSync(dir).filter((n) => n.startsWith(`${id}-`) && n.endsWith('.hrl')).sort().map((n) => path.join(dir, n));
}

describe('blockrelay source arguments', () => {
  it('parses --listen forms and defaults to loopback', () => {
    expect(parseListen(undefined)).toEqual({ host: '127.0.0.1', port: 10809 });
    expect(parseListen('0')).toEqual({ host: '127.0.0.1', port: 0 });
    expect(parseListen(':10810')).toEqual({ host: '127.0.0.1', port: 10810 });
    expect(parseListen('0.0.0.0:10811')).toEqual({ host: '0.0.0.0', port: 10811 });
    expect(parseListen('[::1]:10812')).toEqual({ host: '::1', port: 10812 });
    expect(() => parseListen('::1:10812')).toThrow(/\[ADDR\]:PORT/);
    expect(() => parseListen('host:99999')).toThrow(/between 0 and 65535/);
  });

  it('parses --disk ID=SPEC and refuses duplicates and empty parts', () => {
    expect(parseDiskFlags(['disk0=raw:/a=b', 'd1=nbd://h:1/x'])).toEqual([{ id: 'disk0', spec: 'raw:/a=b' }, { id: 'd1', spec: 'nbd://h:1/x' }]);
    expect(() => parseDiskFlags([])).toThrow(/at least one --disk/);
    expect(() => parseDiskFlags(['=raw:/a'])).toThrow(/ID=SPEC/);
    expect(() => parseDiskFlags(['d='])).toThrow(/ID=SPEC/);
    expect(() => parseDiskFlags(['d=raw:/a', 'd=raw:/b'])).toThrow(/twice/);
  });

  it('exits 2 with BR_USAGE for missing flags, bad disk ids and --process-server without its secret', async () => {
    const dir = tempDir();
    const img = path.join(dir, 'd.img');
    fs.writeFileSync(img, Buffer.alloc(MiB));
    const cases: [string[], RegExp][] = [
      [['--listen', '127.0.0.1:0', '--log-dir', dir], /at least one --disk/],
      [['--disk', `d=raw:${img}`, '--listen', '127.0.0.1:0'], /--log-dir is required/],
      [['--disk', `bad/id=raw:${img}`, '--listen', '127.0.0.1:0', '--log-dir', dir], /disk id 'bad\/id'/],
      [['--disk', `d=raw:${img}`, '--listen', '127.0.0.1:0', '--log-dir', dir, '--process-server', 'http://x'], /--process-server needs the process server's shared secret/],
    ];
    for (const [args, message] of cases) {
      const r = await runCli(['source', ...args]);
      expect(r.status, r.stderr).toBe(2);
      expect(r.stderr.trim()).toMatch(/^BR_USAGE: /);
      expect(r.stderr).toMatch(message);
    }
    const missing = await runCli(['source', '--disk', `d=raw:${path.join(dir, 'nope.img')}`, '--listen', '127.0.0.1:0', '--log-dir', dir]);
    expect(missing.status).toBe(1);
    expect(missing.stderr.trim()).toMatch(/^BR_FILE_NOT_FOUND: /);
  });
});

describe('blockrelay source end to end', () => {
  it.runIf(requireTool('fio') && requireTool('qemu-io') && requireTool('qemu-img'))(
    'records fio and qemu-io writes to two disks so that applying the sealed logs in order rebuilds both, cut at common points',
    async () => {
      const dir = tempDir();
      const disk0 = path.join(dir, 'disk0.img');
      const disk1 = path.join(dir, 'disk1.img');
      patternImage(disk0, 64 * MiB, 1);
      patternImage(disk1, 16 * MiB, 2);
      const base0 = path.join(dir, 'base0.img');
      const base1 = path.join(dir, 'base1.img');
      fs.copyFileSync(disk0, base0);
      fs.copyFileSync(disk1, base1);
      const logDir = path.join(dir, 'logs');

      const src = await startSource(['--disk', `disk0=raw:${disk0}`, '--disk', `disk1=raw:${disk1}`, '--listen', '127.0.0.1:0', '--log-dir', logDir, '--interval-ms', '300']);
      expect(src.stderr()).toContain(`source: disk disk0 at ${src.ready.exports.disk0}`);
      expect(src.ready.exports.disk1).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/disk1$/);
      const fio = (name: string) => run('fio', [
        `--name=${name}`, '--ioengine=nbd', `--uri=${src.ready.exports.disk0}`, '--rw=randwrite', '--bsrange=4k-64k',
        '--iodepth=16', '--size=64m', '--io_size=8m', '--norandommap', '--refill_buffers', '--randrepeat=0', '--verify=crc32c', '--verify_state_save=0',
        `--output=${path.join(dir, `${name}.txt`)}`,
      ]);
      await fio('a');
      await new Promise((r) => setTimeout(r, 500));
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 1M 256k', '-c', 'write -z 4M 1M', '-c', 'discard 8M 64k', '-c', 'flush', src.ready.exports.disk1]);
      await new Promise((r) => setTimeout(r, 500));
      await fio('b');
      src.child.kill('SIGTERM');
      expect(await src.exit).toBe(0);
      expect(fs.existsSync(path.join(logDir, 'blockrelay.lock'))).toBe(false);

      const logs0 = sealedLogs(logDir, 'disk0');
      const logs1 = sealedLogs(logDir, 'disk1');
      expect(logs0.length).toBeGreaterThanOrEqual(2);
      expect(fs.readdirSync(logDir).some((n) => n.endsWith('.hrl.open'))).toBe(false);
      // Every cut seals both disks: their sidecars carry the same cut ids.
      const cutIds = (logs: string[]) => logs.map((l) => JSON.parse(fs.readFileSync(`${l}.json`, 'utf8')).cutId as string);
      const cuts1 = new Set(cutIds(logs1));
      const shared = cutIds(logs0).filter((id) => cuts1.has(id));
      expect(shared.length).toBeGreaterThanOrEqual(2);

      for (const [base, logs, disk] of [[base0, logs0, disk0], [base1, logs1, disk1]] as const) {
        const applied = await runCli(['hrl', 'apply', `raw:${base}`, ...logs]);
        expect(applied.status, applied.stderr).toBe(0);
        await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', base, disk]);
      }
    },
    90_000,
  );
});

describe('blockrelay source with a process server and --control', () => {
  const stops: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const s of stops.splice(0).reverse()) await s();
  });

  it('resumes on start a resync that the previous source process was stopped in the middle of', async () => {
    const dir = tempDir();
    const { ps, stop } = await startHops(dir);
    stops.push(stop);
    const diskFile = path.join(dir, 'disk0.img');
    patternImage(diskFile, 16 * MiB, 3);
    const logDir = path.join(dir, 'logs');
    // The previous process: a slow resync, stopped once its progress is saved
    // where the source command keeps it (LOG_DIR/resync).
    const previous = new SourceResyncs({
      diskSpecs: new Map([['disk0', `raw:${diskFile}`]]), peer: { url: ps.url, secret: SECRET }, stateDir: path.join(logDir, 'resync'),
      cut: async () => undefined, clock: systemClock, ...quiet(), retryPolicy: FAST_RETRY, readRateBytesPerSec: 8 * MiB,
    });
    previous.start('disk0');
    const statePath = previous.statePath('disk0');
    for (let waited = 0; !fs.existsSync(statePath) && waited < 10_000; waited += 10) await new Promise((r) => setTimeout(r, 10));
    await previous.stop();
    expect(previous.interrupted()).toEqual(['disk0']);

    const src = await startSource(
      ['--disk', `disk0=raw:${diskFile}`, '--listen', '127.0.0.1:0', '--log-dir', logDir, '--process-server', ps.url, '--control', '127.0.0.1:0'],
      { [PROCESS_SERVER_SECRET_ENV]: SECRET },
    );
    expect(src.stderr()).toContain('source: resuming the interrupted resync of disk disk0');
    // Done: its saved progress and pending end are gone.
    for (let waited = 0; previous.interrupted().length > 0 && waited < 30_000; waited += 50) await new Promise((r) => setTimeout(r, 50));
    expect(previous.interrupted()).toEqual([]);
    src.child.kill('SIGTERM');
    expect(await src.exit).toBe(0);
  }, 60_000);
});
