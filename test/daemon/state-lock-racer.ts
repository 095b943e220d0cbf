/**
 * A process racing for a state lock (test/daemon/state-lock.test.ts): waits
 * for the go file, tries StateLock.acquire once, prints "won" or the error
 * code, and when it won holds the lock for the given milliseconds.
 */
import * as fs from 'node:fs';
import { StateLock } from '../../src/daemon/state-lock';

const [dir, goFile, holdMs] = process.argv.slice(2) as [string, string, string];
while (!fs.existsSync(goFile)) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1);
const lock = new StateLock(dir);
try {
  lock.acquire();
  process.stdout.write('won\n');
  setTimeout(() => lock.release(), Number(holdMs));
} catch (err) {
  process.stdout.write(`${(err as { code?: string }).code ?? String(err)}\n`);
}
