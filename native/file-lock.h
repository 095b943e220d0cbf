// flock(2) for the state locks of the roles and of resync state files. A lock
// held on an open descriptor is dropped by the kernel when the process ends,
// however it ends, so no lock is ever stale and nothing has to judge whether
// a recorded owner still lives (a pid check then a takeover is a race two
// starting instances can both win). Node exposes no flock.
#ifndef BLOCKRELAY_FILE_LOCK_H_
#define BLOCKRELAY_FILE_LOCK_H_

#include <napi.h>

namespace blockrelay {

// Registers lockExclusive(fd): flock(fd, LOCK_EX | LOCK_NB), synchronous (it
// never waits). Returns 0 when the lock is taken, "EWOULDBLOCK" when another
// open file description holds it, or another errno name.
void InitFileLock(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_FILE_LOCK_H_
