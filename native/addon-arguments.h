// Checks of numbers passed from JavaScript, shared by the addon's entry
// points. The TypeScript wrappers (src/platform/addon-arguments.ts) refuse
// bad arguments with a clear error first; these checks keep C++ safe if one
// slips through anyway.
#ifndef BLOCKRELAY_ADDON_ARGUMENTS_H_
#define BLOCKRELAY_ADDON_ARGUMENTS_H_

#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace blockrelay {

// 2^53 - 1: the largest integer a JavaScript number holds exactly.
constexpr double kMaxSafe = 9007199254740991.0;

// info[i] as a whole number from 0 to max; false when it is missing, not a
// number, fractional or out of range.
inline bool NumberArg(const Napi::CallbackInfo& info, size_t i, double max, double& out) {
  if (info.Length() <= i || !info[i].IsNumber()) return false;
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!(v >= 0 && v <= max) || v != static_cast<double>(static_cast<uint64_t>(v))) return false;
  out = v;
  return true;
}

// The same, as a size.
inline bool SizeArg(const Napi::CallbackInfo& info, size_t i, double max, size_t& out) {
  double v;
  if (!NumberArg(info, i, max, v)) return false;
  out = static_cast<size_t>(v);
  return true;
}

}  // namespace blockrelay

#endif  // BLOCKRELAY_ADDON_ARGUMENTS_H_
