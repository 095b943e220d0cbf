// The source tap's transmission phase in C++: after the handshake (done in
// TypeScript, src/tap/nbd-connection.ts) a thread per connection reads NBD
// requests straight from the socket into a reused buffer, and for READ and
// WRITE does the I/O itself (pread/pwrite on the disk, the log append through
// HrlAppender), handing only (offset, length) records to JavaScript for the
// change tracker's maps. Everything else (FLUSH, FUA, TRIM, WRITE_ZEROES,
// unknown commands, write intents, log overflow) is an event JavaScript
// answers. See src/tap/native-transmission.ts for the contract.
#ifndef BLOCKRELAY_TAP_TRANSMISSION_H_
#define BLOCKRELAY_TAP_TRANSMISSION_H_

#include <napi.h>

namespace blockrelay {

// Registers the TapExport and TapConnection classes.
void InitTapTransmission(Napi::Env env, Napi::Object exports);

}  // namespace blockrelay

#endif  // BLOCKRELAY_TAP_TRANSMISSION_H_
