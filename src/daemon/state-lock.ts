import * as path from 'node:path';
import * as fs from 'node:fs';
import { BlockrelayError } from '../retry/blockrelay-error';
import { FileLock } from '../platform/file-lock';

/**
 * One blockrelay instance per state directory: `DIR/blockrelay.lock`,
 * locked with flock(2) for as long as the instance runs (see FileLock: the
 * kernel drops the lock when the process ends, so a killed owner leaves
 * nothing stale). The file holds the owner's pid, for messages.
 */
/** Lock files this process holds, so a second instance within one process is refused too. */
const heldHere = new Set<string>();

export class StateLock {
  private lock: FileLock | undefined;

  constructor(readonly dir: string) {}

  get file(): string {
    return path.join(this.dir, 'blockrelay.lock');
  }

  acquire(): void {
    fs.mkdirSync(this.dir, { recursive: true });
    if (heldHere.has(path.resolve(this.file))) {
      throw new BlockrelayError('BR_LOCKED', `state directory ${this.dir} is in use by this process (${this.file})`, { details: { pid: process.pid } });
    }
    this.lock = FileLock.acquire(this.file, (pid) => `state directory ${this.dir} is in use by ${pid === undefined ? 'another process' : `process ${pid}`} (${this.file})`);
    heldHere.add(path.resolve(this.file));
  }

  release(): void {
    if (this.lock === undefined) return;
    const lock = this.lock;
    this.lock = undefined;
    heldHere.delete(path.resolve(this.file));
    lock.release();
  }
}
