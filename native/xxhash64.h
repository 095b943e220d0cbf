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

// Registers xxh64(data: Uint8Array, offset: number, length: number): bigint.
void InitXxhash64(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_XXHASH64_H_
