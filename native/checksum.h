// The [MS-HRL] §2.6 byte-sum checksum: ~(sum of all bytes mod 2^32), skipping
// a 4-byte field. Log payloads are checksummed as they stream through the
// tracker and the process server, so the sum runs at memory speed: SIMD
// kernels (SSE2, AVX2) picked at run time, with a portable SWAR fallback.
#ifndef BLOCKRELAY_CHECKSUM_H_
#define BLOCKRELAY_CHECKSUM_H_

#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace blockrelay {

// Which summing loop to use. kBest picks the fastest one this CPU supports;
// the others exist so tests can hold every kernel to the reference.
enum class SumKernel : int { kBest = 0, kPortable = 1, kSse2 = 2, kAvx2 = 3 };

// True when `kernel` can run on this build and CPU.
bool SumKernelAvailable(SumKernel kernel);

// The sum of every byte of data[0, length) in 64 bits (cannot overflow for
// any buffer that fits in memory).
uint64_t ByteSum(const uint8_t* data, size_t length, SumKernel kernel = SumKernel::kBest);

// ~(byte sum mod 2^32), leaving out the bytes of [ignoreOffset, ignoreOffset+4)
// that lie inside the buffer. A negative ignoreOffset ignores nothing.
uint32_t HrlChecksum(const uint8_t* data, size_t length, int64_t ignoreOffset,
                     SumKernel kernel = SumKernel::kBest);

// Registers hrlChecksum(data, ignoreOffset, kernel) and hrlChecksumKernels.
void InitChecksum(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_CHECKSUM_H_
