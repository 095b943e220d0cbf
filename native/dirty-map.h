// DirtyMap: the set of changed blocks of one disk, kept sparse.
//
// Blocks are grouped into chunks of 2^16 blocks. A chunk is in one of four
// states, chosen by what it holds:
//   empty   nothing dirty, no memory;
//   full    every block dirty, no memory;
//   runs    a sorted array of disjoint, non-adjacent [start, last] runs of
//           16-bit block numbers (4 bytes a run), for chunks with few runs;
//   bitmap  one bit per block (8 KiB), once a chunk has more than kMaxRuns
//           runs, and back to runs when it drops to kRunsFromBitmap dirty
//           blocks (the gap between the two keeps a chunk from flapping).
// Chunks live in pages of 512 allocated on demand, so an empty map of even a
// very large disk costs only the page directory, and a fully dirty 2 TiB map
// (4 KiB blocks) costs 16 pages of 8 KiB. The worst case, a map fragmented
// into more than 1024 runs in every chunk, is one bit per block plus the
// pages: the size of a flat bitmap plus 0.2%.
//
// Block numbers are uint64; the wrapper limits a map to 2^41 blocks.
// The class trusts its callers (the TypeScript wrapper validates), but
// asserts cheap invariants where a wrong argument could corrupt memory.
#ifndef BLOCKRELAY_DIRTY_MAP_H_
#define BLOCKRELAY_DIRTY_MAP_H_

#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace blockrelay {

constexpr unsigned kChunkShift = 16;
constexpr uint32_t kChunkBlocks = 1u << kChunkShift;
constexpr uint32_t kBitmapWords = kChunkBlocks / 64;
constexpr unsigned kPageShift = 9;
constexpr uint32_t kPageChunks = 1u << kPageShift;
constexpr uint32_t kMaxRuns = 1024;
constexpr uint32_t kRunsFromBitmap = 512;
constexpr uint64_t kMaxBlocks = 1ull << 41;
// Allocator bookkeeping charged per allocation (glibc: an 8-byte header,
// rounded to 16), so memoryBytes() is not flattered by many small arrays.
constexpr uint64_t kMallocOverheadBytes = 16;

// Record kinds of the serialized body (docs/formats/dirty-map.md).
constexpr uint8_t kRecordFull = 1;
constexpr uint8_t kRecordRuns = 2;
constexpr uint8_t kRecordBitmap = 3;

struct Run {
  uint16_t start;
  uint16_t last;  // inclusive, so a run can end at block 65535
};

struct Chunk {
  enum Kind : uint8_t { kEmpty = 0, kFull = 1, kRuns = 2, kBitmap = 3 };
  void* data = nullptr;  // Run[1 << capLog2] or uint64_t[kBitmapWords]
  uint32_t dirty = 0;    // dirty blocks in this chunk
  uint16_t runCount = 0;
  uint8_t kind = kEmpty;
  uint8_t capLog2 = 0;
};

struct Page {
  Chunk chunks[kPageChunks];
  uint32_t used = 0;  // chunks that are not empty
};

struct DecodeError {
  uint64_t offset = 0;  // byte offset inside the body
  std::string reason;
};

class DirtyMapCore {
 public:
  explicit DirtyMapCore(uint64_t blockCount);
  ~DirtyMapCore();
  DirtyMapCore(const DirtyMapCore&) = delete;
  DirtyMapCore& operator=(const DirtyMapCore&) = delete;

  uint64_t blockCount() const { return blockCount_; }
  uint64_t dirtyBlocks() const { return dirtyBlocks_; }
  uint64_t memoryBytes() const { return memoryBytes_; }

  // All ranges are [first, end) in blocks, end <= blockCount.
  void Mark(uint64_t first, uint64_t end);
  void Clear(uint64_t first, uint64_t end);
  bool AnyDirty(uint64_t first, uint64_t end) const;
  void ClearAll();
  void Merge(const DirtyMapCore& other);

  // Appends up to maxExtents coalesced extents of [from, to) to out as
  // (start, end) pairs. Returns the block where the next call should start,
  // or `to` when the range is exhausted.
  uint64_t Extents(uint64_t from, uint64_t to, size_t maxExtents, std::vector<uint64_t>& out) const;

  // The serialized body: its exact size, then the bytes.
  size_t BodySize() const;
  void WriteBody(uint8_t* out, size_t size) const;
  // Decodes a body into this map, which must be empty. On failure the map
  // is left empty and err says where and why.
  bool ReadBody(const uint8_t* body, size_t size, DecodeError& err);

  // Chunks by representation and allocated pages, for tests and diagnostics.
  struct Stats {
    uint64_t runChunks = 0, bitmapChunks = 0, fullChunks = 0, pages = 0;
  };
  Stats GetStats() const;

  // Walks every structure and returns what is wrong, or "" when sound.
  std::string CheckInvariants() const;

 private:
  uint32_t ChunkLimit(uint64_t chunkIndex) const;
  Chunk* ChunkFor(uint64_t chunkIndex, bool create);
  const Chunk* ChunkAt(uint64_t chunkIndex) const;
  void ChunkBecame(uint64_t chunkIndex, bool wasEmpty, const Chunk& chunk);

  // Each returns the change in dirty blocks.
  int64_t MarkChunk(Chunk& c, uint32_t limit, uint32_t lo, uint32_t hi);
  int64_t ClearChunk(Chunk& c, uint32_t limit, uint32_t lo, uint32_t hi);

  void FreeData(Chunk& c);
  void SetFull(Chunk& c, uint32_t limit);
  Run* RunsReserve(Chunk& c, uint32_t count);
  void RunsToBitmap(Chunk& c);
  void BitmapToRuns(Chunk& c);
  void Normalize(Chunk& c, uint32_t limit);

  uint64_t blockCount_;
  uint64_t chunkCount_;
  uint64_t dirtyBlocks_ = 0;
  uint64_t memoryBytes_ = 0;
  std::vector<std::unique_ptr<Page>> pages_;
};

// Registers the DirtyMap class.
void InitDirtyMap(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_DIRTY_MAP_H_
