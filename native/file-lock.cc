#include "file-lock.h"

#include <sys/file.h>

#include <cerrno>

#include "addon-arguments.h"
#include "file-extents.h"

namespace blockrelay {

namespace {

Napi::Value LockExclusiveJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  double fd;
  if (!NumberArg(info, 0, 2147483647.0, fd)) return env.Undefined();
  int rc;
  do {
    rc = flock(static_cast<int>(fd), LOCK_EX | LOCK_NB);
  } while (rc != 0 && errno == EINTR);
  if (rc == 0) return Napi::Number::New(env, 0);
  // EAGAIN and EWOULDBLOCK are one value on Linux; name it the way flock(2) does.
  if (errno == EWOULDBLOCK) return Napi::String::New(env, "EWOULDBLOCK");
  return Napi::String::New(env, ErrnoName(errno));
}

}  // namespace

void InitFileLock(Napi::Env env, Napi::Object exports) {
  exports.Set("lockExclusive", Napi::Function::New(env, LockExclusiveJs, "lockExclusive"));
}

}  // namespace blockrelay
