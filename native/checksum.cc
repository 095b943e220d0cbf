#include "checksum.h"

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BLOCKRELAY_X86 1
#endif

namespace blockrelay {

namespace {

// Eight bytes at a time in ordinary registers: the even and odd bytes of each
// word are added into four 16-bit lanes. A lane gains at most 2 * 255 per
// word, so 128 words (510 * 128 = 65280 < 65536) can be added before the
// lanes must be folded into the 64-bit total.
uint64_t SumPortable(const uint8_t* data, size_t length) {
  constexpr uint64_t kLowBytes = 0x00FF00FF00FF00FFull;
  constexpr size_t kWordsPerFold = 128;
  uint64_t total = 0;
  size_t i = 0;
  while (length - i >= 8) {
    size_t words = (length - i) / 8;
    if (words > kWordsPerFold) words = kWordsPerFold;
    uint64_t lanes = 0;
    for (size_t w = 0; w < words; w++, i += 8) {
      uint64_t word;
      std::memcpy(&word, data + i, 8);
      lanes += word & kLowBytes;
      lanes += (word >> 8) & kLowBytes;
    }
    // Four 16-bit lanes: fold pairs into 32-bit lanes, then add the two.
    uint64_t pairs = (lanes & 0x0000FFFF0000FFFFull) + ((lanes >> 16) & 0x0000FFFF0000FFFFull);
    total += (pairs & 0xFFFFFFFFull) + (pairs >> 32);
  }
  for (; i < length; i++) total += data[i];
  return total;
}

#if BLOCKRELAY_X86
// _mm_sad_epu8 against zero adds eight bytes into a 64-bit lane, so the
// accumulators cannot overflow. Four independent accumulators keep the adds
// off one dependency chain.
uint64_t SumSse2(const uint8_t* data, size_t length) {
  const __m128i zero = _mm_setzero_si128();
  __m128i a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  size_t i = 0;
  for (; length - i >= 64; i += 64) {
    const __m128i* p = reinterpret_cast<const __m128i*>(data + i);
    a0 = _mm_add_epi64(a0, _mm_sad_epu8(_mm_loadu_si128(p), zero));
    a1 = _mm_add_epi64(a1, _mm_sad_epu8(_mm_loadu_si128(p + 1), zero));
    a2 = _mm_add_epi64(a2, _mm_sad_epu8(_mm_loadu_si128(p + 2), zero));
    a3 = _mm_add_epi64(a3, _mm_sad_epu8(_mm_loadu_si128(p + 3), zero));
  }
  for (; length - i >= 16; i += 16) {
    a0 = _mm_add_epi64(a0, _mm_sad_epu8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + i)), zero));
  }
  __m128i acc = _mm_add_epi64(_mm_add_epi64(a0, a1), _mm_add_epi64(a2, a3));
  uint64_t lanes[2];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes), acc);
  uint64_t total = lanes[0] + lanes[1];
  for (; i < length; i++) total += data[i];
  return total;
}

__attribute__((target("avx2"))) uint64_t SumAvx2(const uint8_t* data, size_t length) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  size_t i = 0;
  for (; length - i >= 128; i += 128) {
    const __m256i* p = reinterpret_cast<const __m256i*>(data + i);
    a0 = _mm256_add_epi64(a0, _mm256_sad_epu8(_mm256_loadu_si256(p), zero));
    a1 = _mm256_add_epi64(a1, _mm256_sad_epu8(_mm256_loadu_si256(p + 1), zero));
    a2 = _mm256_add_epi64(a2, _mm256_sad_epu8(_mm256_loadu_si256(p + 2), zero));
    a3 = _mm256_add_epi64(a3, _mm256_sad_epu8(_mm256_loadu_si256(p + 3), zero));
  }
  for (; length - i >= 32; i += 32) {
    a0 = _mm256_add_epi64(a0, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i)), zero));
  }
  __m256i acc = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  uint64_t lanes[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), acc);
  uint64_t total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < length; i++) total += data[i];
  return total;
}

bool CpuHasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

SumKernel Resolve(SumKernel kernel) {
  if (kernel != SumKernel::kBest) return kernel;
#if BLOCKRELAY_X86
  return CpuHasAvx2() ? SumKernel::kAvx2 : SumKernel::kSse2;
#else
  return SumKernel::kPortable;
#endif
}

}  // namespace

bool SumKernelAvailable(SumKernel kernel) {
  switch (kernel) {
    case SumKernel::kBest:
    case SumKernel::kPortable:
      return true;
#if BLOCKRELAY_X86
    case SumKernel::kSse2:
      return true;
    case SumKernel::kAvx2:
      return CpuHasAvx2();
#else
    case SumKernel::kSse2:
    case SumKernel::kAvx2:
      return false;
#endif
  }
  return false;
}

uint64_t ByteSum(const uint8_t* data, size_t length, SumKernel kernel) {
  if (length == 0) return 0;
  switch (Resolve(kernel)) {
#if BLOCKRELAY_X86
    case SumKernel::kAvx2:
      if (CpuHasAvx2()) return SumAvx2(data, length);
      return SumSse2(data, length);
    case SumKernel::kSse2:
      return SumSse2(data, length);
#endif
    default:
      return SumPortable(data, length);
  }
}

uint32_t HrlChecksum(const uint8_t* data, size_t length, int64_t ignoreOffset, SumKernel kernel) {
  uint64_t sum = ByteSum(data, length, kernel);
  // Summing everything and then taking the ignored bytes back out keeps the
  // hot loop free of a per-byte test.
  if (ignoreOffset >= 0 && static_cast<uint64_t>(ignoreOffset) < length) {
    size_t end = static_cast<size_t>(ignoreOffset) + 4;
    if (end > length) end = length;
    for (size_t i = static_cast<size_t>(ignoreOffset); i < end; i++) sum -= data[i];
  }
  return ~static_cast<uint32_t>(sum);
}

namespace {

// hrlChecksum(data: Uint8Array, ignoreOffset: number, kernel: number): number.
// The TypeScript wrapper has validated the arguments; a wrong type here is a
// programming error, answered with undefined rather than a crash.
Napi::Value HrlChecksumJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsTypedArray() || !info[1].IsNumber() || !info[2].IsNumber()) {
    return env.Undefined();
  }
  Napi::TypedArray array = info[0].As<Napi::TypedArray>();
  if (array.TypedArrayType() != napi_uint8_array) return env.Undefined();
  Napi::Uint8Array bytes = array.As<Napi::Uint8Array>();
  double ignore = info[1].As<Napi::Number>().DoubleValue();
  int kernel = info[2].As<Napi::Number>().Int32Value();
  if (kernel < 0 || kernel > 3 || !SumKernelAvailable(static_cast<SumKernel>(kernel))) return env.Undefined();
  int64_t ignoreOffset = ignore >= 0 && ignore < 9.0e15 ? static_cast<int64_t>(ignore) : -1;
  uint32_t checksum = HrlChecksum(bytes.Data(), bytes.ByteLength(), ignoreOffset, static_cast<SumKernel>(kernel));
  return Napi::Number::New(env, checksum);
}

}  // namespace

void InitChecksum(Napi::Env env, Napi::Object exports) {
  exports.Set("hrlChecksum", Napi::Function::New(env, HrlChecksumJs, "hrlChecksum"));
  Napi::Array kernels = Napi::Array::New(env);
  const struct {
    SumKernel kernel;
    const char* name;
  } all[] = {{SumKernel::kPortable, "portable"}, {SumKernel::kSse2, "sse2"}, {SumKernel::kAvx2, "avx2"}};
  uint32_t n = 0;
  for (const auto& k : all) {
    if (!SumKernelAvailable(k.kernel)) continue;
    Napi::Object entry = Napi::Object::New(env);
    entry.Set("id", Napi::Number::New(env, static_cast<int>(k.kernel)));
    entry.Set("name", Napi::String::New(env, k.name));
    kernels.Set(n++, entry);
  }
  exports.Set("hrlChecksumKernels", kernels);
  exports.Set("hrlChecksumBestKernel", Napi::Number::New(env, static_cast<int>(Resolve(SumKernel::kBest))));
}

}  // namespace blockrelay
