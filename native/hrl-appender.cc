#include "hrl-appender.h"

#include <cerrno>
#include <iterator>
#include <cstring>
#include <string>
#include <ctime>

#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include "addon-arguments.h"
#include "checksum.h"

namespace blockrelay {

namespace {

// statfs f_type of ext2/3/4 (linux/magic.h EXT4_SUPER_MAGIC).
constexpr long kExt4SuperMagic = 0xEF53;

// Metadata entry fields ([MS-HRL] §2.4; offsets as in src/tracking/hrl-format.ts).
constexpr size_t kMeByteOffset = 0;
constexpr size_t kMeChecksum = 8;
constexpr size_t kMeDataLength = 12;
constexpr size_t kMeTimestamp = 16;
constexpr size_t kMeMetaOperation = 20;
constexpr size_t kMeDataChecksum = 21;
constexpr uint8_t kMetaOperationWrite = 1;
// Metadata header fields (§2.3).
constexpr size_t kMhPreviousLocation = 0;
constexpr size_t kMhValidEntries = 8;
constexpr size_t kMhChecksum = 12;

inline void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void Put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

int PwritevAll(int fd, struct iovec* iov, int count, uint64_t pos) {
  while (count > 0) {
    ssize_t n = pwritev(fd, iov, count, static_cast<off_t>(pos));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    pos += static_cast<uint64_t>(n);
    size_t left = static_cast<size_t>(n);
    while (count > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      iov++;
      count--;
    }
    if (count > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return 0;
}

}  // namespace

int PwriteAll(int fd, const uint8_t* data, size_t length, uint64_t pos) {
  // One buffer is a vector of one: the same retries of short writes and EINTR.
  struct iovec one = {const_cast<uint8_t*>(data), length};
  return PwritevAll(fd, &one, length > 0 ? 1 : 0, pos);
}

HrlAppenderCore::HrlAppenderCore(int fd, uint32_t metadataSizeBytes, uint32_t maxEntryBytes, size_t stagingBytes,
                                 uint64_t writtenEnd, uint64_t lastBlockOffset, uint32_t coalesceMaxEntries,
                                 uint32_t coalesceMinBytes)
    : coalesceMaxEntries_(coalesceMaxEntries < kHrlCoalesceMaxEntries ? coalesceMaxEntries : kHrlCoalesceMaxEntries),
      coalesceMinBytes_(coalesceMinBytes < 1 ? 1 : coalesceMinBytes),
      fd_(fd),
      metadataSizeBytes_(metadataSizeBytes),
      maxEntryBytes_(maxEntryBytes),
      entriesPerBlock_((metadataSizeBytes - kHrlMetadataHeaderBytes) / kHrlMetadataEntryBytes),
      block_(metadataSizeBytes),
      staging_(stagingBytes),
      writtenEnd_(writtenEnd),
      lastBlockOffset_(lastBlockOffset) {
  for (int i = 0; i < kSpareBuffers; i++) {
    spares_.push_back(std::make_unique<AlignedBuffer>());  // allocated when first used
    freeSpares_.push_back(i);
  }
#if defined(__linux__)
  const std::string self = "/proc/self/fd/" + std::to_string(fd);
#if defined(O_DIRECT)
  // The same file once more, for direct writes of whole pages.
  directFd_ = open(self.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
  directOk_.store(directFd_ >= 0);
#endif
  // And once more for the recycler's writeback waits (see syncFd_).
  syncFd_ = open(self.c_str(), O_WRONLY | O_CLOEXEC);
  // Blocks are reserved ahead only on ext4, where it was measured to help
  // and where a truncate to the same size gives back what stays unused.
  // tmpfs, for one, would keep reserved memory until the file is deleted.
  struct statfs fsInfo;
  preallocOk_ = fstatfs(fd, &fsInfo) == 0 && fsInfo.f_type == kExt4SuperMagic;
#else
  preallocOk_ = false;
#endif
}

namespace {
bool PageAligned(const struct iovec* iov, int count, uint64_t pos) {
  if (pos % kBufferAlignBytes != 0) return false;
  for (int i = 0; i < count; i++) {
    if (reinterpret_cast<uintptr_t>(iov[i].iov_base) % kBufferAlignBytes != 0 || iov[i].iov_len % kBufferAlignBytes != 0) return false;
  }
  return true;
}
}  // namespace

// Called with or without mu_ (the recycler writes the spare buffer unlocked);
// directFd_ only changes under mu_ after the recycler has stopped.
int HrlAppenderCore::WriteAtLocked(struct iovec* iov, int count, uint64_t pos, bool allowDirect) {
  if (allowDirect && directOk_.load(std::memory_order_relaxed) && PageAligned(iov, count, pos)) {
    struct iovec copy[4];
    if (count <= 4) {
      for (int i = 0; i < count; i++) copy[i] = iov[i];
      int err = PwritevAll(directFd_, copy, count, pos);
      if (err != EINVAL) return err;
      // The file system refuses direct I/O after all: buffered from now on.
      directOk_.store(false);
    }
  }
  return PwritevAll(fd_, iov, count, pos);
}

void HrlAppenderCore::CloseDirectLocked() {
  directOk_.store(false);
  if (directFd_ >= 0) close(directFd_);
  directFd_ = -1;
  if (syncFd_ >= 0) close(syncFd_);
  syncFd_ = -1;
}

uint32_t HrlAppenderCore::NowTimestamp() {
  int64_t s = static_cast<int64_t>(std::time(nullptr)) - kHrlEpochUnixSeconds;
  if (s < 0) return 0;
  if (s > 0xffffffffll) return 0xffffffffu;
  return static_cast<uint32_t>(s);
}

namespace {
void EncodeEntry(uint8_t* e, uint64_t byteOffset, uint32_t length, uint32_t checksum, uint32_t timestamp) {
  std::memset(e, 0, kHrlMetadataEntryBytes);
  Put64(e + kMeByteOffset, byteOffset);
  Put32(e + kMeDataLength, length);
  Put32(e + kMeTimestamp, timestamp);
  e[kMeMetaOperation] = kMetaOperationWrite;
  Put32(e + kMeDataChecksum, checksum);
  Put32(e + kMeChecksum, HrlChecksum(e, kHrlMetadataEntryBytes, kMeChecksum));
}
}  // namespace

void HrlAppenderCore::AddEntryLocked(uint64_t byteOffset, uint32_t length, uint32_t checksum, uint32_t timestamp) {
  // Every entry is added here, after its overlaps were forgotten and right
  // before its payload is placed at writtenEnd_ + stagedBytes_.
  if (coalescible_.size() < coalesceMaxEntries_ && length >= coalesceMinBytes_) {
    coalescible_[byteOffset] = CoalescibleEntry{length, writtenEnd_ + stagedBytes_, kEntryInOpenBlock, entriesInBlock_};
    openBlockKeys_.push_back(byteOffset);
  }
  uint8_t* e = block_.data() + kHrlMetadataHeaderBytes + static_cast<size_t>(entriesInBlock_) * kHrlMetadataEntryBytes;
  EncodeEntry(e, byteOffset, length, checksum, timestamp);
  entriesInBlock_++;
}

void HrlAppenderCore::PlaceOpenBlockEntriesLocked(uint64_t blockOffset) {
  for (uint64_t key : openBlockKeys_) {
    auto it = coalescible_.find(key);
    // Only an entry of this block can sit under a key inserted in it (an
    // older one there was forgotten before the insert).
    if (it != coalescible_.end() && it->second.entryPos == kEntryInOpenBlock) {
      it->second.entryPos = blockOffset + kHrlMetadataHeaderBytes + static_cast<uint64_t>(it->second.slot) * kHrlMetadataEntryBytes;
    }
  }
  openBlockKeys_.clear();
}

void HrlAppenderCore::ForgetOverlappingLocked(uint64_t byteOffset, uint64_t length) {
  // Extents are disjoint, so sorted by start they are sorted by end too: the
  // overlaps are the one entry starting before byteOffset (if it reaches
  // past it) and those starting inside the range.
  auto it = coalescible_.lower_bound(byteOffset);
  if (it != coalescible_.begin()) {
    auto before = std::prev(it);
    if (before->first + before->second.length > byteOffset) it = before;
  }
  while (it != coalescible_.end() && it->first < byteOffset + length) it = coalescible_.erase(it);
}

bool HrlAppenderCore::InFlightLocked(uint64_t pos, uint64_t length) const {
  for (const SpareRange& r : spareRanges_) {
    if (r.busy && pos < r.pos + r.length && r.pos < pos + length) return true;
  }
  for (const auto& j : rewriteJobs_) {
    if (!j->payload.empty() && pos < j->payloadPos + j->payload.size() && j->payloadPos < pos + length) return true;
    if (j->hasEntry && pos < j->entryPos + kHrlMetadataEntryBytes && j->entryPos < pos + length) return true;
  }
  return false;
}

int HrlAppenderCore::RewriteLocked(CoalescibleEntry& e, uint64_t byteOffset, const uint8_t* data, size_t length,
                                   uint32_t checksum, uint32_t timestamp) {
  const bool payloadStaged = e.payloadPos >= writtenEnd_;
  const bool entryInBlock = e.entryPos == kEntryInOpenBlock;
  const bool entryStaged = !entryInBlock && e.entryPos >= writtenEnd_;
  // A range an I/O thread is still writing (possibly O_DIRECT from the
  // spare buffer) is left alone: the piece is appended instead.
  if (!payloadStaged && InFlightLocked(e.payloadPos, length)) return -1;
  if (!entryInBlock && !entryStaged && InFlightLocked(e.entryPos, kHrlMetadataEntryBytes)) return -1;
  // An entry in the file is rewritten only at a 32-aligned position, where
  // it cannot cross a 512-byte sector (nor a page): a power loss leaves it
  // old or new, never half of each, which recovery would take for a damaged
  // block. Blocks follow payloads of any length, so not every one is aligned.
  if (!entryInBlock && !entryStaged && e.entryPos % kHrlMetadataEntryBytes != 0) return -1;
  std::unique_ptr<RewriteJob> job;
  if (!payloadStaged || (!entryInBlock && !entryStaged)) {
    // Part of it goes to the file, by an I/O thread; bounded, else appended.
    const uint64_t bytes = (payloadStaged ? 0 : length) + kHrlMetadataEntryBytes;
    if (rewriteJobs_.size() >= kMaxRewriteJobs || rewriteBytes_ + bytes > kMaxRewriteBytes || recyclerStop_) return -1;
    job = std::make_unique<RewriteJob>();
  }
  if (payloadStaged) {
    uint8_t* to = staging_.data() + (e.payloadPos - writtenEnd_);
    if (data != nullptr) std::memcpy(to, data, length);
    else std::memset(to, 0, length);
  } else {
    // Copied: the caller may reuse its buffer once Append returns.
    if (data != nullptr) job->payload.assign(data, data + length);
    else job->payload.assign(length, 0);
    job->payloadPos = e.payloadPos;
  }
  uint8_t entry[kHrlMetadataEntryBytes];
  EncodeEntry(entry, byteOffset, static_cast<uint32_t>(length), checksum, timestamp);
  if (entryInBlock) {
    std::memcpy(block_.data() + kHrlMetadataHeaderBytes + static_cast<size_t>(e.slot) * kHrlMetadataEntryBytes, entry, sizeof entry);
  } else if (entryStaged) {
    std::memcpy(staging_.data() + (e.entryPos - writtenEnd_), entry, sizeof entry);
  } else {
    std::memcpy(job->entry, entry, sizeof entry);
    job->hasEntry = true;
    job->entryPos = e.entryPos;
  }
  if (job != nullptr) {
    rewriteBytes_ += job->Bytes();
    rewriteJobs_.push_back(std::move(job));
    StartThreadLocked();
    spareQueueCv_.notify_one();
  }
  rewrites_++;
  rewrittenBytes_ += length;
  rewrittenSinceSync_ = true;
  return 0;
}

int HrlAppenderCore::CoalescePieceLocked(uint64_t byteOffset, const uint8_t* data, size_t length, uint32_t checksum,
                                         uint32_t timestamp) {
  if (coalesceMaxEntries_ > 0) {
    auto it = coalescible_.find(byteOffset);
    if (it != coalescible_.end() && it->second.length == length) {
      int r = RewriteLocked(it->second, byteOffset, data, length, checksum, timestamp);
      if (r >= 0) return r;
    }
    // Every entry it overlaps now has a later overlap (this one).
    ForgetOverlappingLocked(byteOffset, length);
  }
  return AppendPieceLocked(byteOffset, data, length, checksum, timestamp);
}

bool HrlAppenderCore::TakeRewrittenSinceSync() {
  std::lock_guard<std::mutex> lock(mu_);
  const bool r = rewrittenSinceSync_;
  rewrittenSinceSync_ = false;
  return r;
}

namespace {
// Writeback is started for every this many bytes written...
constexpr uint64_t kWritebackChunkBytes = 8ull << 20;
// ...and bytes older than this behind the written end are dropped from the cache.
constexpr uint64_t kCachedTailBytes = 32ull << 20;
// Blocks are reserved up to this far past the written end, this many at a time.
constexpr uint64_t kPreallocAheadBytes = 128ull << 20;
constexpr uint64_t kPreallocStepBytes = 64ull << 20;
}  // namespace

void HrlAppenderCore::StartThreadLocked() {
  if (!ioThreads_.empty() || recyclerStop_) return;
  // Thread 0 only recycles the cache (its waits for writeback must not hold
  // up a spare); the others write spares.
  for (int i = 0; i <= kIoThreads; i++) {
    ioThreads_.emplace_back([this, i]() {
#if defined(__linux__)
      pthread_setname_np(pthread_self(), i == 0 ? "br-hrl-recycle" : "br-hrl-io");
#endif
      IoLoop(i == 0);
    });
  }
}

void HrlAppenderCore::RecycleCacheLocked() {
  if (writtenEnd_ - recycleSignalled_ < kWritebackChunkBytes || recyclerStop_) return;
  recycleSignalled_ = writtenEnd_;
  StartThreadLocked();
  recycleCv_.notify_one();
}

int HrlAppenderCore::WaitSpareLocked() {
  // mu_ is held by the caller: adopt it for the wait and leave it held.
  std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
  spareDoneCv_.wait(lock, [this] { return spareQueueHead_ == spareQueue_.size() && sparesWriting_ == 0 && rewriteJobs_.empty(); });
  lock.release();
  return error_;
}

int HrlAppenderCore::TakeFreeSpareLocked() {
  std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
  spareDoneCv_.wait(lock, [this] { return !freeSpares_.empty(); });
  lock.release();
  const int index = freeSpares_.back();
  freeSpares_.pop_back();
  return index;
}

void HrlAppenderCore::IoLoop(bool recycles) {
  uint64_t writebackStarted = 0;
  uint64_t dropped = 0;
  uint64_t preallocEnd = 0;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (recycles) {
      while (!recyclerStop_ && recycleSignalled_ == writebackStarted) recycleCv_.wait(lock);
    } else {
      while (!recyclerStop_ && spareQueueHead_ == spareQueue_.size() && !RewriteWaitingLocked()) spareQueueCv_.wait(lock);
    }
    // Rewrites first: they are small, and the appends they replace would be
    // spare writes of their own; behind a steady stream of spares they would
    // wait, fill their bound, and turn every later rewrite into an append.
    if (!recycles && spareQueueHead_ < spareQueue_.size() && !RewriteWaitingLocked()) {
      // A full staging buffer: written even when stopping, before the descriptor goes.
      const SpareWrite w = spareQueue_[spareQueueHead_++];
      if (spareQueueHead_ == spareQueue_.size()) {
        spareQueue_.clear();
        spareQueueHead_ = 0;
      }
      sparesWriting_++;
      const bool direct = directWrites_ < kMaxDirectWrites;
      if (direct) directWrites_++;
      lock.unlock();
      struct iovec iov = {spares_[w.index]->data(), w.length};
      int err = WriteAtLocked(&iov, 1, w.pos, direct);
      lock.lock();
      if (direct) directWrites_--;
      if (err != 0 && error_ == 0) error_ = err;
      sparesWriting_--;
      spareRanges_[w.index].busy = false;
      freeSpares_.push_back(w.index);
      spareDoneCv_.notify_all();
      continue;
    }
    if (!recycles && RewriteWaitingLocked()) {
      // A rewrite (written even when stopping, like a spare). Jobs run in
      // queue order; two never cover the same range (see InFlightLocked).
      RewriteJob* job = nullptr;
      for (auto& j : rewriteJobs_) {
        if (!j->running) {
          job = j.get();
          break;
        }
      }
      job->running = true;
      lock.unlock();
      // Buffered through fd_, never the O_DIRECT descriptor. The 32 bytes
      // as a write of their own, after the payload's: 32-aligned, they lie
      // in one sector, so a power loss leaves the old entry or the new one.
      int err = job->payload.empty() ? 0 : PwriteAll(fd_, job->payload.data(), job->payload.size(), job->payloadPos);
      if (err == 0 && job->hasEntry) err = PwriteAll(fd_, job->entry, kHrlMetadataEntryBytes, job->entryPos);
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
      // Starts writeback of the rewritten payload at once (without waiting),
      // so rewritten log pages do not pile up dirty: with the disk's own
      // pages they would pass the kernel's dirty threshold, and then every
      // writer of the machine, the tap's disk writes included, is throttled
      // to the device's pace (measured: coalescing was slower than appending
      // until this). Through syncFd_, for the reason the recycler gives.
      if (err == 0 && !job->payload.empty() && syncFd_ >= 0) {
        sync_file_range(syncFd_, static_cast<off_t>(job->payloadPos), static_cast<off_t>(job->payload.size()), SYNC_FILE_RANGE_WRITE);
      }
#endif
      lock.lock();
      if (err != 0 && error_ == 0) error_ = err;
      // Set again now it is written: a flush that took the flag while this
      // job was still queued may have started its fdatasync before the
      // write, so the next flush must sync even if nothing else changed.
      rewrittenSinceSync_ = true;
      for (auto it = rewriteJobs_.begin(); it != rewriteJobs_.end(); ++it) {
        if (it->get() == job) {
          rewriteBytes_ -= job->Bytes();
          rewriteJobs_.erase(it);
          break;
        }
      }
      spareDoneCv_.notify_all();
      continue;
    }
    if (recyclerStop_) return;
    if (!recycles) continue;
    const uint64_t end = recycleSignalled_;
    lock.unlock();
#if defined(__linux__) && defined(FALLOC_FL_KEEP_SIZE)
    // Reserves the blocks ahead of the written end in large steps, so the
    // appends land in allocated (unwritten) extents. Measured on this VM's
    // ext4 (fio, 1 MiB sequential appends to a fresh file): buffered
    // appends that allocate as the file grows took 33-52% of a core, into
    // reserved blocks 20-23% at the same rate; direct appends were the same
    // either way within the noise (1.5-1.6 GB/s). KEEP_SIZE leaves the
    // file's size, so nothing a reader sees changes; Finish and Abandon
    // give back what stays unused.
    if (preallocOk_ && syncFd_ >= 0 && preallocEnd < end + kPreallocAheadBytes - kPreallocStepBytes) {
      const uint64_t from = preallocEnd > end ? preallocEnd : end;
      const uint64_t to = end + kPreallocAheadBytes;
      if (fallocate(syncFd_, FALLOC_FL_KEEP_SIZE, static_cast<off_t>(from), static_cast<off_t>(to - from)) == 0) {
        preallocEnd = to;
        preallocated_.store(true);
      } else {
        // Not supported here, or the space is short: append as before (a
        // write that cannot get its blocks fails on its own).
        preallocOk_ = false;
      }
    }
#endif
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
    // Through syncFd_, never fd_: a wait for writeback reports a writeback
    // error once per open file and marks it seen for that file (errseq).
    // Seen here on the log's own descriptor, it would be gone for the
    // FLUSH's fdatasync, which would then answer OK for pages that never
    // reached the disk. On a descriptor of its own the error is still
    // there for fd_'s next fdatasync.
    if (syncFd_ >= 0) {
      // Queues the new range for writeback without waiting for it.
      sync_file_range(syncFd_, static_cast<off_t>(writebackStarted), static_cast<off_t>(end - writebackStarted), SYNC_FILE_RANGE_WRITE);
      if (end > kCachedTailBytes && end - kCachedTailBytes > dropped) {
        const uint64_t dropEnd = end - kCachedTailBytes;
        // Waits for that older range's writeback (long started), then drops its clean pages.
        sync_file_range(syncFd_, static_cast<off_t>(dropped), static_cast<off_t>(dropEnd - dropped),
                        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
        posix_fadvise(syncFd_, static_cast<off_t>(dropped), static_cast<off_t>(dropEnd - dropped), POSIX_FADV_DONTNEED);
        dropped = dropEnd;
      }
    }
#endif
    writebackStarted = end;
    lock.lock();
  }
}

void HrlAppenderCore::StopRecyclerLocked(std::unique_lock<std::mutex>& lock) {
  recyclerStop_ = true;
  recycleCv_.notify_all();
  spareQueueCv_.notify_all();
  if (!ioThreads_.empty()) {
    std::vector<std::thread> threads;
    threads.swap(ioThreads_);
    lock.unlock();
    for (auto& t : threads) t.join();
    lock.lock();
  }
}

HrlAppenderCore::~HrlAppenderCore() {
  std::unique_lock<std::mutex> lock(mu_);
  StopRecyclerLocked(lock);
  CloseDirectLocked();
}

int HrlAppenderCore::WriteStagedLocked() {
  if (stagedBytes_ == 0) return 0;
  if (error_ != 0) return error_;
  if (recyclerStop_) {
    int err = WaitSpareLocked();
    if (err != 0) return err;
    struct iovec iov = {staging_.data(), stagedBytes_};
    err = WriteAtLocked(&iov, 1, writtenEnd_);
    if (err != 0) return err;
  } else {
    const int index = TakeFreeSpareLocked();
    AlignedBuffer& spare = *spares_[static_cast<size_t>(index)];
    if (spare.size() < staging_.size()) spare.resize(staging_.size());
    staging_.swap(spare);
    spareQueue_.push_back({index, stagedBytes_, writtenEnd_});
    spareRanges_[index] = SpareRange{true, writtenEnd_, stagedBytes_};
    StartThreadLocked();
    spareQueueCv_.notify_one();
  }
  writtenEnd_ += stagedBytes_;
  stagedBytes_ = 0;
  RecycleCacheLocked();
  return 0;
}

int HrlAppenderCore::CloseBlockLocked() {
  if (entriesInBlock_ == 0) {
    int err = WriteStagedLocked();
    return err != 0 ? err : WaitSpareLocked();
  }
  // Everything before the block is on its way to the file first, so a
  // flush (block close, then fdatasync) covers it.
  if (int err = WaitSpareLocked(); err != 0) return err;
  const uint64_t blockOffset = writtenEnd_ + stagedBytes_;
  uint8_t* h = block_.data();
  std::memset(h, 0, kHrlMetadataHeaderBytes);
  Put64(h + kMhPreviousLocation, blockOffset - lastBlockOffset_);
  Put32(h + kMhValidEntries, entriesInBlock_);
  Put32(h + kMhChecksum, HrlChecksum(h, kHrlMetadataHeaderBytes, kMhChecksum));
  struct iovec iov[2];
  int count = 0;
  if (stagedBytes_ > 0) {
    iov[count].iov_base = staging_.data();
    iov[count].iov_len = stagedBytes_;
    count++;
  }
  iov[count].iov_base = block_.data();
  iov[count].iov_len = block_.size();
  count++;
  // Buffered, never direct: a block is closed by a FLUSH (or a seal) on the
  // calling thread, and its fdatasync follows at once and writes these pages
  // anyway. A direct write would make the caller (the event loop) wait for
  // the device, and the sync after it wait once more.
  int err = WriteAtLocked(iov, count, writtenEnd_, false);
  if (err != 0) return err;
  PlaceOpenBlockEntriesLocked(blockOffset);
  writtenEnd_ = blockOffset + metadataSizeBytes_;
  stagedBytes_ = 0;
  lastBlockOffset_ = blockOffset;
  totalEntries_ += entriesInBlock_;
  entriesInBlock_ = 0;
  std::memset(block_.data(), 0, block_.size());
  RecycleCacheLocked();
  return 0;
}

int HrlAppenderCore::StageBlockLocked() {
  if (metadataSizeBytes_ > staging_.size()) return CloseBlockLocked();
  if (metadataSizeBytes_ > staging_.size() - stagedBytes_) {
    int err = WriteStagedLocked();
    if (err != 0) return err;
  }
  const uint64_t blockOffset = writtenEnd_ + stagedBytes_;
  uint8_t* h = block_.data();
  std::memset(h, 0, kHrlMetadataHeaderBytes);
  Put64(h + kMhPreviousLocation, blockOffset - lastBlockOffset_);
  Put32(h + kMhValidEntries, entriesInBlock_);
  Put32(h + kMhChecksum, HrlChecksum(h, kHrlMetadataHeaderBytes, kMhChecksum));
  std::memcpy(staging_.data() + stagedBytes_, block_.data(), metadataSizeBytes_);
  PlaceOpenBlockEntriesLocked(blockOffset);
  stagedBytes_ += metadataSizeBytes_;
  lastBlockOffset_ = blockOffset;
  totalEntries_ += entriesInBlock_;
  entriesInBlock_ = 0;
  std::memset(block_.data(), 0, block_.size());
  return 0;
}

int HrlAppenderCore::AppendPieceLocked(uint64_t byteOffset, const uint8_t* data, size_t length, uint32_t checksum,
                                       uint32_t timestamp) {
  int err = 0;
  if (entriesInBlock_ == entriesPerBlock_) {
    // A full block goes out with the payloads staged after it, in one of
    // the staging buffer's large writes (a flush writes what is staged).
    err = StageBlockLocked();
    if (err != 0) return err;
  }
  if (length <= staging_.size() - stagedBytes_) {
    AddEntryLocked(byteOffset, static_cast<uint32_t>(length), checksum, timestamp);
    if (data != nullptr) std::memcpy(staging_.data() + stagedBytes_, data, length);
    else std::memset(staging_.data() + stagedBytes_, 0, length);
    stagedBytes_ += length;
    return 0;
  }
  // Room first: the entry is added only once its payload can follow it
  // with no wait in between (opMu_ keeps other callers out of the wait too).
  err = WriteStagedLocked();
  if (err != 0) return err;
  AddEntryLocked(byteOffset, static_cast<uint32_t>(length), checksum, timestamp);
  if (length >= staging_.size()) {
    if (data == nullptr) {
      if (zeroes_.size() < length) {
        zeroes_.resize(length);
        std::memset(zeroes_.data(), 0, length);
      }
      data = zeroes_.data();
    }
    struct iovec one = {const_cast<uint8_t*>(data), length};
    err = WriteAtLocked(&one, 1, writtenEnd_);
    if (err != 0) return err;
    writtenEnd_ += length;
    RecycleCacheLocked();
  } else {
    if (data != nullptr) std::memcpy(staging_.data(), data, length);
    else std::memset(staging_.data(), 0, length);
    stagedBytes_ = length;
  }
  return 0;
}

int HrlAppenderCore::Append(uint64_t byteOffset, const uint8_t* data, size_t length, uint32_t timestamp) {
  std::lock_guard<std::mutex> op(opMu_);
  std::lock_guard<std::mutex> lock(mu_);
  if (error_ != 0) return error_;
  for (size_t at = 0; at < length; at += maxEntryBytes_) {
    size_t n = length - at < maxEntryBytes_ ? length - at : maxEntryBytes_;
    int err = CoalescePieceLocked(byteOffset + at, data + at, n, HrlChecksum(data + at, n, -1), timestamp);
    if (err != 0) {
      error_ = err;
      return err;
    }
  }
  return 0;
}

int HrlAppenderCore::AppendZeroes(uint64_t byteOffset, uint64_t length, uint32_t timestamp) {
  std::lock_guard<std::mutex> op(opMu_);
  std::lock_guard<std::mutex> lock(mu_);
  if (error_ != 0) return error_;
  for (uint64_t at = 0; at < length; at += maxEntryBytes_) {
    size_t n = static_cast<size_t>(length - at < maxEntryBytes_ ? length - at : maxEntryBytes_);
    // The checksum of zero bytes: ~0.
    int err = CoalescePieceLocked(byteOffset + at, nullptr, n, 0xffffffffu, timestamp);
    if (err != 0) {
      error_ = err;
      return err;
    }
  }
  return 0;
}

int HrlAppenderCore::CloseBlock() {
  std::lock_guard<std::mutex> op(opMu_);
  std::lock_guard<std::mutex> lock(mu_);
  if (error_ != 0) return error_;
  int err = CloseBlockLocked();
  if (err != 0) error_ = err;
  return err;
}

int HrlAppenderCore::Finish() {
  std::lock_guard<std::mutex> op(opMu_);
  std::unique_lock<std::mutex> lock(mu_);
  // The descriptor is closed soon after: the recycler lets go of it first.
  StopRecyclerLocked(lock);
  if (error_ != 0) {
    CloseDirectLocked();
    ReleasePreallocLocked();
    return error_;
  }
  int err = CloseBlockLocked();
  CloseDirectLocked();
  ReleasePreallocLocked();
  error_ = err != 0 ? err : EBADF;
  return err;
}

void HrlAppenderCore::Abandon() {
  std::lock_guard<std::mutex> op(opMu_);
  std::unique_lock<std::mutex> lock(mu_);
  StopRecyclerLocked(lock);
  CloseDirectLocked();
  ReleasePreallocLocked();
  if (error_ == 0) error_ = EBADF;
}

void HrlAppenderCore::ReleasePreallocLocked() {
  if (!preallocated_.exchange(false)) return;
  // A truncate to the size the file has frees the blocks reserved past its
  // end (ext4 truncates preallocated blocks even when the size stays). Best
  // effort: what stays reserved only costs space until the log is deleted.
  struct stat st;
  if (fstat(fd_, &st) == 0) (void)ftruncate(fd_, st.st_size);
}

uint64_t HrlAppenderCore::SizeBytesLocked() const {
  return writtenEnd_ + stagedBytes_ + (entriesInBlock_ > 0 ? metadataSizeBytes_ : 0);
}

uint64_t HrlAppenderCore::SizeBytes() {
  std::lock_guard<std::mutex> lock(mu_);
  return SizeBytesLocked();
}

HrlAppenderCore::State HrlAppenderCore::GetState() {
  std::lock_guard<std::mutex> lock(mu_);
  State s;
  s.writtenEnd = writtenEnd_;
  s.stagedBytes = stagedBytes_;
  s.entriesInBlock = entriesInBlock_;
  s.totalEntries = totalEntries_;
  s.error = error_;
  s.rewrites = rewrites_;
  s.rewrittenBytes = rewrittenBytes_;
  return s;
}

namespace {

const napi_type_tag kAppenderTag = {0x6a1c2f0e5b7d4e21ull, 0x9f3b8c4d2e1a7f60ull};


// Logs a zero range on the libuv thread pool: a large TRIM or WRITE_ZEROES
// becomes that many bytes of zero-filled entries (128 MiB took 79 ms), which
// must not stall the event loop. Memory stays bounded: one zero buffer of at
// most maxEntryBytes, reused.
class AppendZeroesWorker : public Napi::AsyncWorker {
 public:
  AppendZeroesWorker(Napi::Env env, std::shared_ptr<HrlAppenderCore> core, uint64_t offset, uint64_t length, uint32_t timestamp)
      : Napi::AsyncWorker(env, "blockrelay-hrl-append-zeroes"),
        deferred_(Napi::Promise::Deferred::New(env)),
        core_(std::move(core)),
        offset_(offset),
        length_(length),
        timestamp_(timestamp) {}

  Napi::Promise Promise() const { return deferred_.Promise(); }

  void Execute() override { error_ = core_->AppendZeroes(offset_, length_, timestamp_); }
  void OnOK() override { deferred_.Resolve(Napi::Number::New(Env(), error_)); }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<HrlAppenderCore> core_;
  const uint64_t offset_;
  const uint64_t length_;
  const uint32_t timestamp_;
  int error_ = 0;
};

class HrlAppenderWrap : public Napi::ObjectWrap<HrlAppenderWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "HrlAppender",
                       {
                           InstanceMethod<&HrlAppenderWrap::AppendJs>("append"),
                           InstanceMethod<&HrlAppenderWrap::AppendZeroesJs>("appendZeroes"),
                           InstanceMethod<&HrlAppenderWrap::AppendZeroesAsyncJs>("appendZeroesAsync"),
                           InstanceMethod<&HrlAppenderWrap::CloseBlockJs>("closeBlock"),
                           InstanceMethod<&HrlAppenderWrap::FinishJs>("finish"),
                           InstanceMethod<&HrlAppenderWrap::AbandonJs>("abandon"),
                           InstanceMethod<&HrlAppenderWrap::StateJs>("state"),
                           InstanceMethod<&HrlAppenderWrap::SizeBytesJs>("sizeBytes"),
                           InstanceMethod<&HrlAppenderWrap::TakeRewrittenSinceSyncJs>("takeRewrittenSinceSync"),
                       });
  }

  // new HrlAppender(fd, metadataSizeBytes, maxEntryBytes, stagingBytes, writtenEnd, lastBlockOffset[, coalesceMaxEntries[, coalesceMinBytes]])
  explicit HrlAppenderWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<HrlAppenderWrap>(info) {
    double fd, ms, maxEntry, staging, writtenEnd, lastBlock, coalesceMax = 0, coalesceMin = 1;
    if (!NumberArg(info, 0, 1 << 30, fd) || !NumberArg(info, 1, 1 << 30, ms) || !NumberArg(info, 2, 4294967295.0, maxEntry) ||
        !NumberArg(info, 3, 1 << 30, staging) || !NumberArg(info, 4, kMaxSafe, writtenEnd) || !NumberArg(info, 5, kMaxSafe, lastBlock) ||
        (info.Length() > 6 && !NumberArg(info, 6, kHrlCoalesceMaxEntries, coalesceMax)) ||
        (info.Length() > 7 && !NumberArg(info, 7, 4294967295.0, coalesceMin)) ||
        ms < kHrlMetadataHeaderBytes + kHrlMetadataEntryBytes || static_cast<uint32_t>(ms) % kHrlMetadataEntryBytes != 0 || maxEntry < 1) {
      Napi::TypeError::New(info.Env(), "HrlAppender(fd, metadataSizeBytes, maxEntryBytes, stagingBytes, writtenEnd, lastBlockOffset[, coalesceMaxEntries[, coalesceMinBytes]]): bad argument")
          .ThrowAsJavaScriptException();
      return;
    }
    core_ = std::make_shared<HrlAppenderCore>(static_cast<int>(fd), static_cast<uint32_t>(ms), static_cast<uint32_t>(maxEntry),
                                              static_cast<size_t>(staging), static_cast<uint64_t>(writtenEnd),
                                              static_cast<uint64_t>(lastBlock), static_cast<uint32_t>(coalesceMax),
                                              static_cast<uint32_t>(coalesceMin));
    napi_type_tag_object(info.Env(), info.This(), &kAppenderTag);
  }

  std::shared_ptr<HrlAppenderCore> core() const { return core_; }

 private:
  Napi::Value AppendJs(const Napi::CallbackInfo& info) {
    double offset, ts;
    if (!NumberArg(info, 0, kMaxSafe, offset) || info.Length() < 3 || !info[1].IsTypedArray() || !NumberArg(info, 2, 4294967295.0, ts)) {
      Napi::TypeError::New(info.Env(), "append(byteOffset, data, timestamp): bad argument").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    Napi::TypedArray arr = info[1].As<Napi::TypedArray>();
    const uint8_t* data = static_cast<const uint8_t*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
    if (offset + static_cast<double>(arr.ByteLength()) > kMaxSafe) {
      Napi::RangeError::New(info.Env(), "append: range beyond 2^53").ThrowAsJavaScriptException();
      return Napi::Value();
    }
    int err = core_ == nullptr ? EBADF : core_->Append(static_cast<uint64_t>(offset), data, arr.ByteLength(), static_cast<uint32_t>(ts));
    return Napi::Number::New(info.Env(), err);
  }

  // (byteOffset, length, timestamp) of a zero range; throws a TypeError naming `method` when they are bad.
  static bool ZeroRangeArgs(const Napi::CallbackInfo& info, const char* method, double& offset, double& length, double& ts) {
    if (NumberArg(info, 0, kMaxSafe, offset) && NumberArg(info, 1, kMaxSafe, length) && NumberArg(info, 2, 4294967295.0, ts) && offset + length <= kMaxSafe) return true;
    Napi::TypeError::New(info.Env(), std::string(method) + "(byteOffset, length, timestamp): bad argument").ThrowAsJavaScriptException();
    return false;
  }

  Napi::Value AppendZeroesJs(const Napi::CallbackInfo& info) {
    double offset, length, ts;
    if (!ZeroRangeArgs(info, "appendZeroes", offset, length, ts)) return Napi::Value();
    int err = core_ == nullptr ? EBADF : core_->AppendZeroes(static_cast<uint64_t>(offset), static_cast<uint64_t>(length), static_cast<uint32_t>(ts));
    return Napi::Number::New(info.Env(), err);
  }

  // appendZeroesAsync(byteOffset, length, timestamp): Promise<errno>, carried out on the thread pool.
  Napi::Value AppendZeroesAsyncJs(const Napi::CallbackInfo& info) {
    double offset, length, ts;
    if (!ZeroRangeArgs(info, "appendZeroesAsync", offset, length, ts)) return Napi::Value();
    if (core_ == nullptr) {
      Napi::Promise::Deferred d = Napi::Promise::Deferred::New(info.Env());
      d.Resolve(Napi::Number::New(info.Env(), EBADF));
      return d.Promise();
    }
    auto* worker = new AppendZeroesWorker(info.Env(), core_, static_cast<uint64_t>(offset), static_cast<uint64_t>(length), static_cast<uint32_t>(ts));
    Napi::Promise promise = worker->Promise();
    worker->Queue();
    return promise;
  }

  Napi::Value CloseBlockJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), core_ == nullptr ? EBADF : core_->CloseBlock());
  }

  Napi::Value FinishJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), core_ == nullptr ? EBADF : core_->Finish());
  }

  Napi::Value AbandonJs(const Napi::CallbackInfo& info) {
    if (core_ != nullptr) core_->Abandon();
    return info.Env().Undefined();
  }

  // [writtenEnd, stagedBytes, entriesInBlock, totalEntries, error, rewrites, rewrittenBytes]
  Napi::Value StateJs(const Napi::CallbackInfo& info) {
    Napi::Float64Array out = Napi::Float64Array::New(info.Env(), 7);
    if (core_ == nullptr) return out;
    HrlAppenderCore::State s = core_->GetState();
    out[0] = static_cast<double>(s.writtenEnd);
    out[1] = static_cast<double>(s.stagedBytes);
    out[2] = static_cast<double>(s.entriesInBlock);
    out[3] = static_cast<double>(s.totalEntries);
    out[4] = static_cast<double>(s.error);
    out[5] = static_cast<double>(s.rewrites);
    out[6] = static_cast<double>(s.rewrittenBytes);
    return out;
  }

  Napi::Value TakeRewrittenSinceSyncJs(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), core_ != nullptr && core_->TakeRewrittenSinceSync());
  }

  Napi::Value SizeBytesJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), core_ == nullptr ? 0 : static_cast<double>(core_->SizeBytes()));
  }

  std::shared_ptr<HrlAppenderCore> core_;
};

}  // namespace

std::shared_ptr<HrlAppenderCore> HrlAppenderCoreOf(Napi::Value value) {
  if (!value.IsObject()) return nullptr;
  bool tagged = false;
  if (napi_check_object_type_tag(value.Env(), value, &kAppenderTag, &tagged) != napi_ok || !tagged) return nullptr;
  HrlAppenderWrap* wrap = HrlAppenderWrap::Unwrap(value.As<Napi::Object>());
  return wrap == nullptr ? nullptr : wrap->core();
}

void InitHrlAppender(Napi::Env env, Napi::Object exports) {
  exports.Set("HrlAppender", HrlAppenderWrap::Define(env));
}

}  // namespace blockrelay
