// posix_fadvise(POSIX_FADV_DONTNEED) for files that are written, made
// durable and then not read soon: undo-journal segments (read only at
// failover, export or rollback) and replication targets (read back only for
// pre-images and resync). Buffered writes leave every byte in a page-cache
// page; dropping the clean pages once the range is synced frees them at
// once, so the next write reuses them instead of taking fresh ones (on a VM
// with free page reporting a fresh page is a host fault). Node exposes no
// fadvise.
#ifndef BLOCKRELAY_PAGE_CACHE_H_
#define BLOCKRELAY_PAGE_CACHE_H_

#include <napi.h>

namespace blockrelay {

// Registers dropFileCache(fd, offset, length): posix_fadvise(fd, offset,
// length, POSIX_FADV_DONTNEED), synchronous (it drops clean pages and starts
// writeback of dirty ones without waiting for it). length 0 means to the end
// of the file. Returns 0 or an errno name. Never changes the file's content:
// dirty pages are not dropped, a later read fills the cache again.
// Registers dropFileCacheAsync(fd, offset, length) too: the same call on a
// libuv pool thread, a Promise of 0 or an errno name (it never rejects).
void InitPageCache(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_PAGE_CACHE_H_
