/**
 * The process the crash test kills with SIGKILL at random moments. It drives
 * a ChangeTracker like a source tap would: writes, flushes (journaled once
 * they resolve, as the acknowledgement the guest would get), rotations, and
 * shipping (a durable copy into `shipped/`, then acknowledge).
 *
 * Usage: tsx change-tracker-crash-child.ts DIR FIRST_INDEX SEED
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { CRASH_DISK_BYTES, crashTrackerOptions, writeOf } from './change-tracker-crash-plan';

function copyDurably(from: string, to: string): void {
  fs.copyFileSync(from, `${to}.tmp`);
  const fd = fs.openSync(`${to}.tmp`, 'r+');
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  fs.renameSync(`${to}.tmp`, to);
}

async function main(): Promise<void> {
  const [dir, firstArg, seedArg] = process.argv.slice(2);
  const first = Number(firstArg);
  let seed = Number(seedArg) >>> 0 || 1;
  const rnd = (): number => {
    seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0;
    return seed / 0x1_0000_0000;
  };
  const shipped = path.join(dir!, 'shipped');
  fs.mkdirSync(shipped, { recursive: true });
  const journal = path.join(dir!, 'journal.txt');
  const tracker = await ChangeTracker.open(crashTrackerOptions(path.join(dir!, 'logs')));
  process.stdout.write('ready\n');
  // A cut runs beside the writes (not awaited), as the source role's timer
  // cuts while the guest writes: writes pass it into the next log while the
  // old one seals, so kills land inside the switch window too. A failed cut
  // ends the child with an error, which fails the test.
  let cutting: Promise<unknown> | undefined;
  for (let i = first; ; i++) {
    const w = writeOf(i);
    if (w.zero) await tracker.recordZeroes(w.offset, w.length);
    else await tracker.recordWrite(w.offset, w.data);
    const r = rnd();
    if (r < 0.15) {
      await tracker.flush();
      // Writes first..i are acknowledged as durable from here on.
      fs.appendFileSync(journal, `${first} ${i + 1}\n`);
    } else if (r < 0.2) {
      if (cutting === undefined) {
        cutting = tracker.rotate().finally(() => {
          cutting = undefined;
        });
      }
    } else if (r < 0.25) {
      const oldest = tracker.sealedLogs()[0];
      if (oldest !== undefined) {
        copyDurably(oldest.path, path.join(shipped, oldest.name));
        copyDurably(oldest.sidecarPath, path.join(shipped, path.basename(oldest.sidecarPath)));
        await tracker.acknowledge(oldest.name);
      }
    }
    if (i - first > 200_000) break;
  }
  void CRASH_DISK_BYTES;
  await tracker.close();
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(3);
});
