#include "page-cache.h"

#include <fcntl.h>

#include "addon-arguments.h"
#include "file-extents.h"

namespace blockrelay {

namespace {

// The (fd, offset, length) both calls take; false when one is missing or out of range.
bool DropArgs(const Napi::CallbackInfo& info, int& fd, off_t& offset, off_t& length) {
  double f;
  double o;
  double l;
  if (!NumberArg(info, 0, 2147483647.0, f) || !NumberArg(info, 1, kMaxSafe, o) || !NumberArg(info, 2, kMaxSafe, l)) return false;
  fd = static_cast<int>(f);
  offset = static_cast<off_t>(o);
  length = static_cast<off_t>(l);
  return true;
}

Napi::Value DropFileCacheJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  off_t offset;
  off_t length;
  if (!DropArgs(info, fd, offset, length)) return env.Undefined();
  // posix_fadvise returns the error number instead of setting errno.
  int rc = posix_fadvise(fd, offset, length, POSIX_FADV_DONTNEED);
  if (rc == 0) return Napi::Number::New(env, 0);
  return Napi::String::New(env, ErrnoName(rc));
}

// The same call on a pool thread: on a file with many dirty pages the
// kernel submits their writeback before it returns, which may wait on the
// block layer's queue, and the thread that asked (a hop's event loop) must
// not wait with it.
class DropWorker : public Napi::AsyncWorker {
 public:
  DropWorker(Napi::Env env, int fd, off_t offset, off_t length)
      : Napi::AsyncWorker(env, "blockrelay.dropFileCache"), deferred_(Napi::Promise::Deferred::New(env)), fd_(fd), offset_(offset), length_(length) {}

  Napi::Promise Promise() const { return deferred_.Promise(); }

  void Execute() override { rc_ = posix_fadvise(fd_, offset_, length_, POSIX_FADV_DONTNEED); }

  void OnOK() override {
    Napi::Env env = Env();
    if (rc_ == 0) {
      deferred_.Resolve(Napi::Number::New(env, 0));
    } else {
      deferred_.Resolve(Napi::String::New(env, ErrnoName(rc_)));
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
  int fd_;
  off_t offset_;
  off_t length_;
  int rc_ = 0;
};

Napi::Value DropFileCacheAsyncJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  off_t offset;
  off_t length;
  if (!DropArgs(info, fd, offset, length)) return env.Undefined();
  // Owned by node-addon-api once queued: it deletes itself after OnOK.
  auto* worker = new DropWorker(env, fd, offset, length);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

}  // namespace

void InitPageCache(Napi::Env env, Napi::Object exports) {
  exports.Set("dropFileCache", Napi::Function::New(env, DropFileCacheJs, "dropFileCache"));
  exports.Set("dropFileCacheAsync", Napi::Function::New(env, DropFileCacheAsyncJs, "dropFileCacheAsync"));
}

}  // namespace blockrelay
