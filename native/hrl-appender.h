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
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

struct iovec;

namespace blockrelay {

constexpr uint32_t kHrlMetadataHeaderBytes = 32;
constexpr uint32_t kHrlMetadataEntryBytes = 32;
// Most coalescible entries an appender remembers (HRL_COALESCE_MAX_ENTRIES
// in src/tracking/hrl-writer.ts): a few MB of map at most.
constexpr uint32_t kHrlCoalesceMaxEntries = 262144;
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
  // coalesceMaxEntries: bound of the coalescible-entry map; 0 turns
  // coalescing of overwrites off (every piece is appended).
  // coalesceMinBytes: pieces shorter than this are never remembered, so
  // they are always appended (their upkeep costs more than they save).
  HrlAppenderCore(int fd, uint32_t metadataSizeBytes, uint32_t maxEntryBytes, size_t stagingBytes,
                  uint64_t writtenEnd, uint64_t lastBlockOffset, uint32_t coalesceMaxEntries = 0,
                  uint32_t coalesceMinBytes = 1);
  ~HrlAppenderCore();

  // Logs data for disk bytes [byteOffset, byteOffset + length), split into
  // entries of at most maxEntryBytes. A piece covering exactly the extent of
  // a coalescible entry (one no later entry overlaps) rewrites that entry's
  // payload and entry in place instead, when neither lies in a staging
  // buffer an I/O thread is still writing (see RewriteLocked).
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
    uint64_t rewrites = 0;
    uint64_t rewrittenBytes = 0;
  };
  State GetState();
  // Bytes the log occupies once everything appended is written.
  uint64_t SizeBytes();

  // Whether a piece was rewritten in place since the last call; clears it.
  // A flush that sees it fdatasyncs even if the log's end did not move.
  bool TakeRewrittenSinceSync();

  // The current HRL timestamp (seconds since 2000, clamped to 32 bits).
  static uint32_t NowTimestamp();

 private:
  // One piece (at most maxEntryBytes): rewritten in place when it can be, else appended.
  int CoalescePieceLocked(uint64_t byteOffset, const uint8_t* data, size_t length, uint32_t checksum, uint32_t timestamp);
  int AppendPieceLocked(uint64_t byteOffset, const uint8_t* data, size_t length, uint32_t checksum, uint32_t timestamp);
  void AddEntryLocked(uint64_t byteOffset, uint32_t length, uint32_t checksum, uint32_t timestamp);
  int WriteStagedLocked();
  int CloseBlockLocked();
  // Closes the full open block into the staging buffer (no I/O of its own).
  int StageBlockLocked();
  uint64_t SizeBytesLocked() const;

  // Coalescing of overwrites. An entry of the open log no later entry
  // overlaps; keyed by disk offset in coalescible_, extents pairwise disjoint.
  struct CoalescibleEntry {
    uint64_t length;
    // File position of the payload: in staging_ while at or past writtenEnd_.
    uint64_t payloadPos;
    // File position of the 32-byte entry once its block is staged or
    // closed (in staging_ while at or past writtenEnd_); kEntryInOpenBlock
    // while it sits in block_ at `slot`.
    uint64_t entryPos;
    uint32_t slot;
  };
  static constexpr uint64_t kEntryInOpenBlock = ~0ull;
  // Rewrites `e` with the piece: 0 done, -1 not now (a spare write of its
  // range is in flight: the caller appends), else an errno.
  int RewriteLocked(CoalescibleEntry& e, uint64_t byteOffset, const uint8_t* data, size_t length, uint32_t checksum,
                    uint32_t timestamp);
  // Whether a queued or running spare write or rewrite covers any of [pos, pos + length).
  bool InFlightLocked(uint64_t pos, uint64_t length) const;
  // The part of a rewrite that goes to the file, written by an I/O thread
  // (payload, then the 32-byte entry): a buffered write there can wait for
  // the inode lock behind a direct append of the spare writers, which must
  // not stall the appending thread (the tap's logger). Its ranges count as
  // in flight until written, so a later rewrite of them appends instead and
  // two rewrites of one range are never reordered.
  struct RewriteJob {
    std::vector<uint8_t> payload;  // empty when the payload was rewritten in memory
    uint64_t payloadPos = 0;
    uint8_t entry[kHrlMetadataEntryBytes];
    bool hasEntry = false;
    uint64_t entryPos = 0;
    bool running = false;
    // What it holds against kMaxRewriteBytes.
    uint64_t Bytes() const { return payload.size() + (hasEntry ? kHrlMetadataEntryBytes : 0); }
  };
  // Bounds of the queued rewrites; past them a rewrite is not taken (the piece is appended).
  static constexpr size_t kMaxRewriteJobs = 64;
  static constexpr uint64_t kMaxRewriteBytes = 8ull << 20;
  std::vector<std::unique_ptr<RewriteJob>> rewriteJobs_;  // queued and running, in queue order
  uint64_t rewriteBytes_ = 0;
  // Whether a queued rewrite waits for an I/O thread.
  bool RewriteWaitingLocked() const {
    for (const auto& j : rewriteJobs_) {
      if (!j->running) return true;
    }
    return false;
  }
  // Forgets every coalescible entry overlapping [byteOffset, byteOffset + length).
  void ForgetOverlappingLocked(uint64_t byteOffset, uint64_t length);
  // Gives the open block's coalescible entries their file position (block staged or closed at blockOffset).
  void PlaceOpenBlockEntriesLocked(uint64_t blockOffset);
  const uint32_t coalesceMaxEntries_;
  const uint32_t coalesceMinBytes_;
  std::map<uint64_t, CoalescibleEntry> coalescible_;
  // Keys inserted into coalescible_ since the open block began.
  std::vector<uint64_t> openBlockKeys_;
  uint64_t rewrites_ = 0;
  uint64_t rewrittenBytes_ = 0;
  bool rewrittenSinceSync_ = false;
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
  // The file range each spare is being written to, while it is not free
  // (a rewrite must not touch a range a spare write is still in flight for).
  struct SpareRange {
    bool busy = false;
    uint64_t pos = 0;
    uint64_t length = 0;
  };
  SpareRange spareRanges_[kSpareBuffers];
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
