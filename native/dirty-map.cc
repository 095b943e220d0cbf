#include "dirty-map.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

namespace blockrelay {

namespace {

inline Run* RunsOf(Chunk& c) { return static_cast<Run*>(c.data); }
inline const Run* RunsOf(const Chunk& c) { return static_cast<const Run*>(c.data); }
inline uint64_t* BitsOf(Chunk& c) { return static_cast<uint64_t*>(c.data); }
inline const uint64_t* BitsOf(const Chunk& c) { return static_cast<const uint64_t*>(c.data); }

constexpr uint64_t kBitmapBytes = kBitmapWords * sizeof(uint64_t);

inline uint64_t RunsBytes(const Chunk& c) { return (uint64_t{1} << c.capLog2) * sizeof(Run); }

// First index i in r[0, n) with r[i].last >= x.
inline uint32_t FirstLastAtLeast(const Run* r, uint32_t n, uint32_t x) {
  uint32_t lo = 0, hi = n;
  while (lo < hi) {
    uint32_t mid = (lo + hi) / 2;
    if (r[mid].last >= x) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// First index i in r[0, n) with r[i].start > x.
inline uint32_t FirstStartAbove(const Run* r, uint32_t n, uint32_t x) {
  uint32_t lo = 0, hi = n;
  while (lo < hi) {
    uint32_t mid = (lo + hi) / 2;
    if (r[mid].start > x) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Mask of bits a..b (inclusive) of one word.
inline uint64_t WordMask(uint32_t a, uint32_t b) { return (~uint64_t{0} << a) & (~uint64_t{0} >> (63 - b)); }

// Applies op to the words covering bits [lo, hi] with the matching masks.
template <class Op>
inline void ForWords(uint32_t lo, uint32_t hi, Op op) {
  uint32_t w0 = lo / 64, w1 = hi / 64;
  if (w0 == w1) {
    op(w0, WordMask(lo % 64, hi % 64));
    return;
  }
  op(w0, WordMask(lo % 64, 63));
  for (uint32_t w = w0 + 1; w < w1; w++) op(w, ~uint64_t{0});
  op(w1, WordMask(0, hi % 64));
}

uint32_t BitsSet(uint64_t* words, uint32_t lo, uint32_t hi) {
  uint32_t added = 0;
  ForWords(lo, hi, [&](uint32_t w, uint64_t mask) {
    added += static_cast<uint32_t>(__builtin_popcountll(mask & ~words[w]));
    words[w] |= mask;
  });
  return added;
}

uint32_t BitsClear(uint64_t* words, uint32_t lo, uint32_t hi) {
  uint32_t removed = 0;
  ForWords(lo, hi, [&](uint32_t w, uint64_t mask) {
    removed += static_cast<uint32_t>(__builtin_popcountll(mask & words[w]));
    words[w] &= ~mask;
  });
  return removed;
}

bool BitsAny(const uint64_t* words, uint32_t lo, uint32_t hi) {
  bool any = false;
  ForWords(lo, hi, [&](uint32_t w, uint64_t mask) { any = any || (words[w] & mask) != 0; });
  return any;
}

// The first bit >= pos and < end that is set (want = true) or clear; end if none.
uint32_t NextBit(const uint64_t* words, uint32_t pos, uint32_t end, bool want) {
  while (pos < end) {
    uint32_t w = pos / 64;
    uint64_t bits = want ? words[w] : ~words[w];
    bits &= ~uint64_t{0} << (pos % 64);
    if (bits != 0) {
      uint32_t found = w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits));
      return found < end ? found : end;
    }
    pos = (w + 1) * 64;
  }
  return end;
}

// Calls f(start, last) for each maximal dirty run of chunk c, clipped to
// [lo, hi], in ascending order. Stops early, returning false, when f does.
template <class F>
bool ForEachRun(const Chunk& c, uint32_t limit, uint32_t lo, uint32_t hi, F f) {
  if (hi >= limit) hi = limit - 1;
  if (lo > hi) return true;
  switch (c.kind) {
    case Chunk::kFull:
      return f(lo, hi);
    case Chunk::kRuns: {
      const Run* r = RunsOf(c);
      for (uint32_t i = FirstLastAtLeast(r, c.runCount, lo); i < c.runCount && r[i].start <= hi; i++) {
        if (!f(std::max<uint32_t>(r[i].start, lo), std::min<uint32_t>(r[i].last, hi))) return false;
      }
      return true;
    }
    case Chunk::kBitmap: {
      const uint64_t* words = BitsOf(c);
      uint32_t pos = lo;
      while (pos <= hi) {
        uint32_t s = NextBit(words, pos, hi + 1, true);
        if (s > hi) break;
        uint32_t e = NextBit(words, s, hi + 1, false);
        if (!f(s, e - 1)) return false;
        pos = e;
      }
      return true;
    }
    default:
      return true;
  }
}

size_t VarintSize(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

uint8_t* PutVarint(uint8_t* p, uint64_t v) {
  while (v >= 0x80) {
    *p++ = static_cast<uint8_t>(v | 0x80);
    v >>= 7;
  }
  *p++ = static_cast<uint8_t>(v);
  return p;
}

// LEB128, at most 10 bytes, no bits beyond 64.
bool GetVarint(const uint8_t* body, size_t size, size_t& pos, uint64_t& out) {
  uint64_t v = 0;
  for (unsigned i = 0; i < 10; i++) {
    if (pos >= size) return false;
    uint8_t b = body[pos++];
    if (i == 9 && b > 1) return false;
    v |= static_cast<uint64_t>(b & 0x7F) << (7 * i);
    if ((b & 0x80) == 0) {
      out = v;
      return true;
    }
  }
  return false;
}

// The serialized size of chunk c as a runs record payload (after the kind).
size_t RunsPayloadSize(const Chunk& c, uint32_t limit) {
  size_t runs = 0, size = 0;
  uint32_t prevEnd = 0;
  ForEachRun(c, limit, 0, limit - 1, [&](uint32_t s, uint32_t l) {
    runs++;
    size += VarintSize(s - prevEnd) + VarintSize(l - s);
    prevEnd = l + 1;
    return true;
  });
  return VarintSize(runs) + size;
}

inline size_t BitmapPayloadSize(uint32_t limit) { return (limit + 7) / 8; }

}  // namespace

DirtyMapCore::DirtyMapCore(uint64_t blockCount)
    : blockCount_(std::min(blockCount, kMaxBlocks)),
      chunkCount_((blockCount_ + kChunkBlocks - 1) >> kChunkShift) {
  pages_.resize((chunkCount_ + kPageChunks - 1) >> kPageShift);
  memoryBytes_ = sizeof(*this) + kMallocOverheadBytes + pages_.capacity() * sizeof(pages_[0]) + kMallocOverheadBytes;
}

DirtyMapCore::~DirtyMapCore() { ClearAll(); }

uint32_t DirtyMapCore::ChunkLimit(uint64_t chunkIndex) const {
  uint64_t base = chunkIndex << kChunkShift;
  uint64_t left = blockCount_ - base;
  return left >= kChunkBlocks ? kChunkBlocks : static_cast<uint32_t>(left);
}

Chunk* DirtyMapCore::ChunkFor(uint64_t chunkIndex, bool create) {
  std::unique_ptr<Page>& page = pages_[chunkIndex >> kPageShift];
  if (!page) {
    if (!create) return nullptr;
    page.reset(new Page());
    memoryBytes_ += sizeof(Page) + kMallocOverheadBytes;
  }
  return &page->chunks[chunkIndex & (kPageChunks - 1)];
}

const Chunk* DirtyMapCore::ChunkAt(uint64_t chunkIndex) const {
  const std::unique_ptr<Page>& page = pages_[chunkIndex >> kPageShift];
  return page ? &page->chunks[chunkIndex & (kPageChunks - 1)] : nullptr;
}

// Keeps the page's count of non-empty chunks, and frees a page that no
// longer holds anything, so clearing a map gives its memory back.
void DirtyMapCore::ChunkBecame(uint64_t chunkIndex, bool wasEmpty, const Chunk& chunk) {
  bool isEmpty = chunk.kind == Chunk::kEmpty;
  if (wasEmpty == isEmpty) return;
  std::unique_ptr<Page>& page = pages_[chunkIndex >> kPageShift];
  if (wasEmpty) {
    page->used++;
  } else if (--page->used == 0) {
    page.reset();
    memoryBytes_ -= sizeof(Page) + kMallocOverheadBytes;
  }
}

void DirtyMapCore::FreeData(Chunk& c) {
  if (c.data == nullptr) return;
  if (c.kind == Chunk::kRuns) memoryBytes_ -= RunsBytes(c) + kMallocOverheadBytes;
  else if (c.kind == Chunk::kBitmap) memoryBytes_ -= kBitmapBytes + kMallocOverheadBytes;
  std::free(c.data);
  c.data = nullptr;
  c.capLog2 = 0;
  c.runCount = 0;
}

void DirtyMapCore::SetFull(Chunk& c, uint32_t limit) {
  FreeData(c);
  c.kind = Chunk::kFull;
  c.dirty = limit;
}

// Grows the run array of a runs (or empty) chunk to hold count runs.
Run* DirtyMapCore::RunsReserve(Chunk& c, uint32_t count) {
  if (c.data != nullptr && (uint32_t{1} << c.capLog2) >= count) return RunsOf(c);
  uint8_t capLog2 = 2;
  while ((uint32_t{1} << capLog2) < count) capLog2++;
  void* grown = std::realloc(c.data, (size_t{1} << capLog2) * sizeof(Run));
  if (grown == nullptr) {
    // Out of memory: there is no way to report it from here without
    // exceptions, and losing a mark would lose a change. Stop the process.
    std::abort();
  }
  if (c.data != nullptr) memoryBytes_ -= RunsBytes(c) + kMallocOverheadBytes;
  c.data = grown;
  c.capLog2 = capLog2;
  memoryBytes_ += RunsBytes(c) + kMallocOverheadBytes;
  return RunsOf(c);
}

void DirtyMapCore::RunsToBitmap(Chunk& c) {
  void* bits = std::calloc(kBitmapWords, sizeof(uint64_t));
  if (bits == nullptr) std::abort();
  const Run* r = RunsOf(c);
  for (uint32_t i = 0; i < c.runCount; i++) BitsSet(static_cast<uint64_t*>(bits), r[i].start, r[i].last);
  FreeData(c);
  c.data = bits;
  c.kind = Chunk::kBitmap;
  memoryBytes_ += kBitmapBytes + kMallocOverheadBytes;
}

void DirtyMapCore::BitmapToRuns(Chunk& c) {
  uint32_t runs = 0;
  ForEachRun(c, kChunkBlocks, 0, kChunkBlocks - 1, [&](uint32_t, uint32_t) {
    runs++;
    return true;
  });
  Chunk next;
  next.kind = Chunk::kRuns;
  next.dirty = c.dirty;
  Run* r = RunsReserve(next, runs);
  uint32_t i = 0;
  ForEachRun(c, kChunkBlocks, 0, kChunkBlocks - 1, [&](uint32_t s, uint32_t l) {
    r[i++] = Run{static_cast<uint16_t>(s), static_cast<uint16_t>(l)};
    return true;
  });
  next.runCount = static_cast<uint16_t>(runs);
  FreeData(c);
  c = next;
}

// Puts a chunk in the cheapest state for what it now holds.
void DirtyMapCore::Normalize(Chunk& c, uint32_t limit) {
  if (c.kind == Chunk::kEmpty || c.kind == Chunk::kFull) return;
  if (c.dirty == 0) {
    FreeData(c);
    c.kind = Chunk::kEmpty;
  } else if (c.dirty == limit) {
    SetFull(c, limit);
  } else if (c.kind == Chunk::kBitmap && c.dirty <= kRunsFromBitmap) {
    BitmapToRuns(c);
  } else if (c.kind == Chunk::kRuns && c.capLog2 > 4 && c.runCount * 4u < (uint32_t{1} << c.capLog2)) {
    // Give back a run array that clears left three-quarters empty.
    Chunk next;
    next.kind = Chunk::kRuns;
    next.dirty = c.dirty;
    next.runCount = c.runCount;
    std::memcpy(RunsReserve(next, c.runCount), c.data, c.runCount * sizeof(Run));
    FreeData(c);
    c = next;
  }
}

int64_t DirtyMapCore::MarkChunk(Chunk& c, uint32_t limit, uint32_t lo, uint32_t hi) {
  if (c.kind == Chunk::kFull) return 0;
  uint32_t before = c.dirty;
  if (lo == 0 && hi == limit - 1) {
    SetFull(c, limit);
    return static_cast<int64_t>(limit) - before;
  }
  if (c.kind == Chunk::kEmpty) {
    Run* r = RunsReserve(c, 1);
    r[0] = Run{static_cast<uint16_t>(lo), static_cast<uint16_t>(hi)};
    c.runCount = 1;
    c.kind = Chunk::kRuns;
    c.dirty = hi - lo + 1;
    return c.dirty;
  }
  if (c.kind == Chunk::kRuns) {
    Run* r = RunsOf(c);
    uint32_t n = c.runCount;
    // Runs i..j-1 overlap or touch [lo, hi] and fold into one.
    uint32_t i = FirstLastAtLeast(r, n, lo == 0 ? 0 : lo - 1);
    uint32_t j = FirstStartAbove(r, n, hi + 1);
    if (i == j) {
      if (n + 1 > kMaxRuns) {
        RunsToBitmap(c);
      } else {
        r = RunsReserve(c, n + 1);
        std::memmove(r + i + 1, r + i, (n - i) * sizeof(Run));
        r[i] = Run{static_cast<uint16_t>(lo), static_cast<uint16_t>(hi)};
        c.runCount = static_cast<uint16_t>(n + 1);
        c.dirty += hi - lo + 1;
      }
    } else {
      uint32_t start = std::min<uint32_t>(lo, r[i].start);
      uint32_t last = std::max<uint32_t>(hi, r[j - 1].last);
      uint32_t covered = 0;
      for (uint32_t k = i; k < j; k++) covered += r[k].last - r[k].start + 1u;
      r[i] = Run{static_cast<uint16_t>(start), static_cast<uint16_t>(last)};
      std::memmove(r + i + 1, r + j, (n - j) * sizeof(Run));
      c.runCount = static_cast<uint16_t>(n - (j - i) + 1);
      c.dirty += (last - start + 1) - covered;
    }
  }
  if (c.kind == Chunk::kBitmap) c.dirty += BitsSet(BitsOf(c), lo, hi);
  Normalize(c, limit);
  return static_cast<int64_t>(c.dirty) - before;
}

int64_t DirtyMapCore::ClearChunk(Chunk& c, uint32_t limit, uint32_t lo, uint32_t hi) {
  if (c.kind == Chunk::kEmpty) return 0;
  uint32_t before = c.dirty;
  if (lo == 0 && hi == limit - 1) {
    FreeData(c);
    c.kind = Chunk::kEmpty;
    c.dirty = 0;
    return -static_cast<int64_t>(before);
  }
  if (c.kind == Chunk::kFull) {
    Run* r = RunsReserve(c, 2);
    uint16_t n = 0;
    if (lo > 0) r[n++] = Run{0, static_cast<uint16_t>(lo - 1)};
    if (hi < limit - 1) r[n++] = Run{static_cast<uint16_t>(hi + 1), static_cast<uint16_t>(limit - 1)};
    c.kind = Chunk::kRuns;
    c.runCount = n;
    c.dirty = limit - (hi - lo + 1);
  } else if (c.kind == Chunk::kRuns) {
    Run* r = RunsOf(c);
    uint32_t n = c.runCount;
    uint32_t i = FirstLastAtLeast(r, n, lo);
    uint32_t j = FirstStartAbove(r, n, hi);
    if (i == j) return 0;
    Run keep[2];
    uint32_t kept = 0;
    if (r[i].start < lo) keep[kept++] = Run{r[i].start, static_cast<uint16_t>(lo - 1)};
    if (r[j - 1].last > hi) keep[kept++] = Run{static_cast<uint16_t>(hi + 1), r[j - 1].last};
    uint32_t removed = 0;
    for (uint32_t k = i; k < j; k++) removed += r[k].last - r[k].start + 1u;
    for (uint32_t k = 0; k < kept; k++) removed -= keep[k].last - keep[k].start + 1u;
    uint32_t count = n - (j - i) + kept;
    if (count > kMaxRuns) {
      RunsToBitmap(c);
    } else {
      r = RunsReserve(c, count);
      std::memmove(r + i + kept, r + j, (n - j) * sizeof(Run));
      for (uint32_t k = 0; k < kept; k++) r[i + k] = keep[k];
      c.runCount = static_cast<uint16_t>(count);
      c.dirty -= removed;
    }
  }
  if (c.kind == Chunk::kBitmap) c.dirty -= BitsClear(BitsOf(c), lo, hi);
  Normalize(c, limit);
  return static_cast<int64_t>(c.dirty) - before;
}

void DirtyMapCore::Mark(uint64_t first, uint64_t end) {
  if (end > blockCount_) end = blockCount_;
  if (first >= end) return;
  for (uint64_t ci = first >> kChunkShift; ci <= (end - 1) >> kChunkShift; ci++) {
    uint64_t base = ci << kChunkShift;
    uint32_t lo = static_cast<uint32_t>(std::max(first, base) - base);
    uint32_t hi = static_cast<uint32_t>(std::min(end, base + kChunkBlocks) - 1 - base);
    Chunk* c = ChunkFor(ci, true);
    bool wasEmpty = c->kind == Chunk::kEmpty;
    dirtyBlocks_ += MarkChunk(*c, ChunkLimit(ci), lo, hi);
    ChunkBecame(ci, wasEmpty, *c);
  }
}

void DirtyMapCore::Clear(uint64_t first, uint64_t end) {
  if (end > blockCount_) end = blockCount_;
  if (first >= end) return;
  uint64_t lastChunk = (end - 1) >> kChunkShift;
  for (uint64_t ci = first >> kChunkShift; ci <= lastChunk; ci++) {
    Chunk* c = ChunkFor(ci, false);
    if (c == nullptr) {
      ci = (((ci >> kPageShift) + 1) << kPageShift) - 1;  // skip the absent page
      continue;
    }
    uint64_t base = ci << kChunkShift;
    uint32_t lo = static_cast<uint32_t>(std::max(first, base) - base);
    uint32_t hi = static_cast<uint32_t>(std::min(end, base + kChunkBlocks) - 1 - base);
    bool wasEmpty = c->kind == Chunk::kEmpty;
    dirtyBlocks_ += ClearChunk(*c, ChunkLimit(ci), lo, hi);
    ChunkBecame(ci, wasEmpty, *c);
  }
}

bool DirtyMapCore::AnyDirty(uint64_t first, uint64_t end) const {
  if (end > blockCount_) end = blockCount_;
  if (first >= end) return false;
  uint64_t lastChunk = (end - 1) >> kChunkShift;
  for (uint64_t ci = first >> kChunkShift; ci <= lastChunk; ci++) {
    const Chunk* c = ChunkAt(ci);
    if (c == nullptr) {
      ci = (((ci >> kPageShift) + 1) << kPageShift) - 1;
      continue;
    }
    if (c->kind == Chunk::kEmpty) continue;
    uint64_t base = ci << kChunkShift;
    uint32_t lo = static_cast<uint32_t>(std::max(first, base) - base);
    uint32_t hi = static_cast<uint32_t>(std::min(end, base + kChunkBlocks) - 1 - base);
    if (c->kind == Chunk::kFull) return true;
    if (c->kind == Chunk::kRuns) {
      const Run* r = RunsOf(*c);
      uint32_t i = FirstLastAtLeast(r, c->runCount, lo);
      if (i < c->runCount && r[i].start <= hi) return true;
    } else if (BitsAny(BitsOf(*c), lo, hi)) {
      return true;
    }
  }
  return false;
}

void DirtyMapCore::ClearAll() {
  for (std::unique_ptr<Page>& page : pages_) {
    if (!page) continue;
    for (Chunk& c : page->chunks) FreeData(c);
    page.reset();
    memoryBytes_ -= sizeof(Page) + kMallocOverheadBytes;
  }
  dirtyBlocks_ = 0;
}

void DirtyMapCore::Merge(const DirtyMapCore& other) {
  if (&other == this) return;
  uint64_t chunks = std::min(chunkCount_, other.chunkCount_);
  for (uint64_t ci = 0; ci < chunks; ci++) {
    const Chunk* oc = other.ChunkAt(ci);
    if (oc == nullptr) {
      ci = (((ci >> kPageShift) + 1) << kPageShift) - 1;
      continue;
    }
    if (oc->kind == Chunk::kEmpty) continue;
    uint32_t limit = std::min(ChunkLimit(ci), other.ChunkLimit(ci));
    Chunk* c = ChunkFor(ci, true);
    bool wasEmpty = c->kind == Chunk::kEmpty;
    uint32_t ownLimit = ChunkLimit(ci);
    ForEachRun(*oc, limit, 0, limit - 1, [&](uint32_t s, uint32_t l) {
      dirtyBlocks_ += MarkChunk(*c, ownLimit, s, l);
      return true;
    });
    ChunkBecame(ci, wasEmpty, *c);
  }
}

uint64_t DirtyMapCore::Extents(uint64_t from, uint64_t to, size_t maxExtents, std::vector<uint64_t>& out) const {
  if (to > blockCount_) to = blockCount_;
  if (maxExtents == 0) maxExtents = 1;
  if (from >= to) return to;
  size_t emitted = 0;
  bool pending = false;
  uint64_t pendingStart = 0, pendingEnd = 0, resume = to;
  bool stopped = false;
  uint64_t lastChunk = (to - 1) >> kChunkShift;
  for (uint64_t ci = from >> kChunkShift; ci <= lastChunk && !stopped; ci++) {
    const Chunk* c = ChunkAt(ci);
    if (c == nullptr) {
      ci = (((ci >> kPageShift) + 1) << kPageShift) - 1;
      continue;
    }
    if (c->kind == Chunk::kEmpty) continue;
    uint64_t base = ci << kChunkShift;
    uint32_t lo = static_cast<uint32_t>(std::max(from, base) - base);
    uint32_t hi = static_cast<uint32_t>(std::min(to, base + kChunkBlocks) - 1 - base);
    ForEachRun(*c, ChunkLimit(ci), lo, hi, [&](uint32_t s, uint32_t l) {
      uint64_t start = base + s, end = base + l + 1;
      if (pending && pendingEnd == start) {
        pendingEnd = end;  // a run continuing across a chunk boundary
        return true;
      }
      if (pending) {
        out.push_back(pendingStart);
        out.push_back(pendingEnd);
        if (++emitted == maxExtents) {
          resume = start;
          stopped = true;
          return false;
        }
      }
      pending = true;
      pendingStart = start;
      pendingEnd = end;
      return true;
    });
  }
  if (stopped) return resume;
  if (pending) {
    out.push_back(pendingStart);
    out.push_back(pendingEnd);
  }
  return to;
}

size_t DirtyMapCore::BodySize() const {
  size_t size = 0;
  uint64_t prev = 0;
  bool first = true;
  for (uint64_t ci = 0; ci < chunkCount_; ci++) {
    const Chunk* c = ChunkAt(ci);
    if (c == nullptr) {
      ci = (((ci >> kPageShift) + 1) << kPageShift) - 1;
      continue;
    }
    if (c->kind == Chunk::kEmpty) continue;
    size += VarintSize(first ? ci : ci - prev) + 1;
    first = false;
    prev = ci;
    if (c->kind == Chunk::kFull) continue;
    uint32_t limit = ChunkLimit(ci);
    size += std::min(RunsPayloadSize(*c, limit), BitmapPayloadSize(limit));
  }
  return size;
}

void DirtyMapCore::WriteBody(uint8_t* out, size_t size) const {
  uint8_t* p = out;
  uint8_t* const end = out + size;
  uint64_t prev = 0;
  bool first = true;
  for (uint64_t ci = 0; ci < chunkCount_; ci++) {
    const Chunk* c = ChunkAt(ci);
    if (c == nullptr) {
      ci = (((ci >> kPageShift) + 1) << kPageShift) - 1;
      continue;
    }
    if (c->kind == Chunk::kEmpty) continue;
    uint64_t delta = first ? ci : ci - prev;
    // The caller sized out with BodySize(); never write past it.
    if (static_cast<size_t>(end - p) < VarintSize(delta) + 1) std::abort();
    p = PutVarint(p, delta);
    first = false;
    prev = ci;
    if (c->kind == Chunk::kFull) {
      *p++ = kRecordFull;
      continue;
    }
    uint32_t limit = ChunkLimit(ci);
    size_t runsSize = RunsPayloadSize(*c, limit);
    size_t bitmapSize = BitmapPayloadSize(limit);
    if (static_cast<size_t>(end - p) < 1 + std::min(runsSize, bitmapSize)) std::abort();
    if (runsSize <= bitmapSize) {
      *p++ = kRecordRuns;
      size_t runs = 0;
      ForEachRun(*c, limit, 0, limit - 1, [&](uint32_t, uint32_t) {
        runs++;
        return true;
      });
      p = PutVarint(p, runs);
      uint32_t prevEnd = 0;
      ForEachRun(*c, limit, 0, limit - 1, [&](uint32_t s, uint32_t l) {
        p = PutVarint(p, s - prevEnd);
        p = PutVarint(p, l - s);
        prevEnd = l + 1;
        return true;
      });
    } else {
      *p++ = kRecordBitmap;
      std::memset(p, 0, bitmapSize);
      ForEachRun(*c, limit, 0, limit - 1, [&](uint32_t s, uint32_t l) {
        for (uint32_t b = s; b <= l; b++) p[b / 8] = static_cast<uint8_t>(p[b / 8] | (1u << (b % 8)));
        return true;
      });
      p += bitmapSize;
    }
  }
  if (p != end) std::abort();
}

bool DirtyMapCore::ReadBody(const uint8_t* body, size_t size, DecodeError& err) {
  ClearAll();
  auto fail = [&](uint64_t offset, std::string reason) {
    err.offset = offset;
    err.reason = std::move(reason);
    ClearAll();
    return false;
  };
  size_t pos = 0;
  uint64_t prev = 0;
  bool first = true;
  while (pos < size) {
    size_t recordStart = pos;
    uint64_t delta;
    if (!GetVarint(body, size, pos, delta)) return fail(recordStart, "chunk index is truncated or longer than 64 bits");
    if (!first && delta == 0) return fail(recordStart, "chunk index does not ascend (repeated chunk)");
    if (delta >= chunkCount_ || (!first && delta >= chunkCount_ - prev)) {
      return fail(recordStart, "chunk index lies beyond the disk's " + std::to_string(chunkCount_) + " chunks");
    }
    uint64_t ci = first ? delta : prev + delta;
    first = false;
    prev = ci;
    if (pos >= size) return fail(pos, "record ends before its kind byte");
    size_t kindAt = pos;
    uint8_t kind = body[pos++];
    uint32_t limit = ChunkLimit(ci);
    Chunk* c = ChunkFor(ci, true);
    bool wasEmpty = c->kind == Chunk::kEmpty;
    if (kind == kRecordFull) {
      dirtyBlocks_ += MarkChunk(*c, limit, 0, limit - 1);
    } else if (kind == kRecordRuns) {
      size_t countAt = pos;
      uint64_t count;
      if (!GetVarint(body, size, pos, count)) return fail(countAt, "run count is truncated or longer than 64 bits");
      if (count == 0 || count > (limit + 1) / 2) {
        return fail(countAt, "run count " + std::to_string(count) + " is impossible for a chunk of " + std::to_string(limit) + " blocks");
      }
      uint64_t prevEnd = 0;
      for (uint64_t k = 0; k < count; k++) {
        size_t runAt = pos;
        uint64_t gap, span;
        if (!GetVarint(body, size, pos, gap) || !GetVarint(body, size, pos, span)) {
          return fail(runAt, "run is truncated or longer than 64 bits");
        }
        if (k > 0 && gap == 0) return fail(runAt, "run touches the previous run (not coalesced)");
        if (gap >= limit - prevEnd || span >= limit - prevEnd - gap) {
          return fail(runAt, "run reaches past the end of its chunk");
        }
        uint32_t s = static_cast<uint32_t>(prevEnd + gap);
        uint32_t l = static_cast<uint32_t>(s + span);
        dirtyBlocks_ += MarkChunk(*c, limit, s, l);
        prevEnd = uint64_t{l} + 1;
      }
    } else if (kind == kRecordBitmap) {
      size_t bytes = BitmapPayloadSize(limit);
      if (size - pos < bytes) return fail(pos, "bitmap is truncated");
      const uint8_t* bits = body + pos;
      if (limit % 8 != 0 && (bits[bytes - 1] >> (limit % 8)) != 0) {
        return fail(pos + bytes - 1, "bitmap sets blocks past the end of the disk");
      }
      bool any = false;
      for (size_t b = 0; b < bytes && !any; b++) any = bits[b] != 0;
      if (!any) return fail(pos, "bitmap record holds no dirty block");
      // Build the chunk as a bitmap directly, then let it settle.
      void* words = std::calloc(kBitmapWords, sizeof(uint64_t));
      if (words == nullptr) std::abort();
      uint64_t* w = static_cast<uint64_t*>(words);
      for (size_t b = 0; b < bytes; b++) w[b / 8] |= static_cast<uint64_t>(bits[b]) << (8 * (b % 8));
      uint32_t dirty = 0;
      for (uint32_t k = 0; k < kBitmapWords; k++) dirty += static_cast<uint32_t>(__builtin_popcountll(w[k]));
      c->data = words;
      c->kind = Chunk::kBitmap;
      c->dirty = dirty;
      memoryBytes_ += kBitmapBytes + kMallocOverheadBytes;
      dirtyBlocks_ += dirty;
      Normalize(*c, limit);
      pos += bytes;
    } else {
      ChunkBecame(ci, wasEmpty, *c);
      return fail(kindAt, "unknown record kind " + std::to_string(kind));
    }
    ChunkBecame(ci, wasEmpty, *c);
  }
  return true;
}

DirtyMapCore::Stats DirtyMapCore::GetStats() const {
  Stats stats;
  for (const std::unique_ptr<Page>& page : pages_) {
    if (!page) continue;
    stats.pages++;
    for (const Chunk& c : page->chunks) {
      if (c.kind == Chunk::kRuns) stats.runChunks++;
      else if (c.kind == Chunk::kBitmap) stats.bitmapChunks++;
      else if (c.kind == Chunk::kFull) stats.fullChunks++;
    }
  }
  return stats;
}

std::string DirtyMapCore::CheckInvariants() const {
  uint64_t total = 0;
  uint64_t memory = sizeof(*this) + kMallocOverheadBytes + pages_.capacity() * sizeof(pages_[0]) + kMallocOverheadBytes;
  for (uint64_t pi = 0; pi < pages_.size(); pi++) {
    const Page* page = pages_[pi].get();
    if (page == nullptr) continue;
    memory += sizeof(Page) + kMallocOverheadBytes;
    uint32_t used = 0;
    for (uint32_t k = 0; k < kPageChunks; k++) {
      uint64_t ci = (pi << kPageShift) + k;
      const Chunk& c = page->chunks[k];
      std::string where = "chunk " + std::to_string(ci) + ": ";
      if (ci >= chunkCount_) {
        if (c.kind != Chunk::kEmpty) return where + "not empty past the disk end";
        continue;
      }
      uint32_t limit = ChunkLimit(ci);
      switch (c.kind) {
        case Chunk::kEmpty:
          if (c.data != nullptr || c.dirty != 0) return where + "empty chunk holds data or a count";
          break;
        case Chunk::kFull:
          if (c.data != nullptr || c.dirty != limit) return where + "full chunk holds data or a wrong count";
          break;
        case Chunk::kRuns: {
          if (c.data == nullptr || c.runCount == 0 || c.runCount > kMaxRuns || c.runCount > (1u << c.capLog2)) {
            return where + "bad run array";
          }
          const Run* r = RunsOf(c);
          uint32_t sum = 0;
          for (uint32_t i = 0; i < c.runCount; i++) {
            if (r[i].last < r[i].start || r[i].last >= limit) return where + "run out of order or past the chunk";
            if (i > 0 && uint32_t{r[i].start} <= uint32_t{r[i - 1].last} + 1) return where + "runs overlap or touch";
            sum += r[i].last - r[i].start + 1u;
          }
          if (sum != c.dirty || c.dirty == 0 || c.dirty >= limit) return where + "run count disagrees";
          memory += RunsBytes(c) + kMallocOverheadBytes;
          break;
        }
        case Chunk::kBitmap: {
          if (c.data == nullptr) return where + "bitmap missing";
          const uint64_t* w = BitsOf(c);
          uint32_t sum = 0;
          for (uint32_t i = 0; i < kBitmapWords; i++) sum += static_cast<uint32_t>(__builtin_popcountll(w[i]));
          if (limit < kChunkBlocks && NextBit(w, limit, kChunkBlocks, true) != kChunkBlocks) return where + "bits past the disk end";
          if (sum != c.dirty || c.dirty <= kRunsFromBitmap || c.dirty >= limit) return where + "bitmap count disagrees";
          memory += kBitmapBytes + kMallocOverheadBytes;
          break;
        }
        default:
          return where + "unknown kind";
      }
      if (c.kind != Chunk::kEmpty) used++;
      total += c.dirty;
    }
    if (used != page->used) return "page " + std::to_string(pi) + ": used count disagrees";
    if (used == 0) return "page " + std::to_string(pi) + ": empty page kept";
  }
  if (total != dirtyBlocks_) return "dirty block total disagrees";
  if (memory != memoryBytes_) return "memory accounting disagrees";
  return "";
}

// ---- JavaScript binding ----------------------------------------------------

namespace {

// Ranges arrive as doubles holding integers below 2^53; anything else would
// be a bug in the wrapper, and is clamped rather than trusted.
inline uint64_t BlockArg(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || !info[i].IsNumber()) return 0;
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!(v > 0)) return 0;
  if (v >= 9.0e15) return kMaxBlocks;
  return static_cast<uint64_t>(v);
}

class DirtyMapWrap : public Napi::ObjectWrap<DirtyMapWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DirtyMap",
                       {
                           InstanceMethod<&DirtyMapWrap::MarkJs>("mark"),
                           InstanceMethod<&DirtyMapWrap::MarkManyJs>("markMany"),
                           InstanceMethod<&DirtyMapWrap::ClearJs>("clear"),
                           InstanceMethod<&DirtyMapWrap::AnyDirtyJs>("anyDirty"),
                           InstanceMethod<&DirtyMapWrap::ExtentsJs>("extents"),
                           InstanceMethod<&DirtyMapWrap::DirtyBlocksJs>("dirtyBlocks"),
                           InstanceMethod<&DirtyMapWrap::MemoryBytesJs>("memoryBytes"),
                           InstanceMethod<&DirtyMapWrap::MergeJs>("merge"),
                           InstanceMethod<&DirtyMapWrap::ClearAllJs>("clearAll"),
                           InstanceMethod<&DirtyMapWrap::EncodeBodyJs>("encodeBody"),
                           InstanceMethod<&DirtyMapWrap::DecodeBodyJs>("decodeBody"),
                           InstanceMethod<&DirtyMapWrap::CheckJs>("checkInvariants"),
                           InstanceMethod<&DirtyMapWrap::StatsJs>("stats"),
                       });
  }

  explicit DirtyMapWrap(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<DirtyMapWrap>(info), core_(BlockArg(info, 0)) {
    napi_type_tag_object(info.Env(), info.This(), &kTypeTag);
    Report(info.Env());
  }

  void Finalize(Napi::Env env) override {
    if (reported_ != 0) Napi::MemoryManagement::AdjustExternalMemory(env, -reported_);
    reported_ = 0;
  }

 private:
  // Tells V8 about memory held outside its heap so the collector weighs a
  // large map properly; in steps, so marks do not pay for it each time.
  void Report(Napi::Env env) {
    int64_t now = static_cast<int64_t>(core_.memoryBytes());
    int64_t change = now - reported_;
    if (change > kReportStepBytes || change < -kReportStepBytes) {
      Napi::MemoryManagement::AdjustExternalMemory(env, change);
      reported_ = now;
    }
  }

  Napi::Value MarkJs(const Napi::CallbackInfo& info) {
    core_.Mark(BlockArg(info, 0), BlockArg(info, 1));
    Report(info.Env());
    return info.Env().Undefined();
  }

  // markMany(blockPairs: Float64Array): marks [pairs[2i], pairs[2i+1]) for
  // each i, so a caller with many ranges pays for one call, not one each.
  Napi::Value MarkManyJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsTypedArray()) return env.Undefined();
    Napi::TypedArray array = info[0].As<Napi::TypedArray>();
    if (array.TypedArrayType() != napi_float64_array) return env.Undefined();
    Napi::Float64Array pairs = array.As<Napi::Float64Array>();
    const double* p = pairs.Data();
    size_t n = pairs.ElementLength() / 2;
    auto block = [](double v) -> uint64_t {
      if (!(v > 0)) return 0;
      return v >= 9.0e15 ? kMaxBlocks : static_cast<uint64_t>(v);
    };
    for (size_t i = 0; i < n; i++) core_.Mark(block(p[2 * i]), block(p[2 * i + 1]));
    Report(env);
    return env.Undefined();
  }

  Napi::Value ClearJs(const Napi::CallbackInfo& info) {
    core_.Clear(BlockArg(info, 0), BlockArg(info, 1));
    Report(info.Env());
    return info.Env().Undefined();
  }

  Napi::Value AnyDirtyJs(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), core_.AnyDirty(BlockArg(info, 0), BlockArg(info, 1)));
  }

  // extents(from, to, max): Float64Array [resume, start0, end0, start1, ...].
  Napi::Value ExtentsJs(const Napi::CallbackInfo& info) {
    std::vector<uint64_t> pairs;
    uint64_t maxExtents = std::min<uint64_t>(BlockArg(info, 2), kMaxExtentsPerCall);
    uint64_t resume = core_.Extents(BlockArg(info, 0), BlockArg(info, 1), static_cast<size_t>(maxExtents), pairs);
    Napi::Float64Array out = Napi::Float64Array::New(info.Env(), pairs.size() + 1);
    if (out.IsEmpty()) return Napi::Value();
    out[0] = static_cast<double>(resume);
    for (size_t i = 0; i < pairs.size(); i++) out[i + 1] = static_cast<double>(pairs[i]);
    return out;
  }

  Napi::Value DirtyBlocksJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(core_.dirtyBlocks()));
  }

  Napi::Value MemoryBytesJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(core_.memoryBytes()));
  }

  Napi::Value MergeJs(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsObject()) return Napi::Boolean::New(info.Env(), false);
    Napi::Object other = info[0].As<Napi::Object>();
    // The type tag proves the object wraps a DirtyMapWrap before unwrapping.
    bool tagged = false;
    if (napi_check_object_type_tag(info.Env(), other, &kTypeTag, &tagged) != napi_ok || !tagged) {
      return Napi::Boolean::New(info.Env(), false);
    }
    DirtyMapWrap* wrap = Unwrap(other);
    if (wrap == nullptr) return Napi::Boolean::New(info.Env(), false);
    if (wrap->core_.blockCount() != core_.blockCount()) return Napi::Boolean::New(info.Env(), false);
    core_.Merge(wrap->core_);
    Report(info.Env());
    return Napi::Boolean::New(info.Env(), true);
  }

  Napi::Value ClearAllJs(const Napi::CallbackInfo& info) {
    core_.ClearAll();
    Report(info.Env());
    return info.Env().Undefined();
  }

  // encodeBody(reserveBytes): a Buffer whose first reserveBytes are left for
  // the caller's header, followed by the body.
  Napi::Value EncodeBodyJs(const Napi::CallbackInfo& info) {
    size_t reserve = static_cast<size_t>(std::min<uint64_t>(BlockArg(info, 0), 4096));
    size_t size = core_.BodySize();
    Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::New(info.Env(), reserve + size);
    // A failed allocation leaves a pending JavaScript exception; let it rise.
    if (out.IsEmpty() || out.Data() == nullptr) return Napi::Value();
    std::memset(out.Data(), 0, reserve);
    core_.WriteBody(out.Data() + reserve, size);
    return out;
  }

  // decodeBody(bytes, offset, length): null, or {offset, reason} relative to
  // the start of the body. The map is left empty on failure.
  Napi::Value DecodeBodyJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 3 || !info[0].IsTypedArray()) return env.Undefined();
    Napi::TypedArray array = info[0].As<Napi::TypedArray>();
    if (array.TypedArrayType() != napi_uint8_array) return env.Undefined();
    Napi::Uint8Array bytes = array.As<Napi::Uint8Array>();
    uint64_t offset = BlockArg(info, 1), length = BlockArg(info, 2);
    if (offset > bytes.ByteLength() || length > bytes.ByteLength() - offset) return env.Undefined();
    DecodeError err;
    bool ok = core_.ReadBody(bytes.Data() + offset, static_cast<size_t>(length), err);
    Report(env);
    if (ok) return env.Null();
    Napi::Object result = Napi::Object::New(env);
    result.Set("offset", Napi::Number::New(env, static_cast<double>(err.offset)));
    result.Set("reason", Napi::String::New(env, err.reason));
    return result;
  }

  Napi::Value StatsJs(const Napi::CallbackInfo& info) {
    DirtyMapCore::Stats stats = core_.GetStats();
    Napi::Float64Array out = Napi::Float64Array::New(info.Env(), 4);
    out[0] = static_cast<double>(stats.runChunks);
    out[1] = static_cast<double>(stats.bitmapChunks);
    out[2] = static_cast<double>(stats.fullChunks);
    out[3] = static_cast<double>(stats.pages);
    return out;
  }

  Napi::Value CheckJs(const Napi::CallbackInfo& info) {
    std::string problem = core_.CheckInvariants();
    if (problem.empty()) return info.Env().Null();
    return Napi::String::New(info.Env(), problem);
  }

  static constexpr napi_type_tag kTypeTag = {0x5b1a7e0c3d2f4e61ull, 0x9c8d7b6a5f4e3d2cull};
  static constexpr int64_t kReportStepBytes = 256 * 1024;
  static constexpr uint64_t kMaxExtentsPerCall = 1u << 20;
  DirtyMapCore core_;
  int64_t reported_ = 0;
};

}  // namespace

void InitDirtyMap(Napi::Env env, Napi::Object exports) {
  exports.Set("DirtyMap", DirtyMapWrap::Define(env));
  exports.Set("dirtyMapMaxBlocks", Napi::Number::New(env, static_cast<double>(kMaxBlocks)));
}

}  // namespace blockrelay
