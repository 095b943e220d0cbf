// Reading a file range and hashing it in fixed blocks, on the libuv thread
// pool: the resync's bulk work on a local disk. Reading and hashing in one
// native pass, piece by piece, keeps each piece in the CPU cache between the
// copy out of the page cache and the hash, keeps the main thread free, and
// lets the two sides of an in-process resync (source and target) hash on two
// cores at once.
#ifndef BLOCKRELAY_BLOCK_HASHING_H_
#define BLOCKRELAY_BLOCK_HASHING_H_

#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace blockrelay {

// Reads [file_offset, file_offset + length) of fd and writes XXH64 (seed 0)
// of each block of block_bytes (the last one may be shorter) into hashes,
// little-endian, in block order. When dest is not null the bytes read are
// left there (dest holds length bytes); otherwise a per-thread scratch piece
// is used. Bytes past the end of the file read as zeroes (a file shortened
// behind the reader's back), as positional reads of a raw disk do elsewhere.
// Returns the bytes the file really held (<= length), or -1 with err set to
// the errno of a failed pread.
int64_t PreadHashBlocks(int fd, int64_t file_offset, size_t length, size_t block_bytes, uint8_t* dest, uint8_t* hashes, int& err);

// Registers preadHashBlocks(fd, fileOffset, length, blockBytes, dest|null,
// hashes): a Promise of the bytes the file held, or of an errno name
// ("EIO", "EBADF") when a read failed; undefined for arguments it refuses
// (the TypeScript wrapper validates them first). The caller keeps fd open
// and both buffers alive until the promise settles.
void InitBlockHashing(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_BLOCK_HASHING_H_
