#include "positioned-writes.h"

#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <vector>

#include "addon-arguments.h"
#include "file-extents.h"

namespace blockrelay {

namespace {

// At most this many iovecs per pwritev (IOV_MAX is 1024 on Linux).
constexpr size_t kMaxIovecs = 1024;
// A batch larger than this is refused (the TypeScript side sends a span of
// one log's payloads, a few MiB).
constexpr size_t kMaxPieces = 1 << 20;

struct Piece {
  uint8_t* data;
  size_t length;
  int64_t position;
};

// Writes (or reads) pieces[first, last) that lie back to back in the file
// with pwritev (preadv), continuing after a short transfer. 0 or an errno;
// a read that meets the end of the file is kEndOfFile.
constexpr int kEndOfFile = -1;

int TransferRun(int fd, bool read, const std::vector<Piece>& pieces, size_t first, size_t last) {
  std::vector<iovec> iov;
  iov.reserve(last - first);
  for (size_t i = first; i < last; i++) iov.push_back({pieces[i].data, pieces[i].length});
  int64_t position = pieces[first].position;
  size_t at = 0;
  while (at < iov.size()) {
    int count = static_cast<int>(iov.size() - at < kMaxIovecs ? iov.size() - at : kMaxIovecs);
    ssize_t n = read ? preadv(fd, &iov[at], count, static_cast<off_t>(position)) : pwritev(fd, &iov[at], count, static_cast<off_t>(position));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    // A read of nothing is the end of the file; a write of nothing when
    // bytes were asked for is reported as ENOSPC, as write(2) would.
    if (n == 0) return read ? kEndOfFile : ENOSPC;
    position += n;
    size_t left = static_cast<size_t>(n);
    while (left > 0 && at < iov.size()) {
      if (left >= iov[at].iov_len) {
        left -= iov[at].iov_len;
        at++;
      } else {
        iov[at].iov_base = static_cast<uint8_t*>(iov[at].iov_base) + left;
        iov[at].iov_len -= left;
        left = 0;
      }
    }
  }
  return 0;
}

// Runs the transfers on a pool thread. The buffers stay alive through a
// reference to the array that holds them; Execute() touches no JS value.
class TransferWorker : public Napi::AsyncWorker {
 public:
  TransferWorker(Napi::Env env, int fd, bool read, Napi::Array buffers, std::vector<Piece> pieces)
      : Napi::AsyncWorker(env, read ? "blockrelay.readAt" : "blockrelay.writeAt"),
        deferred_(Napi::Promise::Deferred::New(env)),
        buffers_(Napi::Persistent(buffers.As<Napi::Object>())),
        fd_(fd),
        read_(read),
        pieces_(std::move(pieces)) {}

  Napi::Promise Promise() const { return deferred_.Promise(); }

  void Execute() override {
    size_t first = 0;
    while (first < pieces_.size()) {
      size_t last = first + 1;
      while (last < pieces_.size() && pieces_[last].position == pieces_[last - 1].position + static_cast<int64_t>(pieces_[last - 1].length)) last++;
      err_ = TransferRun(fd_, read_, pieces_, first, last);
      if (err_ != 0) {
        failed_ = first;
        return;
      }
      first = last;
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    buffers_.Reset();
    if (err_ == 0) {
      deferred_.Resolve(Napi::Number::New(env, 0));
      return;
    }
    Napi::Array out = Napi::Array::New(env, 2);
    out.Set(uint32_t{0}, Napi::String::New(env, err_ == kEndOfFile ? "EOF" : ErrnoName(err_)));
    out.Set(uint32_t{1}, Napi::Number::New(env, static_cast<double>(failed_)));
    deferred_.Resolve(out);
  }

 private:
  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference buffers_;
  int fd_;
  bool read_;
  std::vector<Piece> pieces_;
  int err_ = 0;
  size_t failed_ = 0;
};

Napi::Value TransferJs(const Napi::CallbackInfo& info, bool read) {
  Napi::Env env = info.Env();
  double fd;
  if (!NumberArg(info, 0, 2147483647.0, fd) || info.Length() < 3 || !info[1].IsArray() || !info[2].IsTypedArray()) return env.Undefined();
  Napi::Array buffers = info[1].As<Napi::Array>();
  Napi::TypedArray typed = info[2].As<Napi::TypedArray>();
  if (typed.TypedArrayType() != napi_float64_array) return env.Undefined();
  Napi::Float64Array positions = info[2].As<Napi::Float64Array>();
  size_t count = buffers.Length();
  if (count == 0 || count > kMaxPieces || positions.ElementLength() != count) return env.Undefined();
  std::vector<Piece> pieces;
  pieces.reserve(count);
  for (size_t i = 0; i < count; i++) {
    Napi::Value v = buffers.Get(static_cast<uint32_t>(i));
    if (!v.IsBuffer()) return env.Undefined();
    Napi::Buffer<uint8_t> b = v.As<Napi::Buffer<uint8_t>>();
    double p = positions[i];
    if (!(p >= 0 && p <= kMaxSafe) || p != static_cast<double>(static_cast<int64_t>(p)) || b.Length() == 0) return env.Undefined();
    pieces.push_back({b.Data(), b.Length(), static_cast<int64_t>(p)});
  }
  // Owned by node-addon-api once queued: it deletes itself after OnOK.
  auto* worker = new TransferWorker(env, static_cast<int>(fd), read, buffers, std::move(pieces));
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

Napi::Value WriteAtJs(const Napi::CallbackInfo& info) { return TransferJs(info, false); }
Napi::Value ReadAtJs(const Napi::CallbackInfo& info) { return TransferJs(info, true); }

}  // namespace

void InitPositionedWrites(Napi::Env env, Napi::Object exports) {
  exports.Set("writeAt", Napi::Function::New(env, WriteAtJs, "writeAt"));
  exports.Set("readAt", Napi::Function::New(env, ReadAtJs, "readAt"));
}

}  // namespace blockrelay
