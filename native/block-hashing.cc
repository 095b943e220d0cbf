#include "block-hashing.h"

#include <cerrno>
#include <cstring>
#include <vector>

#include <unistd.h>

#include "addon-arguments.h"
#include "file-extents.h"
#include "xxhash64.h"

namespace blockrelay {

namespace {

// Bytes read before they are hashed: small enough to stay in L2 between
// the copy out of the page cache and the hash (measured: 1 MiB pieces and
// larger were slower per byte than 256 KiB on the 2-core machine), large
// enough that a pread costs little per byte.
constexpr size_t kPieceBytes = 256 * 1024;
// The largest block the resync wire allows (resync-wire.ts MAX_BLOCK_BYTES).
constexpr size_t kMaxBlockBytes = 16 * 1024 * 1024;
// The largest range one call reads: bounds the scratch and the time a pool
// thread is held.
constexpr size_t kMaxLengthBytes = 256 * 1024 * 1024;

// Reads up to n bytes at offset into buf, retrying short reads and EINTR;
// returns the bytes read (< n only at the end of the file) or -1.
int64_t ReadFully(int fd, uint8_t* buf, size_t n, int64_t offset, int& err) {
  size_t done = 0;
  while (done < n) {
    ssize_t got = pread(fd, buf + done, n - done, static_cast<off_t>(offset + static_cast<int64_t>(done)));
    if (got < 0) {
      if (errno == EINTR) continue;
      err = errno;
      return -1;
    }
    if (got == 0) break;
    done += static_cast<size_t>(got);
  }
  return static_cast<int64_t>(done);
}

}  // namespace

int64_t PreadHashBlocks(int fd, int64_t file_offset, size_t length, size_t block_bytes, uint8_t* dest, uint8_t* hashes, int& err) {
  // Whole blocks per piece, so no block straddles two pieces.
  const size_t piece = block_bytes >= kPieceBytes ? block_bytes : kPieceBytes - kPieceBytes % block_bytes;
  thread_local std::vector<uint8_t> scratch;
  if (dest == nullptr && scratch.size() < piece) scratch.resize(piece);
  int64_t held = 0;
  bool at_end = false;
  size_t block = 0;
  for (size_t pos = 0; pos < length; pos += piece) {
    const size_t n = length - pos < piece ? length - pos : piece;
    uint8_t* buf = dest != nullptr ? dest + pos : scratch.data();
    size_t got = 0;
    if (!at_end) {
      int64_t r = ReadFully(fd, buf, n, file_offset + static_cast<int64_t>(pos), err);
      if (r < 0) return -1;
      got = static_cast<size_t>(r);
      held += r;
      at_end = got < n;
    }
    if (got < n) std::memset(buf + got, 0, n - got);
    // Pieces hold whole blocks, so only the range's last piece can end in a short one.
    Xxh64Blocks(buf, n, block_bytes, hashes + block * 8);
    block += (n + block_bytes - 1) / block_bytes;
  }
  return held;
}

namespace {

class PreadHashWorker : public Napi::AsyncWorker {
 public:
  PreadHashWorker(Napi::Env env, int fd, int64_t file_offset, size_t length, size_t block_bytes, Napi::Uint8Array dest, Napi::Uint8Array hashes)
      : Napi::AsyncWorker(env, "blockrelay.preadHashBlocks"),
        deferred_(Napi::Promise::Deferred::New(env)),
        fd_(fd),
        file_offset_(file_offset),
        length_(length),
        block_bytes_(block_bytes),
        dest_(dest.IsEmpty() ? nullptr : dest.Data()),
        hashes_(hashes.Data()) {
    // The buffers must outlive the pool thread's use of them.
    if (!dest.IsEmpty()) dest_ref_ = Napi::Persistent(static_cast<Napi::Object>(dest));
    hashes_ref_ = Napi::Persistent(static_cast<Napi::Object>(hashes));
  }

  Napi::Promise Promise() const { return deferred_.Promise(); }

  void Execute() override { held_ = PreadHashBlocks(fd_, file_offset_, length_, block_bytes_, dest_, hashes_, err_); }

  void OnOK() override {
    Napi::Env env = Env();
    if (held_ >= 0) {
      deferred_.Resolve(Napi::Number::New(env, static_cast<double>(held_)));
    } else {
      deferred_.Resolve(Napi::String::New(env, ErrnoName(err_)));
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
  int fd_;
  int64_t file_offset_;
  size_t length_;
  size_t block_bytes_;
  uint8_t* dest_;
  uint8_t* hashes_;
  Napi::ObjectReference dest_ref_;
  Napi::ObjectReference hashes_ref_;
  int64_t held_ = 0;
  int err_ = 0;
};

Napi::Value PreadHashBlocksJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t fd, offset, length, block_bytes;
  if (info.Length() < 6 || !SizeArg(info, 0, 2147483647.0, fd) || !SizeArg(info, 1, kMaxSafe, offset) ||
      !SizeArg(info, 2, static_cast<double>(kMaxLengthBytes), length) || !SizeArg(info, 3, static_cast<double>(kMaxBlockBytes), block_bytes) ||
      block_bytes == 0 || length == 0 || !info[5].IsTypedArray()) {
    return env.Undefined();
  }
  Napi::Uint8Array dest;
  if (!info[4].IsNull()) {
    if (!info[4].IsTypedArray() || info[4].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) return env.Undefined();
    dest = info[4].As<Napi::Uint8Array>();
    if (dest.ByteLength() < length) return env.Undefined();
  }
  if (info[5].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) return env.Undefined();
  Napi::Uint8Array hashes = info[5].As<Napi::Uint8Array>();
  const size_t blocks = (length + block_bytes - 1) / block_bytes;
  if (hashes.ByteLength() < blocks * 8) return env.Undefined();
  // Owned by node-addon-api once queued: it deletes itself after OnOK.
  auto* worker = new PreadHashWorker(env, static_cast<int>(fd), static_cast<int64_t>(offset), length, block_bytes, dest, hashes);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

}  // namespace

void InitBlockHashing(Napi::Env env, Napi::Object exports) {
  exports.Set("preadHashBlocks", Napi::Function::New(env, PreadHashBlocksJs, "preadHashBlocks"));
}

}  // namespace blockrelay
