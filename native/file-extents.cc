#include "file-extents.h"

#include <cerrno>
#include <cstring>

#include <fcntl.h>
#include <unistd.h>

namespace blockrelay {

int64_t SeekFile(int fd, int64_t offset, SeekKind kind, int& err) {
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
  off_t at = lseek(fd, static_cast<off_t>(offset), kind == SeekKind::kData ? SEEK_DATA : SEEK_HOLE);
  if (at >= 0) return static_cast<int64_t>(at);
  err = errno;
  return -1;
#else
  (void)fd;
  (void)offset;
  (void)kind;
  err = EINVAL;
  return -1;
#endif
}

int PunchHole(int fd, int64_t offset, int64_t length) {
#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE)
  for (;;) {
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) {
      return 0;
    }
    if (errno != EINTR) return errno;
  }
#else
  (void)fd;
  (void)offset;
  (void)length;
  return EOPNOTSUPP;
#endif
}

const char* ErrnoName(int err) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  const char* name = strerrorname_np(err);
  if (name != nullptr) return name;
#endif
  switch (err) {
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    case ENOSPC: return "ENOSPC";
    case ENOSYS: return "ENOSYS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EPERM: return "EPERM";
    case ESPIPE: return "ESPIPE";
    default: return "EUNKNOWN";
  }
}

namespace {

// The wrapper has validated the arguments: fd a non-negative int32, offsets
// and lengths safe non-negative integers. A wrong type here is a programming
// error, answered with undefined rather than a crash.
bool ReadInt64(const Napi::Value& value, int64_t& out) {
  if (!value.IsNumber()) return false;
  double d = value.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 9007199254740991.0)) return false;
  out = static_cast<int64_t>(d);
  return true;
}

bool ReadFd(const Napi::Value& value, int& out) {
  int64_t fd;
  if (!ReadInt64(value, fd) || fd > 0x7fffffff) return false;
  out = static_cast<int>(fd);
  return true;
}

Napi::Value SeekJs(const Napi::CallbackInfo& info, SeekKind kind) {
  Napi::Env env = info.Env();
  int fd;
  int64_t offset;
  if (info.Length() < 2 || !ReadFd(info[0], fd) || !ReadInt64(info[1], offset)) return env.Undefined();
  int err = 0;
  int64_t at = SeekFile(fd, offset, kind, err);
  if (at >= 0 || err == ENXIO) return Napi::Number::New(env, static_cast<double>(at));
  return Napi::String::New(env, ErrnoName(err));
}

Napi::Value SeekDataJs(const Napi::CallbackInfo& info) { return SeekJs(info, SeekKind::kData); }
Napi::Value SeekHoleJs(const Napi::CallbackInfo& info) { return SeekJs(info, SeekKind::kHole); }

// Runs fallocate on a pool thread. Execute() touches no JS value; the
// result goes back through OnOK() on the main thread. The caller keeps fd
// open until the promise settles.
class PunchHoleWorker : public Napi::AsyncWorker {
 public:
  PunchHoleWorker(Napi::Env env, int fd, int64_t offset, int64_t length)
      : Napi::AsyncWorker(env, "blockrelay.punchHole"),
        deferred_(Napi::Promise::Deferred::New(env)),
        fd_(fd),
        offset_(offset),
        length_(length) {}

  Napi::Promise Promise() const { return deferred_.Promise(); }

  void Execute() override { err_ = PunchHole(fd_, offset_, length_); }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_ == 0) {
      deferred_.Resolve(Napi::Number::New(env, 0));
    } else {
      deferred_.Resolve(Napi::String::New(env, ErrnoName(err_)));
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
  int fd_;
  int64_t offset_;
  int64_t length_;
  int err_ = 0;
};

Napi::Value PunchHoleJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t offset, length;
  if (info.Length() < 3 || !ReadFd(info[0], fd) || !ReadInt64(info[1], offset) || !ReadInt64(info[2], length) || length == 0) {
    return env.Undefined();
  }
  // Owned by node-addon-api once queued: it deletes itself after OnOK.
  auto* worker = new PunchHoleWorker(env, fd, offset, length);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

}  // namespace

void InitFileExtents(Napi::Env env, Napi::Object exports) {
  exports.Set("seekData", Napi::Function::New(env, SeekDataJs, "seekData"));
  exports.Set("seekHole", Napi::Function::New(env, SeekHoleJs, "seekHole"));
  exports.Set("punchHole", Napi::Function::New(env, PunchHoleJs, "punchHole"));
}

}  // namespace blockrelay
