// Many positional writes to one file in one libuv thread-pool job. A VMDK
// apply of a log of 64 KiB writes made one pool round trip per write (a
// queue lock, a thread wake-up, an eventfd and a promise each); this writes
// a whole batch from one job.
#ifndef BLOCKRELAY_POSITIONED_WRITES_H_
#define BLOCKRELAY_POSITIONED_WRITES_H_

#include <napi.h>

namespace blockrelay {

// Registers writeAt(fd, buffers, positions): buffers is an array of Buffers,
// positions a Float64Array of the same length giving each one's file
// offset. The writes run in order on the thread pool (so a later write over
// an earlier one's bytes wins), neighbours that meet in the file joined into
// one pwritev; short writes are continued and EINTR retried. Returns a
// Promise of 0, or of [errno name, index of the buffer that failed]; the
// caller keeps fd open until it settles. Returns undefined for bad
// arguments.
//
// And readAt(fd, buffers, positions): the same for reads (preadv), filling
// each buffer whole; a read that meets the end of the file fails with the
// name "EOF". The undo journal reads a log's pre-images through it.
void InitPositionedWrites(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_POSITIONED_WRITES_H_
