/**
 * The process the native teardown test runs. Its main thread starts a
 * worker thread that serves a native tap on a disk that can hang (an
 * nbdfuse file over qemu-nbd, whose pid it is given), gets one request
 * stuck in the disk (`write`: in the export's writer thread; `read`: in the
 * connection thread), closes the server (the export's close stays pending)
 * and ends. Then the disk answers, and the stuck thread finishes after its
 * environment is gone. Prints SURVIVED and exits 0 if the process lives
 * through that.
 *
 * Usage: node --import tsx native-teardown-child.ts DISK DIR QEMU_PID write|read
 */
import * as path from 'node:path';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { NbdClient } from '../../src/tap/nbd-client';
import { NbdServer } from '../../src/tap/nbd-server';
import { RawTarget } from '../../src/targets/raw/raw-target';
import { ChangeTracker } from '../../src/tracking/change-tracker';

async function serveAndLeave(disk: string, dir: string, qemuPid: number, stuck: string): Promise<void> {
  const target = await RawTarget.open(disk);
  const tracker = await ChangeTracker.open({ dir: path.join(dir, 'logs'), diskId: 'disk0', diskSizeBytes: target.sizeBytes, persistIntervalMs: 0 });
  const server = new NbdServer({ exports: [{ name: 'disk0', readOnly: false, source: target, recorder: tracker }] });
  const { port } = await server.listen('127.0.0.1', 0);
  if (server.findExport('disk0')!.native === undefined) throw new Error('the export did not take the native data path');
  const client = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'disk0' });
  await client.write(0, Buffer.alloc(65536, 1));
  process.kill(qemuPid, 'SIGSTOP');
  if (stuck === 'read') void client.read(1024 * 1024, 65536).catch(() => undefined);
  else void client.write(65536, Buffer.alloc(65536, 2)).catch(() => undefined);
  // The export's writer (or the connection's thread) is now in the disk.
  await new Promise((r) => setTimeout(r, 300));
  // Drops the connection; the export's close stays pending behind the writer.
  await server.close(100);
  parentPort!.postMessage('leaving');
  process.exit(0);
}

if (isMainThread) {
  const [disk, dir, pid, stuck] = process.argv.slice(2);
  const qemuPid = Number(pid);
  const boot = `require(${JSON.stringify(require.resolve('tsx/cjs/api'))}).register(); require(${JSON.stringify(__filename)});`;
  const worker = new Worker(boot, { eval: true, workerData: { disk, dir, qemuPid, stuck } });
  let left = false;
  worker.on('message', (m) => {
    if (m === 'leaving') left = true;
  });
  worker.on('error', (err) => {
    process.stderr.write(`worker failed: ${err.stack ?? err.message}\n`);
    process.exit(2);
  });
  worker.on('exit', () => {
    if (!left) {
      process.stderr.write('worker ended before its export close was left pending\n');
      process.exit(2);
    }
    // The disk answers now: the writer finishes its write and ends.
    process.kill(qemuPid, 'SIGCONT');
    setTimeout(() => {
      process.stdout.write('SURVIVED\n');
      process.exit(0);
    }, 1500);
  });
} else {
  const { disk, dir, qemuPid, stuck } = workerData as { disk: string; dir: string; qemuPid: number; stuck: string };
  serveAndLeave(disk, dir, qemuPid, stuck).catch((err: unknown) => {
    process.stderr.write(`worker: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exit(1);
  });
}
