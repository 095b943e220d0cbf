import * as path from 'node:path';
import * as fs from 'node:fs';
import { BlockrelayError } from '../retry/blockrelay-error';

/**
 * Loads the C++ addon built by node-gyp into `build/Release`. The path is
 * found by walking up to the package root, so it works from `src/` (tests,
 * tsx) and from `dist/` (installed CLI) alike.
 */
function packageRoot(): string {
  let dir = __dirname;
  for (let i = 0; i < 6; i++) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'binding.gyp'))) return dir;
    dir = path.dirname(dir);
  }
  throw new BlockrelayError('BR_NATIVE_UNAVAILABLE', `cannot find the blockrelay package root above ${__dirname}`);
}

let cached: unknown;

/** The raw addon exports; typed wrappers live next to the domain that uses them. */
export function loadNative<T>(): T {
  if (cached !== undefined) return cached as T;
  const file = path.join(packageRoot(), 'build', 'Release', 'blockrelay.node');
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    cached = require(file);
  } catch (err) {
    throw new BlockrelayError('BR_NATIVE_UNAVAILABLE', `cannot load ${file}; run npm install`, { cause: err });
  }
  return cached as T;
}

/**
 * The append half of an [MS-HRL] log writer (native/hrl-appender.cc). Every
 * method returns 0 or an errno; after an error (or `finish`) every append
 * returns that errno. Thread-safe: the source tap's connection threads append
 * to the same object.
 */
export interface NativeHrlAppender {
  append(byteOffset: number, data: Uint8Array, timestamp: number): number;
  appendZeroes(byteOffset: number, length: number, timestamp: number): number;
  /** appendZeroes on the libuv thread pool: resolves with the errno (0 when logged). */
  appendZeroesAsync(byteOffset: number, length: number, timestamp: number): Promise<number>;
  closeBlock(): number;
  finish(): number;
  /** Refuses every later append without writing what is staged. */
  abandon(): void;
  /** [writtenEnd, stagedBytes, entriesInBlock, totalEntries, errno, rewrites, rewrittenBytes]. */
  state(): Float64Array;
  /**
   * Whether a piece was rewritten in place (coalesced) since the last call,
   * clearing the flag: a flush must then fdatasync even if the end did not move.
   */
  takeRewrittenSinceSync(): boolean;
  sizeBytes(): number;
}

/** Tracking modes of a native tap export (native/tap-transmission.cc). */
export const NATIVE_TAP_MODE = { untracked: 0, dirtyOnly: 1, logging: 2, refuse: 3 } as const;
export type NativeTapMode = (typeof NATIVE_TAP_MODE)[keyof typeof NATIVE_TAP_MODE];

/** What every native connection to one export shares (native/tap-transmission.cc). */
export interface NativeTapExport {
  /**
   * Stops new writes at once and resolves, once the queued ones are written
   * (at once when none are), with the records not yet taken, as offset/length
   * pairs. The wait happens off the main thread: a slow or hung disk delays
   * the promise, never the event loop.
   */
  hold(): Promise<Float64Array>;
  /**
   * Ends one hold and sets what writes do from now on. The attention flag
   * (see attention()) is cleared when the log or the mode changes, otherwise
   * only when `handledAttention` names the kind it holds (the caller dealt with it).
   */
  release(mode: NativeTapMode, appender: NativeHrlAppender | null, logLimitBytes: number, handledAttention?: number): void;
  /** The records not yet taken, as offset/length pairs. */
  drain(): Float64Array;
  /** Replaces the set of write-intent regions known durable. */
  setDurableRegions(regions: Float64Array): void;
  /** [kind (0 none, 1 overflow, 2 log I/O error), errno]. */
  attention(): Float64Array;
  /**
   * Stops the writer thread once the queued writes are written, and settles
   * pending holds; resolves when it has ended. The wait is off the main
   * thread: a write stuck on a hung disk delays the promise, never the event loop.
   */
  close(): Promise<void>;
}

/** One connection's transmission thread (native/tap-transmission.cc). */
export interface NativeTapConnection {
  /** Queues a reply; false once the thread has ended. */
  reply(bytes: Uint8Array): boolean;
  /** Lets a thread waiting on an intent or slow-request event go on (error 0) or fail the request. */
  resume(error?: number): void;
  /**
   * Stops reading requests. Graceful: every request already carried out is
   * answered first (bounded: 10 s); otherwise the thread lets go at once.
   */
  stop(graceful?: boolean): void;
  join(): void;
  /** [requests, errorReplies, bytesWritten, bytesRead]. */
  stats(): Float64Array;
}

/** The classes of the addon the source tap's native data path uses. */
export interface NativeTapAddon {
  /** `coalesceMaxEntries`: bound of the coalescible-entry map; 0 turns coalescing of overwrites off. */
  HrlAppender: new (fd: number, metadataSizeBytes: number, maxEntryBytes: number, stagingBytes: number, writtenEnd: number, lastBlockOffset: number, coalesceMaxEntries: number, coalesceMinBytes?: number) => NativeHrlAppender;
  TapExport: new (diskFd: number, sizeBytes: number, minBlockBytes: number, maxBlockBytes: number, tracked: boolean, notify: () => void) => NativeTapExport;
  TapConnection: new (
    socketFd: number,
    exp: NativeTapExport,
    prefix: Uint8Array,
    onEvent: (kind: number, type: number, flags: number, handleHi: number, handleLo: number, offset: number, length: number, error: number) => void,
  ) => NativeTapConnection;
}

/** The tap's native classes, or undefined when the addon is missing or older than them. */
export function loadNativeTap(): NativeTapAddon | undefined {
  try {
    const addon = loadNative<Partial<NativeTapAddon>>();
    if (typeof addon.HrlAppender !== 'function' || typeof addon.TapExport !== 'function' || typeof addon.TapConnection !== 'function') return undefined;
    return addon as NativeTapAddon;
  } catch {
    return undefined;
  }
}
