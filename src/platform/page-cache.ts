import { MAX_FD, requireInteger } from './addon-arguments';
import { loadNative } from './native';

interface PageCacheAddon {
  dropFileCache(fd: number, offset: number, length: number): 0 | string | undefined;
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
