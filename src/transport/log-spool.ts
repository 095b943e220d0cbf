import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { Transform, Writable, type Readable, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Lz4FrameDecoder } from './lz4-frame-decoder';
import { loadXxhash as xxhash } from '../platform/xxhash';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import { seqName, TRANSPORT_LIMITS, validateDiskId, type LogEnvelope } from './transport-protocol';
import { fsyncFile, syncDirectory } from '../platform/durable-file';
import { holdLog, releaseHeldLog, type LogMemory } from './held-log';

/**
 * A durable, ordered, size-bounded store of sealed logs per disk: the process
 * server's spool on its cache volume, and the master target's inbox.
 *
 * Layout: `DIR/<disk>/<seq:20 digits>.hrl` with its envelope beside it in
 * `<seq>.json`. A log is streamed to a `.tmp` file, hashed on the way,
 * fsynced, verified, and only then renamed into place (envelope first), with
 * the directory fsynced: a log is visible only once it is whole and durable,
 * and anything left as `.tmp` after a crash is discarded on open.
 * docs/formats/spool.md describes it.
 */
export interface SpoolEntry {
  readonly envelope: LogEnvelope;
  readonly file: string;
  readonly sizeBytes: number;
}

export interface ReceiveOptions {
  /** The body is an lz4 frame stream of the log. */
  readonly lz4: boolean;
  /**
   * Called on the complete, fsynced temp file before it becomes visible;
   * throws a coded error to refuse the log (e.g. [MS-HRL] verification).
   */
  readonly verify: (file: string, envelope: LogEnvelope) => Promise<void>;
  /**
   * fsync the temp file while verifying (default true). A receiver that may
   * apply the log before answering (master-target.ts, "apply on receive")
   * stages without it: the log is never made visible then, and `commit()`
   * fsyncs it first if it is committed after all.
   */
  readonly durable?: boolean;
  /**
   * Hold a log staged without `durable` in a buffer from this budget instead
   * of a temp file, when it fits (held-log.ts): `verify` and the caller then
   * read it from memory by its staged name, and `commit()` writes the file
   * first. A log that does not fit is staged to a file as without it.
   */
  readonly memory?: LogMemory;
}

type Hasher = ReturnType<Awaited<ReturnType<typeof xxhash>>['create64']>;
let hasherFactory: Promise<() => Hasher> | undefined;

/** A fresh streaming xxhash64 (the wasm module is loaded once). */
export async function newXxhash64(): Promise<Hasher> {
  hasherFactory ??= xxhash().then((api) => () => api.create64());
  return (await hasherFactory)();
}

export function hashHex(hasher: Hasher): string {
  return hasher.digest().toString(16).padStart(16, '0');
}

/** Writes a new file and fsyncs it (it is renamed into place later). */
async function writeFileSynced(file: string, content: string | Uint8Array): Promise<void> {
  const fh = await fsp.open(file, 'wx');
  try {
    await fh.writeFile(content);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Bytes hashFile reads at a time, into one buffer it keeps (fresh buffers per read cost full garbage collections). */
const HASH_READ_CHUNK_BYTES = 1024 * 1024;
let hashReadBuffer: Buffer | undefined;
let hashReadBufferBusy = false;

/** xxhash64 of a whole file, read through one reused buffer. */
export async function hashFile(file: string): Promise<{ xxhash64: string; sizeBytes: number }> {
  const hasher = await newXxhash64();
  // One shared buffer; a second hash running at the same time takes its own.
  const shared = !hashReadBufferBusy;
  const buffer = shared ? (hashReadBuffer ??= Buffer.allocUnsafeSlow(HASH_READ_CHUNK_BYTES)) : Buffer.allocUnsafeSlow(HASH_READ_CHUNK_BYTES);
  if (shared) hashReadBufferBusy = true;
  const fh = await fsp.open(file, 'r').catch((err: unknown) => {
    if (shared) hashReadBufferBusy = false;
    throw err;
  });
  try {
    let sizeBytes = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buffer, 0, buffer.length, sizeBytes);
      if (bytesRead === 0) break;
      hasher.update(buffer.subarray(0, bytesRead));
      sizeBytes += bytesRead;
    }
    return { xxhash64: hashHex(hasher), sizeBytes };
  } finally {
    if (shared) hashReadBufferBusy = false;
    await fh.close();
  }
}

/** Counts and hashes bytes passing through, refusing more than `maxBytes`; `onChunk` may refuse one by throwing. */
class HashingCounter extends Transform {
  bytes = 0;
  constructor(private readonly hasher: Hasher, private readonly maxBytes: number, private readonly onChunk?: () => void) {
    super();
  }
  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.bytes > this.maxBytes) {
      done(new BlockrelayError('BR_UPLOAD_TOO_LARGE', `upload is longer than its declared ${this.maxBytes} bytes`));
      return;
    }
    try {
      this.onChunk?.();
    } catch (err) {
      done(err as Error);
      return;
    }
    this.hasher.update(chunk);
    done(null, chunk);
  }
}

/**
 * A durable upload starts the writeback of what it has written each time
 * this much more is written (an fdatasync it does not wait for), so the
 * fsync before its answer flushes at most about this much: on a log of
 * hundreds of MB that fsync otherwise wrote the whole log after the last
 * byte arrived, and the sender waited for it.
 */
export const SPOOL_WRITEBACK_STEP_BYTES = 32 * 1024 * 1024;

/**
 * Streams an upload through `counter` into `out` (decoding lz4 first), and
 * turns a broken or short upload into a coded error.
 */
async function receiveInto(envelope: LogEnvelope, body: Readable, lz4: boolean, counter: HashingCounter, out: Writable): Promise<void> {
  try {
    if (lz4) await pipeline(body, new Lz4FrameDecoder(), counter, out);
    else await pipeline(body, counter, out);
  } catch (err) {
    if (err instanceof BlockrelayError) throw err;
    if ((err as NodeJS.ErrnoException).code === 'ERR_STREAM_PREMATURE_CLOSE' || (err as NodeJS.ErrnoException).code === 'ECONNRESET' || (err as Error).message === 'aborted') {
      throw new BlockrelayError('BR_UPLOAD_INCOMPLETE', `upload of ${envelope.diskId} seq ${envelope.seq} ended after ${counter.bytes} bytes`, { cause: err });
    }
    if (lz4 && !(err as NodeJS.ErrnoException).code?.startsWith?.('E')) {
      throw new BlockrelayError('BR_PROTOCOL', `lz4 stream of ${envelope.diskId} seq ${envelope.seq} is invalid: ${(err as Error).message}`, { cause: err });
    }
    throw wrapError(err, 'BR_IO', `spooling ${envelope.diskId} seq ${envelope.seq}`);
  }
  if (counter.bytes !== envelope.logLength) {
    throw new BlockrelayError('BR_UPLOAD_INCOMPLETE', `upload of ${envelope.diskId} seq ${envelope.seq} has ${counter.bytes} bytes, declared ${envelope.logLength}`);
  }
}

/** Copies what passes into one buffer of the log's declared length (a log held in memory). */
class MemorySink extends Writable {
  private at = 0;
  constructor(private readonly into: Buffer) {
    super({ highWaterMark: 1 << 20 });
  }
  override _write(chunk: Buffer, _enc: BufferEncoding, done: (err?: Error | null) => void): void {
    // HashingCounter refuses bytes past the declared length before they reach here.
    if (this.at + chunk.length > this.into.length) {
      done(new BlockrelayError('BR_UPLOAD_TOO_LARGE', `upload is longer than its declared ${this.into.length} bytes`));
      return;
    }
    chunk.copy(this.into, this.at);
    this.at += chunk.length;
    done();
  }
}

/**
 * The writeback a durable upload starts as it is written (see
 * SPOOL_WRITEBACK_STEP_BYTES): one fdatasync at a time, through a handle of
 * its own on the file (a sync flushes the file's pages whichever handle
 * wrote them, and the write stream keeps the closing of its own). A failed
 * one fails the upload: after a failed sync, a later fsync may succeed
 * without the lost pages having reached the disk.
 */
class Writeback {
  private handle: Promise<fsp.FileHandle> | undefined;
  private inFlight: Promise<void> | undefined;
  private syncedBytes = 0;
  private failure: unknown;

  constructor(private readonly file: string) {}

  /** Called as bytes pass: starts a writeback when SPOOL_WRITEBACK_STEP_BYTES more are written; throws a failed one's error. */
  check(writtenBytes: number): void {
    if (this.failure !== undefined) throw wrapError(this.failure, 'BR_IO', `writing back ${this.file}`);
    if (this.inFlight !== undefined || writtenBytes - this.syncedBytes < SPOOL_WRITEBACK_STEP_BYTES) return;
    this.handle ??= fsp.open(this.file, 'r+');
    this.inFlight = this.handle.then((fh) => fh.datasync()).then(
      () => {
        this.syncedBytes = writtenBytes;
      },
      (err: unknown) => {
        this.failure ??= err;
      },
    ).finally(() => {
      this.inFlight = undefined;
    });
  }

  /** Resolves once no writeback is running; throws if one failed. */
  async settled(): Promise<void> {
    await this.inFlight;
    if (this.failure !== undefined) throw wrapError(this.failure, 'BR_IO', `writing back ${this.file}`);
  }

  /** Waits for a running writeback and closes the handle (never throws: settled() reports failures). */
  async close(): Promise<void> {
    await this.inFlight;
    const handle = this.handle;
    this.handle = undefined;
    await handle?.then((fh) => fh.close(), () => undefined).catch(() => undefined);
  }
}

/** An upload held durably and verified in a temp file, not yet visible in the spool. */
export interface StagedLog {
  readonly envelope: LogEnvelope;
  /**
   * The complete, verified temp file (never visible in the spool until
   * committed), or the name the log is held in memory under (held-log.ts).
   */
  readonly file: string;
  /** Makes it visible (envelope, rename, directory fsync); on failure nothing of it remains. */
  commit(): Promise<SpoolEntry>;
  /** Drops it. */
  discard(): Promise<void>;
}

export class LogSpool {
  private stagedCount = 0;
  private readonly entries = new Map<string, Map<number, SpoolEntry>>();
  private usedBytes = 0;
  private reservedBytes = 0;
  /** Per log (`disk/seq`), the tail of the commits and removes of it in progress; see remove(). */
  private readonly locks = new Map<string, Promise<void>>();

  constructor(
    readonly dir: string,
    readonly maxBytes: number,
  ) {}

  /** Loads what a previous run left, discarding incomplete uploads. */
  async open(): Promise<void> {
    await fsp.mkdir(this.dir, { recursive: true });
    for (const disk of await fsp.readdir(this.dir)) {
      const diskDir = path.join(this.dir, disk);
      if (!(await fsp.stat(diskDir)).isDirectory()) continue;
      validateDiskId(disk);
      for (const name of (await fsp.readdir(diskDir)).sort()) {
        const full = path.join(diskDir, name);
        if (name.endsWith('.tmp')) {
          await fsp.rm(full, { force: true });
          continue;
        }
        if (!name.endsWith('.hrl')) continue;
        const envelopeFile = full.replace(/\.hrl$/, '.json');
        if (!fs.existsSync(envelopeFile)) {
          // Both are renamed into place before one directory fsync, and the
          // log is answered only after it: a crash between may keep the
          // log's rename alone. It was never acknowledged; the sender resends it.
          await fsp.rm(full, { force: true });
          continue;
        }
        const envelope = JSON.parse(await fsp.readFile(envelopeFile, 'utf8')) as LogEnvelope;
        const { size } = await fsp.stat(full);
        this.add({ envelope, file: full, sizeBytes: size });
      }
      // An envelope whose log never got renamed into place is a crash leftover.
      for (const name of await fsp.readdir(diskDir)) {
        if (name.endsWith('.json') && !fs.existsSync(path.join(diskDir, name.replace(/\.json$/, '.hrl')))) await fsp.rm(path.join(diskDir, name), { force: true });
      }
    }
  }

  get bytesUsed(): number {
    return this.usedBytes;
  }

  disks(): string[] {
    return [...this.entries.keys()].filter((d) => (this.entries.get(d)?.size ?? 0) > 0);
  }

  /** The disk's spooled logs in sequence order. */
  list(diskId: string): SpoolEntry[] {
    return [...(this.entries.get(diskId)?.values() ?? [])].sort((a, b) => a.envelope.seq - b.envelope.seq);
  }

  get(diskId: string, seq: number): SpoolEntry | undefined {
    return this.entries.get(diskId)?.get(seq);
  }

  pendingBytes(diskId: string): number {
    let n = 0;
    for (const e of this.entries.get(diskId)?.values() ?? []) n += e.sizeBytes;
    return n;
  }

  /**
   * Streams one upload into the spool. Resolves once the log is verified,
   * durable and visible; on any failure nothing of it remains.
   */
  async receive(envelope: LogEnvelope, body: Readable, options: ReceiveOptions): Promise<SpoolEntry> {
    const staged = await this.stage(envelope, body, options);
    return staged.commit();
  }

  /**
   * The first half of `receive`: streams the upload to a temp file, checks
   * its length and hash, and makes it durable and verified (fsync and
   * verification run side by side: both read the same immutable bytes).
   * Nothing is visible yet; the caller commits (in sequence order) or
   * discards it. Its bytes stay reserved against the size bound until then
   * (also when it is held in memory: `options.memory`, written to its file
   * only if it is committed).
   */
  async stage(envelope: LogEnvelope, body: Readable, options: ReceiveOptions): Promise<StagedLog> {
    if (envelope.logLength > TRANSPORT_LIMITS.maxLogBytes) throw new BlockrelayError('BR_UPLOAD_TOO_LARGE', `log of ${envelope.logLength} bytes exceeds the ${TRANSPORT_LIMITS.maxLogBytes}-byte limit`);
    if (this.usedBytes + this.reservedBytes + envelope.logLength > this.maxBytes) {
      throw new BlockrelayError('BR_SPOOL_FULL', `spool ${this.dir} holds ${this.usedBytes} of ${this.maxBytes} bytes; a ${envelope.logLength}-byte log does not fit`);
    }
    this.reservedBytes += envelope.logLength;
    const durable = options.durable ?? true;
    const diskDir = path.join(this.dir, envelope.diskId);
    const base = path.join(diskDir, seqName(envelope.seq));
    const stamp = `${process.pid}.${Date.now()}.${++this.stagedCount}`;
    const tmp = `${base}.hrl.${stamp}.tmp`;
    const envelopeTmp = `${base}.json.${stamp}.tmp`;
    const envelopeText = JSON.stringify(envelope);
    // Held in memory (never durable): named by `tmp`, which no file takes until commit() writes it.
    let held = durable ? undefined : options.memory?.take(envelope.logLength);
    let settled = false;
    const release = (): void => {
      if (!settled) this.reservedBytes -= envelope.logLength;
      settled = true;
    };
    const releaseHeld = (): void => {
      if (held === undefined) return;
      releaseHeldLog(tmp);
      options.memory!.give(held);
      held = undefined;
    };
    const discard = async (): Promise<void> => {
      release();
      releaseHeld();
      await fsp.rm(tmp, { force: true });
      await fsp.rm(envelopeTmp, { force: true });
    };
    try {
      await fsp.mkdir(diskDir, { recursive: true });
      const hasher = await newXxhash64();
      const writeback = new Writeback(tmp);
      try {
        if (held !== undefined) {
          const counter = new HashingCounter(hasher, envelope.logLength);
          await receiveInto(envelope, body, options.lz4, counter, new MemorySink(held));
        } else {
          const out = fs.createWriteStream(tmp, { flags: 'wx', highWaterMark: 1 << 20 });
          const counter = new HashingCounter(hasher, envelope.logLength, durable ? () => writeback.check(out.bytesWritten) : undefined);
          await receiveInto(envelope, body, options.lz4, counter, out);
        }
        const actual = hashHex(hasher);
        if (actual !== envelope.xxhash64) {
          throw new BlockrelayError('BR_UPLOAD_HASH_MISMATCH', `upload of ${envelope.diskId} seq ${envelope.seq} hashes to ${actual}, declared ${envelope.xxhash64}`);
        }
        if (held !== undefined) holdLog(tmp, held);
        await writeback.settled();
        // Both must succeed before the log may become visible; neither changes
        // the file. The envelope is made durable beside them, so committing
        // takes only two renames and one directory fsync.
        const [synced, verified, described] = await Promise.allSettled([
          durable ? fsyncFile(tmp) : Promise.resolve(),
          options.verify(tmp, envelope),
          durable ? writeFileSynced(envelopeTmp, envelopeText) : Promise.resolve(),
        ]);
        if (verified.status === 'rejected') throw verified.reason;
        if (synced.status === 'rejected') throw synced.reason;
        if (described.status === 'rejected') throw described.reason;
      } finally {
        await writeback.close();
      }
    } catch (err) {
      await discard();
      throw wrapError(err, 'BR_IO', `spooling ${envelope.diskId} seq ${envelope.seq}`);
    }
    return {
      envelope,
      file: tmp,
      discard,
      commit: async () => {
        try {
          if (held !== undefined) await Promise.all([writeFileSynced(tmp, held), writeFileSynced(envelopeTmp, envelopeText)]);
          else if (!durable) await Promise.all([fsyncFile(tmp), writeFileSynced(envelopeTmp, envelopeText)]);
        } catch (err) {
          await discard();
          throw wrapError(err, 'BR_IO', `spooling ${envelope.diskId} seq ${envelope.seq}`);
        }
        // The renames and the entry swap under the log's lock: a remove() of
        // a log this replaces runs wholly before or after them (see remove).
        return this.underLock(envelope.diskId, envelope.seq, async () => {
          try {
            // Envelope first: a log is never in place without it (open() drops one that is).
            await fsp.rename(envelopeTmp, `${base}.json`);
            await fsp.rename(tmp, `${base}.hrl`);
            await syncDirectory(diskDir);
          } catch (err) {
            await discard();
            throw wrapError(err, 'BR_IO', `spooling ${envelope.diskId} seq ${envelope.seq}`);
          }
          releaseHeld();
          const entry: SpoolEntry = { envelope, file: `${base}.hrl`, sizeBytes: envelope.logLength };
          const prior = this.get(envelope.diskId, envelope.seq);
          if (prior !== undefined) this.usedBytes -= prior.sizeBytes;
          release();
          this.add(entry);
          return entry;
        });
      },
    };
  }

  /**
   * Deletes a log once the next hop holds it durably (or it was applied).
   * With `expected`, only if the spool still holds that very entry under
   * `seq`: a log taken again under its number (a commit renames over the
   * same path) is a different entry, not yet handled, and stays. The check,
   * the unlinks and the entry's removal run under the log's lock, which a
   * commit takes for its renames: otherwise a commit landing between the
   * lookup and the unlink lost the replacement's file and entry.
   */
  async remove(diskId: string, seq: number, expected?: SpoolEntry): Promise<void> {
    await this.underLock(diskId, seq, async () => {
      const entry = this.get(diskId, seq);
      if (entry === undefined || (expected !== undefined && entry !== expected)) return;
      await fsp.rm(entry.file, { force: true });
      await fsp.rm(entry.file.replace(/\.hrl$/, '.json'), { force: true });
      this.entries.get(diskId)?.delete(seq);
      this.usedBytes -= entry.sizeBytes;
    });
  }

  /** Runs `fn` after every earlier holder of the lock of `diskId`'s log `seq` finished (a promise chain per log, dropped when idle). */
  private async underLock<R>(diskId: string, seq: number, fn: () => Promise<R>): Promise<R> {
    const key = `${diskId}/${seq}`;
    const prior = this.locks.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((resolve) => {
      release = resolve;
    });
    const tail = prior.then(() => mine);
    this.locks.set(key, tail);
    await prior;
    try {
      return await fn();
    } finally {
      release();
      if (this.locks.get(key) === tail) this.locks.delete(key);
    }
  }

  private add(entry: SpoolEntry): void {
    let disk = this.entries.get(entry.envelope.diskId);
    if (disk === undefined) this.entries.set(entry.envelope.diskId, (disk = new Map()));
    disk.set(entry.envelope.seq, entry);
    this.usedBytes += entry.sizeBytes;
  }
}
