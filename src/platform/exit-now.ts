import { loadNative } from './native';

/**
 * Ends the process without waiting for libuv's pool threads (the addon's
 * exitNow; see native/tap-transmission.cc), or process.exit where the addon
 * lacks it: after a stop that ran out of time, a close still pending on a
 * hung disk would keep the event loop alive, and process.exit would wait for
 * a pool thread in that disk's fdatasync. (A thread the kernel holds
 * uninterruptibly, in a request the disk already took, still delays the end
 * until the disk answers: nothing, not even SIGKILL, ends a process before
 * that.)
 */
export function exitNow(status: number): never {
  let native: ((status: number) => void) | undefined;
  try {
    native = loadNative<{ exitNow?: (status: number) => void }>().exitNow;
  } catch {
    native = undefined;
  }
  if (native !== undefined) native(status);
  process.exit(status);
}
