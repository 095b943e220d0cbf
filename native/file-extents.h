// Holes in regular files: lseek(SEEK_DATA / SEEK_HOLE) to find them and
// fallocate(FALLOC_FL_PUNCH_HOLE) to make them. Node exposes neither, so a
// raw disk image would otherwise have to be read whole to find its holes and
// could never give space back on discard.
//
// Failures are answered as values, not exceptions (the addon is built
// without C++ exceptions): a byte offset, -1 when lseek says ENXIO (no data
// at or after the offset), or the errno's symbolic name ("EOPNOTSUPP",
// "EBADF" ...) for anything else. The TypeScript wrapper
// (src/platform/file-extents.ts) validates every argument and decides which
// names mean "this filesystem cannot" and which are real I/O errors.
#ifndef BLOCKRELAY_FILE_EXTENTS_H_
#define BLOCKRELAY_FILE_EXTENTS_H_

#include <napi.h>

#include <cstdint>

namespace blockrelay {

// Which lseek question to ask.
enum class SeekKind { kData, kHole };

// The first offset at or after `offset` that starts data (kData) or a hole
// (kHole), or -1 with `err` set to errno (ENXIO: no data at or after
// `offset`, or `offset` at or past the end). The end of the file counts as a
// hole. Moves the file position of fd, which positional I/O does not use.
int64_t SeekFile(int fd, int64_t offset, SeekKind kind, int& err);

// Deallocates [offset, offset + length) keeping the file size; partial
// filesystem blocks at the edges are zeroed by the kernel. 0 or an errno.
int PunchHole(int fd, int64_t offset, int64_t length);

// The symbolic name of an errno value ("EIO"), or "E<number>" if unknown.
const char* ErrnoName(int err);

// Registers seekData(fd, offset), seekHole(fd, offset) (synchronous: one
// cheap syscall each) and punchHole(fd, offset, length), which runs on the
// libuv thread pool (it can take long on a large range) and returns a
// Promise of 0 or an errno name.
void InitFileExtents(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_FILE_EXTENTS_H_
