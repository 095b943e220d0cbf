#include "page-cache.h"

#include <fcntl.h>

#include "addon-arguments.h"
#include "file-extents.h"

namespace blockrelay {

namespace {

Napi::Value DropFileCacheJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  double fd;
  double offset;
  double length;
  if (!NumberArg(info, 0, 2147483647.0, fd)) return env.Undefined();
  if (!NumberArg(info, 1, kMaxSafe, offset)) return env.Undefined();
  if (!NumberArg(info, 2, kMaxSafe, length)) return env.Undefined();
  // posix_fadvise returns the error number instead of setting errno.
  int rc = posix_fadvise(static_cast<int>(fd), static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_DONTNEED);
  if (rc == 0) return Napi::Number::New(env, 0);
  return Napi::String::New(env, ErrnoName(rc));
}

}  // namespace

void InitPageCache(Napi::Env env, Napi::Object exports) {
  exports.Set("dropFileCache", Napi::Function::New(env, DropFileCacheJs, "dropFileCache"));
}

}  // namespace blockrelay
