#include "xxhash64.h"

#include "addon-arguments.h"

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace blockrelay {

namespace {

constexpr uint64_t kPrime1 = 0x9E3779B185EBCA87ull;
constexpr uint64_t kPrime2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kPrime3 = 0x165667B19E3779F9ull;
constexpr uint64_t kPrime4 = 0x85EBCA77C2B2AE63ull;
constexpr uint64_t kPrime5 = 0x27D4EB2F165667C5ull;

inline uint64_t Rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// The format is little-endian; memcpy keeps unaligned reads defined.
inline uint64_t Read64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

inline uint32_t Read32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return v;
}

inline uint64_t Round(uint64_t acc, uint64_t lane) {
  acc += lane * kPrime2;
  acc = Rotl(acc, 31);
  return acc * kPrime1;
}

inline uint64_t MergeRound(uint64_t acc, uint64_t value) {
  acc ^= Round(0, value);
  return acc * kPrime1 + kPrime4;
}

}  // namespace

namespace {

// The four lanes folded into one value (lengths of 32 bytes and more).
inline uint64_t Converge(uint64_t v1, uint64_t v2, uint64_t v3, uint64_t v4) {
  uint64_t h = Rotl(v1, 1) + Rotl(v2, 7) + Rotl(v3, 12) + Rotl(v4, 18);
  h = MergeRound(h, v1);
  h = MergeRound(h, v2);
  h = MergeRound(h, v3);
  return MergeRound(h, v4);
}

// The bytes after the last whole stripe, then the final avalanche.
inline uint64_t Finish(uint64_t h, const uint8_t* p, const uint8_t* end) {
  while (end - p >= 8) {
    h ^= Round(0, Read64(p));
    h = Rotl(h, 27) * kPrime1 + kPrime4;
    p += 8;
  }
  if (end - p >= 4) {
    h ^= static_cast<uint64_t>(Read32(p)) * kPrime1;
    h = Rotl(h, 23) * kPrime2 + kPrime3;
    p += 4;
  }
  while (p < end) {
    h ^= static_cast<uint64_t>(*p) * kPrime5;
    h = Rotl(h, 11) * kPrime1;
    p++;
  }
  h ^= h >> 33;
  h *= kPrime2;
  h ^= h >> 29;
  h *= kPrime3;
  h ^= h >> 32;
  return h;
}

inline void StoreLe64(uint8_t* out, uint64_t v) {
  for (int i = 0; i < 8; i++) out[i] = static_cast<uint8_t>(v >> (8 * i));
}

}  // namespace

uint64_t Xxh64(const uint8_t* data, size_t length, uint64_t seed) {
  const uint8_t* p = data;
  const uint8_t* const end = data + length;
  uint64_t h;
  if (length >= 32) {
    uint64_t v1 = seed + kPrime1 + kPrime2;
    uint64_t v2 = seed + kPrime2;
    uint64_t v3 = seed;
    uint64_t v4 = seed - kPrime1;
    const uint8_t* const limit = end - 32;
    do {
      v1 = Round(v1, Read64(p));
      v2 = Round(v2, Read64(p + 8));
      v3 = Round(v3, Read64(p + 16));
      v4 = Round(v4, Read64(p + 24));
      p += 32;
    } while (p <= limit);
    h = Converge(v1, v2, v3, v4);
  } else {
    h = seed + kPrime5;
  }
  h += static_cast<uint64_t>(length);
  return Finish(h, p, end);
}

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BLOCKRELAY_XXH64_AVX512 1

// Blocks hashed side by side: enough independent multiply chains to hide
// vpmullq's latency, few enough that their streams stay in the prefetchers.
constexpr size_t kVectorBlocks = 8;

// XXH64 is one serial chain per 8-byte lane, so one block cannot be
// vectorized; but a block's four lanes are exactly one 256-bit stripe, and
// a resync hashes thousands of independent blocks. So each ymm register
// holds one block's four accumulators, and eight blocks advance together:
// the same Round as the scalar code, four lanes per instruction (64-bit
// multiplies need AVX-512DQ, 256-bit forms AVX-512VL). The result is the
// scalar XXH64 of each block, bit for bit (the tests compare the two).
// `block_bytes` is a positive multiple of 32; `out` gets kVectorBlocks hashes.
__attribute__((target("avx512f,avx512vl,avx512dq"))) void HashEightBlocksAvx512(const uint8_t* data, size_t block_bytes, uint8_t* out) {
  const __m256i prime1 = _mm256_set1_epi64x(static_cast<long long>(kPrime1));
  const __m256i prime2 = _mm256_set1_epi64x(static_cast<long long>(kPrime2));
  const __m256i init = _mm256_setr_epi64x(static_cast<long long>(kPrime1 + kPrime2), static_cast<long long>(kPrime2), 0, static_cast<long long>(0 - kPrime1));
  __m256i acc[kVectorBlocks];
  for (size_t b = 0; b < kVectorBlocks; b++) acc[b] = init;
  for (size_t at = 0; at < block_bytes; at += 32) {
    for (size_t b = 0; b < kVectorBlocks; b++) {
      const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + b * block_bytes + at));
      __m256i a = _mm256_add_epi64(acc[b], _mm256_mullo_epi64(lanes, prime2));
      a = _mm256_rol_epi64(a, 31);
      acc[b] = _mm256_mullo_epi64(a, prime1);
    }
  }
  for (size_t b = 0; b < kVectorBlocks; b++) {
    alignas(32) uint64_t v[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), acc[b]);
    const uint8_t* end = data + (b + 1) * block_bytes;
    StoreLe64(out + b * 8, Finish(Converge(v[0], v[1], v[2], v[3]) + static_cast<uint64_t>(block_bytes), end, end));
  }
}

bool DetectAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

const bool kHasAvx512 = DetectAvx512();
#else
constexpr bool kHasAvx512 = false;
#endif

}  // namespace

bool Xxh64BlocksVectorized() { return kHasAvx512; }

void Xxh64Blocks(const uint8_t* data, size_t length, size_t block_bytes, uint8_t* out, BlockHashPath path) {
  size_t at = 0;
  size_t block = 0;
#ifdef BLOCKRELAY_XXH64_AVX512
  if (path == BlockHashPath::kAuto && kHasAvx512 && block_bytes >= 32 && block_bytes % 32 == 0) {
    for (; length - at >= kVectorBlocks * block_bytes; at += kVectorBlocks * block_bytes, block += kVectorBlocks) {
      HashEightBlocksAvx512(data + at, block_bytes, out + block * 8);
    }
  }
#else
  (void)path;
#endif
  for (; at < length; at += block_bytes, block++) {
    const size_t n = length - at < block_bytes ? length - at : block_bytes;
    StoreLe64(out + block * 8, Xxh64(data + at, n));
  }
}

namespace {

// xxh64(data, offset, length): bigint. The wrapper has checked that the
// range lies inside data; a range that does not is answered with undefined.
Napi::Value Xxh64Js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsTypedArray() || !info[1].IsNumber() || !info[2].IsNumber()) return env.Undefined();
  Napi::TypedArray array = info[0].As<Napi::TypedArray>();
  if (array.TypedArrayType() != napi_uint8_array) return env.Undefined();
  Napi::Uint8Array bytes = array.As<Napi::Uint8Array>();
  double offset = info[1].As<Napi::Number>().DoubleValue();
  double length = info[2].As<Napi::Number>().DoubleValue();
  double size = static_cast<double>(bytes.ByteLength());
  if (!(offset >= 0) || !(length >= 0) || offset + length > size) return env.Undefined();
  uint64_t hash = Xxh64(bytes.Data() + static_cast<size_t>(offset), static_cast<size_t>(length));
  return Napi::BigInt::New(env, hash);
}

// xxh64Blocks(data, blockBytes, out, scalar): true once `out` holds the
// hashes of data's blocks; undefined for arguments the wrapper should have
// refused (out too small, a block size of 0).
Napi::Value Xxh64BlocksJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t block_bytes;
  if (info.Length() < 4 || !info[0].IsTypedArray() || !SizeArg(info, 1, 4294967296.0, block_bytes) || block_bytes == 0 || !info[2].IsTypedArray() || !info[3].IsBoolean()) return env.Undefined();
  if (info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) return env.Undefined();
  Napi::Uint8Array data = info[0].As<Napi::Uint8Array>();
  Napi::Uint8Array out = info[2].As<Napi::Uint8Array>();
  const size_t blocks = (data.ByteLength() + block_bytes - 1) / block_bytes;
  if (out.ByteLength() < blocks * 8) return env.Undefined();
  const BlockHashPath path = info[3].As<Napi::Boolean>().Value() ? BlockHashPath::kScalar : BlockHashPath::kAuto;
  Xxh64Blocks(data.Data(), data.ByteLength(), block_bytes, out.Data(), path);
  return Napi::Boolean::New(env, true);
}

}  // namespace

void InitXxhash64(Napi::Env env, Napi::Object exports) {
  exports.Set("xxh64", Napi::Function::New(env, Xxh64Js, "xxh64"));
  exports.Set("xxh64Blocks", Napi::Function::New(env, Xxh64BlocksJs, "xxh64Blocks"));
  exports.Set("xxh64BlocksVectorized", Napi::Function::New(env, [](const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), Xxh64BlocksVectorized()); }, "xxh64BlocksVectorized"));
}

}  // namespace blockrelay
