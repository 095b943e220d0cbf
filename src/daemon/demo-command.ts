import { BlockrelayError } from '../retry/blockrelay-error';
import { parseCommandArgs, parseIntegerOption, type Command } from './command';
import { HOST_PORT_PATTERN } from './config';
import { Demo, DEMO_DEFAULTS } from './demo';
import { tellStopping, untilStopSignal } from './stop-signals';

/** How often the live line is redrawn on a terminal (and logged otherwise). */
const LIVE_LINE_INTERVAL_MS = 2_000;

function mib(bytes: number): string {
  return `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
}

export const demoCommand: Command = {
  path: ['demo'],
  usage: 'demo [--data DIR] [--size BYTES] [--nbd HOST:PORT] [--interval-ms N]',
  summary: 'run source tap, process server and master target in one process on a fresh (or resumed) disk',
  async run(argv, io) {
    const usage = this.usage;
    const { values } = parseCommandArgs(argv, { data: { type: 'string' }, size: { type: 'string' }, nbd: { type: 'string' }, 'interval-ms': { type: 'string' } }, usage);
    const sizeBytes = parseIntegerOption('size', values.size, DEMO_DEFAULTS.sizeBytes, 1024 * 1024, 2 ** 41);
    if (sizeBytes % 512 !== 0) throw new BlockrelayError('BR_USAGE', `--size must be a multiple of 512, got ${sizeBytes}`);
    const nbdListen = values.nbd ?? DEMO_DEFAULTS.nbdListen;
    if (!HOST_PORT_PATTERN.test(nbdListen)) throw new BlockrelayError('BR_USAGE', `--nbd expects HOST:PORT, got '${nbdListen}'`);
    const demo = new Demo({
      dataDir: values.data ?? './data',
      sizeBytes,
      nbdListen,
      intervalMs: parseIntegerOption('interval-ms', values['interval-ms'], DEMO_DEFAULTS.intervalMs, 100, 3_600_000),
    });
    const manifest = await demo.start();
    const l = demo.layout;
    io.stderr.write(
      [
        `blockrelay demo is replicating ${l.sourceDisk} -> ${l.target}`,
        '',
        `  write to the protected disk:  ${manifest.nbd}`,
        `  status page:                  ${manifest.control}/`,
        `  metrics:                      ${manifest.metrics}`,
        `  (also in ${l.manifest})`,
        '',
        'Try:',
        `  qemu-io -f raw -c 'write -P 0xab 0 1M' ${manifest.nbd}`,
        `  fio --name=churn --ioengine=nbd --uri=${manifest.nbd} --rw=randwrite --bs=64k --size=256m --iodepth=8`,
        `  blockrelay tag --url ${manifest.control} --app --name before-upgrade`,
        `  blockrelay points list --retention ${l.retention} --disk disk0`,
        `  blockrelay export --retention ${l.retention} --disk disk0 --point latest-processed --listen 127.0.0.1:10810`,
        `  blockrelay failover --retention ${l.retention} --disk disk0 --point latest-app --out vmdk:/tmp/failover.vmdk`,
        '',
        'Ctrl-C (or SIGTERM) drains everything pending to the target, then exits.',
        '',
      ].join('\n'),
    );
    const tty = (io.stderr as NodeJS.WriteStream).isTTY === true;
    let lastApplied = 0;
    const live = setInterval(() => {
      const disk = demo.status().disks[0];
      if (disk === undefined) return;
      const rate = (disk.appliedBytesTotal - lastApplied) / (LIVE_LINE_INTERVAL_MS / 1000);
      lastApplied = disk.appliedBytesTotal;
      const line = `${disk.health.padEnd(8)} applied ${mib(rate)}/s  RPO ${disk.rpoSeconds === null ? '-' : `${disk.rpoSeconds.toFixed(1)} s`}  pending ${mib(disk.pendingBytes)}  last point ${disk.lastPointTimeMs === null ? '-' : new Date(disk.lastPointTimeMs).toISOString()}  seq ${disk.appliedSeq ?? '-'}`;
      io.stderr.write(tty ? `\r${line}\u001b[K` : `${line}\n`);
    }, LIVE_LINE_INTERVAL_MS);
    live.unref();
    const signal = await untilStopSignal(tellStopping(io.stderr, 'draining everything pending to the target')).signal;
    clearInterval(live);
    io.stderr.write(`${tty ? '\n' : ''}${signal}: draining everything pending to the target...\n`);
    await demo.drainAndStop();
    const disk = demo.status().disks[0];
    io.stderr.write(`drained: applied up to log ${disk?.appliedSeq ?? '-'}; target ${l.target}\n`);
    // After an overflow the target waits for a resync the drain does not run
    // (it can take long): say so, or "drained" reads as "the target equals the disk".
    if (disk?.resync !== undefined) io.stderr.write(`not yet in step: a resync of ${mib(disk.resync.bytes)} is still pending and runs at the next start\n`);
    return 0;
  },
};
