// HrlAppender: the append half of the [MS-HRL] log writer in C++, so the
// source tap's native data path (tap-transmission.cc) can log a write from
// its connection thread without a trip through JavaScript. The layout is the
// one src/tracking/hrl-writer.ts documents: payloads, then the metadata block
// describing them. Header, anchor, durability and sealing stay in
// TypeScript; this class only owns the open block and the staging buffer.
#ifndef BLOCKRELAY_HRL_APPENDER_H_
#define BLOCKRELAY_HRL_APPENDER_H_

#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

struct iovec;

namespace blockrelay {

constexpr uint32_t kHrlMetadataHeaderBytes = 32;
constexpr uint32_t kHrlMetadataEntryBytes = 32;
// Seconds between the Unix epoch and 2000-01-01, the HRL timestamp epoch.
constexpr int64_t kHrlEpochUnixSeconds = 946684800;

// Alignment of AlignedBuffer: a page, so a buffer is never split across
// more pages than its length needs (and would suit O_DIRECT).
constexpr size_t kBufferAlignBytes = 4096;

// A page-aligned heap buffer that grows without keeping its contents.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t n) {
    resize(n);
    if (n > 0) std::memset(p_, 0, n);
  }
  ~AlignedBuffer() { std::free(p_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  uint8_t* data() { return p_; }
  const uint8_t* data() const { return p_; }
  size_t size() const { return n_; }
  size_t capacity() const { return cap_; }
  void swap(AlignedBuffer& other) {
    std::swap(p_, other.p_);
    std::swap(n_, other.n_);
    std::swap(cap_, other.cap_);
  }
  // Grows without keeping the contents.
  void resize(size_t n) {
    if (n > cap_) {
      void* q = nullptr;
      size_t cap = (n + kBufferAlignBytes - 1) / kBufferAlignBytes * kBufferAlignBytes;
      if (posix_memalign(&q, kBufferAlignBytes, cap) != 0) std::abort();
      std::free(p_);
      p_ = static_cast<uint8_t*>(q);
      cap_ = cap;
    }
    n_ = n;
  }

 private:
  uint8_t* p_ = nullptr;
  size_t n_ = 0;
  size_t cap_ = 0;
};

// Thread-safe: every method takes the appender's mutex, and every operation
// that changes the log (Append, AppendZeroes, CloseBlock, Finish, Abandon)
// runs whole under opMu_ as well, because waiting for a free staging buffer
// lets go of mu_ mid-operation. Every method returns
// 0 or an errno; after an I/O error (or Finish) the appender refuses every
// further append with that errno, because the file's tail is then unknown.
class HrlAppenderCore {
 public:
  HrlAppenderCore(int fd, uint32_t metadataSizeBytes, uint32_t maxEntryBytes, size_t stagingBytes,
                  uint64_t writtenEnd, uint64_t lastBlockOffset);
  ~HrlAppenderCore();

  // Logs data for disk bytes [byteOffset, byteOffset + length), split into
  // entries of at most maxEntryBytes.
  int Append(uint64_t byteOffset, const uint8_t* data, size_t length, uint32_t timestamp);
  // Logs zero-filled entries for [byteOffset, byteOffset + length).
  int AppendZeroes(uint64_t byteOffset, uint64_t length, uint32_t timestamp);
  // Writes the staged payloads and the open block (if it holds entries).
  int CloseBlock();
  // CloseBlock, then refuses every later append (the log is being sealed or closed).
  int Finish();
  // Refuses every later append without writing what is staged (the log is
  // closed unsealed; recovery keeps what the last flush made durable).
  void Abandon();

  struct State {
    uint64_t writtenEnd = 0;
    uint64_t stagedBytes = 0;
    uint64_t entriesInBlock = 0;
    uint64_t totalEntries = 0;
    int error = 0;
  };
  State GetState();
  // Bytes the log occupies once everything appended is written.
  uint64_t SizeBytes();

  // The current HRL timestamp (seconds since 2000, clamped to 32 bits).
  static uint32_t NowTimestamp();

 private:
  int AppendPieceLocked(uint64_t byteOffset, const uint8_t* data, size_t length, uint32_t checksum, uint32_t timestamp);
  void AddEntryLocked(uint64_t byteOffset, uint32_t length, uint32_t checksum, uint32_t timestamp);
  int WriteStagedLocked();
  int CloseBlockLocked();
  // Closes the full open block into the staging buffer (no I/O of its own).
  int StageBlockLocked();
  uint64_t SizeBytesLocked() const;
  void RecycleCacheLocked();
  // `allowDirect` false: buffered even when the range is page-aligned.
  int WriteAtLocked(struct iovec* iov, int count, uint64_t pos, bool allowDirect = true);

  // Held for a whole operation that changes the log, so no other one starts
  // while it waits (mu_ released) for a staging buffer: a block closed then
  // would list an entry whose payload is not staged yet, or two payloads
  // would land in the other order than their entries. Taken before mu_;
  // the I/O threads take only mu_. SizeBytes and GetState take only mu_
  // (they do not wait behind an append waiting for the device).
  std::mutex opMu_;
  std::mutex mu_;
  const int fd_;
  // A second descriptor of the same file opened with O_DIRECT, or -1. Whole
  // pages (4 KiB-aligned offset, length and memory) are written through it:
  // no copy into the page cache, no delayed allocation and writeback work on
  // our cores (a buffered append cost 7x the CPU of a direct one here).
  // Anything else, and every write after an EINVAL from it, goes buffered.
  int directFd_ = -1;
  std::atomic<bool> directOk_{false};
  // A third descriptor of the file, for the recycler's fallocate,
  // sync_file_range and fadvise only, or -1 (then it does none of them).
  int syncFd_ = -1;
  // Closes directFd_ and syncFd_ (the recycler has stopped).
  void CloseDirectLocked();
  const uint32_t metadataSizeBytes_;
  const uint32_t maxEntryBytes_;
  const uint32_t entriesPerBlock_;
  AlignedBuffer block_;
  AlignedBuffer staging_;
  // A full staging buffer is swapped with a free spare and written by the
  // appender's I/O threads, so the appending thread (the tap's writer
  // thread) only copies. Several such writes are in flight at once: a
  // direct write waits for the device, which takes four at once about three
  // times as fast as one. When kMaxDirectWrites are waiting for a slow
  // device, further buffers go through the page cache instead (a quick
  // copy), so appends never wait for the device; the cache absorbs the
  // burst as it would for any buffered writer. Memory stays bounded:
  // kSpareBuffers buffers, kIoThreads threads.
  static constexpr int kSpareBuffers = 6;
  static constexpr int kIoThreads = 4;
  static constexpr int kMaxDirectWrites = 3;
  int directWrites_ = 0;
  struct SpareWrite {
    int index;
    size_t length;
    uint64_t pos;
  };
  std::vector<std::unique_ptr<AlignedBuffer>> spares_;
  std::vector<int> freeSpares_;
  std::vector<SpareWrite> spareQueue_;  // in file order; taken from the front
  size_t spareQueueHead_ = 0;
  int sparesWriting_ = 0;
  std::condition_variable spareDoneCv_;
  std::condition_variable spareQueueCv_;  // spare writers wait here for the queue
  AlignedBuffer zeroes_;
  size_t stagedBytes_ = 0;
  uint64_t writtenEnd_;
  uint64_t lastBlockOffset_;
  uint32_t entriesInBlock_ = 0;
  uint64_t totalEntries_ = 0;
  int error_ = 0;
  // The log only grows, so its page cache would grow with it, and every new
  // page costs an allocation (reclaim, or a first touch of guest memory in a
  // VM) that made appending cost several times a rewrite of cached pages.
  // Written ranges are therefore handed to writeback early and dropped from
  // the cache once clean, so appends keep reusing the same few pages. A
  // thread of the appender's own does it, so no append waits for the disk.
  // One loop per I/O thread: writes queued spares, or (`recycles`, one
  // thread) reserves blocks ahead of the written end, starts writeback and
  // drops written ranges from the cache.
  void IoLoop(bool recycles);
  void StartThreadLocked();
  // Waits (mu_ held) until every queued spare is written; the first error, or 0.
  int WaitSpareLocked();
  // Waits (mu_ held) for a free spare buffer; its index.
  int TakeFreeSpareLocked();
  void StopRecyclerLocked(std::unique_lock<std::mutex>& lock);
  // Set in the constructor (ext4 only), then the recycler thread's: whether
  // blocks are still reserved ahead (cleared when fallocate fails).
  bool preallocOk_ = false;
  // Set once blocks were reserved past the file's end: Finish and Abandon
  // then give back those left unused.
  std::atomic<bool> preallocated_{false};
  void ReleasePreallocLocked();
  std::vector<std::thread> ioThreads_;
  std::condition_variable recycleCv_;
  bool recyclerStop_ = false;
  uint64_t recycleSignalled_ = 0;
};

// The JavaScript class `HrlAppender` wrapping a core; other native classes
// take its core through CoreOf.
std::shared_ptr<HrlAppenderCore> HrlAppenderCoreOf(Napi::Value value);

// Writes all of [data, data + length) at pos, retrying short writes and EINTR.
int PwriteAll(int fd, const uint8_t* data, size_t length, uint64_t pos);

// Registers the HrlAppender class.
void InitHrlAppender(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_HRL_APPENDER_H_
