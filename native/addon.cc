// Entry point of the blockrelay native addon. Each exported thing lives in its
// own .cc/.h pair; this file only registers them.
#include <napi.h>

#include "block-hashing.h"
#include "checksum.h"
#include "dirty-map.h"
#include "file-extents.h"
#include "file-lock.h"
#include "hrl-appender.h"
#include "page-cache.h"
#include "positioned-writes.h"
#include "tap-transmission.h"
#include "xxhash64.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("addonVersion", Napi::Number::New(env, 1));
  blockrelay::InitBlockHashing(env, exports);
  blockrelay::InitChecksum(env, exports);
  blockrelay::InitDirtyMap(env, exports);
  blockrelay::InitFileExtents(env, exports);
  blockrelay::InitFileLock(env, exports);
  blockrelay::InitHrlAppender(env, exports);
  blockrelay::InitPageCache(env, exports);
  blockrelay::InitPositionedWrites(env, exports);
  blockrelay::InitTapTransmission(env, exports);
  blockrelay::InitXxhash64(env, exports);
  return exports;
}

NODE_API_MODULE(blockrelay, Init)
