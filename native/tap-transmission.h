// The source tap's transmission phase in C++: after the handshake (done in
// TypeScript, src/tap/nbd-connection.ts) a thread per connection receives
// NBD requests straight from the socket. It answers READ itself (pread),
// queues each valid WRITE, in arrival order, for one writer thread per
// export, and appends it to the log (HrlAppender) in that queue order; the
// writer writes the disk once the write is logged, so log order equals disk
// order across connections. Only (offset, length)
// records go to JavaScript, for the change tracker's maps. Everything else
// (FLUSH, FUA, TRIM, WRITE_ZEROES, unknown commands, write intents, log
// overflow or failure) is an event JavaScript answers; see
// NbdConnection.handOverToNative and ChangeTracker.attachNative for that side.
#ifndef BLOCKRELAY_TAP_TRANSMISSION_H_
#define BLOCKRELAY_TAP_TRANSMISSION_H_

#include <napi.h>

namespace blockrelay {

// Registers the TapExport and TapConnection classes.
void InitTapTransmission(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_TAP_TRANSMISSION_H_
