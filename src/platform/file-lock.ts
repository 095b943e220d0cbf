import * as fs from 'node:fs';
import { BlockrelayError } from '../retry/blockrelay-error';
import { loadNative } from './native';

interface FileLockAddon {
  lockExclusive(fd: number): 0 | string | undefined;
}

/**
 * An exclusive lock on a file, held by an open descriptor with flock(2)
 * (native/file-lock.cc): the kernel drops it when the process ends, however
 * it ends, so a lock is never stale and no one has to judge whether a
 * recorded owner still lives. (A pid check followed by a takeover let two
 * instances starting together over a dead owner's lock both win: each
 * removed the other's file.) A process stuck in the kernel on a hung disk
 * keeps its descriptors, and so its lock, until it is really gone.
 *
 * The file holds the owner's pid, for messages only. Release removes the
 * file while still holding the lock; a locker that opened the old file just
 * before it went finds, once it has the lock, that the path names another
 * file (or none) and tries again on the new one.
 */
export class FileLock {
  private fd: number | undefined;

  private constructor(readonly file: string) {}

  /**
   * Takes the lock, or throws BR_LOCKED naming the holder's pid
   * (`describe(pid)` words the message). BR_IO when the file cannot be
   * opened or locked for another reason.
   */
  static acquire(file: string, describe: (pid: number | undefined) => string): FileLock {
    const addon = loadNative<FileLockAddon>();
    for (let attempt = 0; attempt < 5; attempt++) {
      let fd: number;
      try {
        fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
      } catch (err) {
        throw new BlockrelayError('BR_IO', `cannot open lock file ${file}: ${(err as Error).message}`, { cause: err });
      }
      const rc = addon.lockExclusive(fd);
      if (rc !== 0) {
        const holder = rc === 'EWOULDBLOCK' ? readPid(fd) : undefined;
        fs.closeSync(fd);
        if (rc === 'EWOULDBLOCK') throw new BlockrelayError('BR_LOCKED', describe(holder), { details: { file, ...(holder !== undefined ? { pid: holder } : {}) } });
        throw new BlockrelayError('BR_IO', `cannot lock ${file}: ${String(rc)}`, { details: { file } });
      }
      if (!namesSameFile(fd, file)) {
        fs.closeSync(fd);
        continue;
      }
      fs.ftruncateSync(fd, 0);
      fs.writeSync(fd, `${process.pid}\n`, 0);
      const lock = new FileLock(file);
      lock.fd = fd;
      return lock;
    }
    throw new BlockrelayError('BR_LOCKED', `${describe(undefined)}: the lock file keeps being replaced`, { details: { file } });
  }

  get held(): boolean {
    return this.fd !== undefined;
  }

  /** Removes the file and drops the lock (in that order). */
  release(): void {
    if (this.fd === undefined) return;
    const fd = this.fd;
    this.fd = undefined;
    try {
      fs.rmSync(this.file, { force: true });
    } finally {
      fs.closeSync(fd);
    }
  }
}

function readPid(fd: number): number | undefined {
  const buf = Buffer.alloc(32);
  try {
    const n = fs.readSync(fd, buf, 0, buf.length, 0);
    const pid = Number.parseInt(buf.toString('utf8', 0, n), 10);
    return Number.isSafeInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Whether `file` still names the file open on `fd` (a releasing owner may have removed it meanwhile). */
function namesSameFile(fd: number, file: string): boolean {
  try {
    const open = fs.fstatSync(fd);
    const named = fs.statSync(file);
    return open.ino === named.ino && open.dev === named.dev;
  } catch {
    return false;
  }
}
