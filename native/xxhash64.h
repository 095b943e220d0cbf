// XXH64, the 64-bit xxHash (seed 0 unless given): the checksum of the
// persisted dirty map. Written from the published algorithm description and
// checked against the xxhash-wasm package in the tests.
#ifndef BLOCKRELAY_XXHASH64_H_
#define BLOCKRELAY_XXHASH64_H_

#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace blockrelay {

uint64_t Xxh64(const uint8_t* data, size_t length, uint64_t seed = 0);

// Which code hashes many blocks at once (Xxh64Blocks): both give the same
// hashes, bit for bit.
enum class BlockHashPath { kAuto, kScalar };

// XXH64 (seed 0) of each consecutive block of `block_bytes` in
// [data, data + length), the last possibly shorter, stored little-endian,
// 8 bytes per block, at `out`. The same values as Xxh64 on each block; with
// kAuto, CPUs with AVX-512 (F, VL, DQ) hash eight blocks side by side.
void Xxh64Blocks(const uint8_t* data, size_t length, size_t block_bytes, uint8_t* out, BlockHashPath path = BlockHashPath::kAuto);

// Whether kAuto uses the AVX-512 code on this CPU.
bool Xxh64BlocksVectorized();

// Registers xxh64(data: Uint8Array, offset: number, length: number): bigint,
// xxh64Blocks(data, blockBytes, out, scalar: boolean): boolean and
// xxh64BlocksVectorized(): boolean.
void InitXxhash64(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_XXHASH64_H_
