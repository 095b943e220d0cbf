import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockrelayError } from '../retry/blockrelay-error';
import { processAlive } from '../platform/process-liveness';

/**
 * One blockrelay instance per state directory: `DIR/blockrelay.lock` holds
 * the owner's pid. A lock whose pid is no longer alive is stale (the owner
 * was killed) and is taken over; a live one refuses the second instance.
 */
/** Lock files this process holds, so a second instance within one process is refused too. */
const heldHere = new Set<string>();

export class StateLock {
  private held = false;

  constructor(readonly dir: string) {}

  get file(): string {
    return path.join(this.dir, 'blockrelay.lock');
  }

  acquire(): void {
    fs.mkdirSync(this.dir, { recursive: true });
    if (heldHere.has(path.resolve(this.file))) {
      throw new BlockrelayError('BR_LOCKED', `state directory ${this.dir} is in use by this process (${this.file})`, { details: { pid: process.pid } });
    }
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        fs.writeFileSync(this.file, `${process.pid}\n`, { flag: 'wx' });
        this.held = true;
        heldHere.add(path.resolve(this.file));
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw new BlockrelayError('BR_IO', `cannot create ${this.file}: ${(err as Error).message}`, { cause: err });
      }
      const owner = Number.parseInt(fs.readFileSync(this.file, 'utf8'), 10);
      if (Number.isInteger(owner) && owner > 0 && owner !== process.pid && processAlive(owner)) {
        throw new BlockrelayError('BR_LOCKED', `state directory ${this.dir} is in use by process ${owner} (${this.file})`, { details: { pid: owner } });
      }
      fs.rmSync(this.file, { force: true });
    }
    throw new BlockrelayError('BR_LOCKED', `could not take ${this.file}`);
  }

  release(): void {
    if (!this.held) return;
    this.held = false;
    heldHere.delete(path.resolve(this.file));
    fs.rmSync(this.file, { force: true });
  }
}
