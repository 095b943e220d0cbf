import { MAX_FD, requireInteger } from './addon-arguments';
import { loadNative } from './native';

interface PageCacheAddon {
  dropFileCache(fd: number, offset: number, length: number): 0 | string | undefined;
  dropFileCacheAsync(fd: number, offset: number, length: number): Promise<0 | string> | undefined;
}

/**
 * Asks the kernel to drop the page-cache pages of `[offsetBytes,
 * offsetBytes + lengthBytes)` of the open file `fd` (`lengthBytes` 0: to
 * the end of the file), with posix_fadvise(POSIX_FADV_DONTNEED)
 * (native/page-cache.cc). Meant for data written once, made durable, and
 * not read again soon: undo-journal segments, read only at failover, export
 * or rollback. Call it after the range is synced: clean pages are freed at
 * once (and reused by the next allocation, before this VM's free page
 * reporting hands them to the host, so the next write does not take a host
 * fault per page); dirty pages are left in place (their writeback is only
 * started). The file's content never changes: a later read fills the cache
 * from the device.
 *
 * Advisory: returns undefined when done, or the errno name when the kernel
 * refused (ESPIPE for a pipe, EBADF for a closed descriptor). Callers treat
 * a refusal as "the pages stay cached", which costs memory, never data.
 */
export function dropFileCache(fd: number, offsetBytes: number, lengthBytes: number): string | undefined {
  requireInteger('fd', fd, 0, MAX_FD);
  requireInteger('offsetBytes', offsetBytes, 0, Number.MAX_SAFE_INTEGER);
  requireInteger('lengthBytes', lengthBytes, 0, Number.MAX_SAFE_INTEGER);
  const rc = loadNative<PageCacheAddon>().dropFileCache(fd, offsetBytes, lengthBytes);
  if (rc === 0) return undefined;
  return rc ?? 'EINVAL';
}

/**
 * Drops a file's durable pages from the page cache after each sync, on the
 * thread pool (posix_fadvise there: with dirty pages in the range the kernel
 * submits their writeback before it returns, which may wait on the device's
 * queue, and a hop's event loop must not wait with it).
 *
 * At most one drop runs; a request while one runs is remembered and run once
 * after it, so the work stays bounded however often syncs end. Each drop
 * covers the whole file: pages written after the sync that asked are still
 * dirty and stay (their writeback is only started), so the call never
 * touches data that is not yet durable. Advisory: a refusal or a throw is
 * kept as `lastRefusal`, never reported as a failure of the sync it
 * followed.
 *
 * Why a replication target wants this (measured, docs/transport.md, "Page
 * cache that grows"): a VMDK written at 200 MB/s grows the cache by 200 MB/s
 * of pages nobody reads soon; on a VM whose free pages are reported to the
 * host each fresh page costs a host fault, and everywhere they crowd out
 * data that is read again.
 */
export class DurablePageDropper {
  private running: Promise<void> | undefined;
  private again = false;
  private closed = false;
  /** The errno name of the last refused drop, if any (advisory: no code acts on it; tests read it). */
  lastRefusal: string | undefined;

  /**
   * `fd` is read at each drop: the descriptor of a handle this object does
   * not own. `runJob` runs the drop's pool job under the owner's bound on
   * pool jobs per file (FileSpan's PoolJobLimit), so a hung file holds no
   * more pool threads for its drop than for its other I/O; by default the
   * job runs as is.
   */
  constructor(
    private readonly fd: () => number,
    private readonly runJob: <T>(job: () => Promise<T>) => Promise<T> = (job) => job(),
  ) {}

  /** After a sync of the file succeeded: drops its clean pages in the background. */
  synced(): void {
    if (this.closed) return;
    if (this.running !== undefined) {
      this.again = true;
      return;
    }
    this.running = this.runDrops().finally(() => {
      this.running = undefined;
    });
  }

  /** Before the descriptor is closed: no new drop starts, and a running one ends (its fd must not be reused under it). */
  async close(): Promise<void> {
    this.closed = true;
    this.again = false;
    await this.running;
  }

  private async runDrops(): Promise<void> {
    do {
      this.again = false;
      try {
        const fd = this.fd();
        requireInteger('fd', fd, 0, MAX_FD);
        const rc = await this.runJob(() => loadNative<PageCacheAddon>().dropFileCacheAsync(fd, 0, 0) ?? Promise.resolve('EINVAL'));
        this.lastRefusal = rc === 0 ? this.lastRefusal : rc;
      } catch (err) {
        this.lastRefusal = (err as { code?: string }).code ?? 'EINVAL';
      }
    } while (this.again && !this.closed);
  }
}
