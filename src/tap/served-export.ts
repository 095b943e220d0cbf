import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from './nbd-protocol';
import { isWriteSource, type NbdExport, type NbdWriteSource } from './nbd-export';
import { WriteOrderGate } from './write-order-gate';
import { DEFAULT_RECORD_QUEUE_LIMITS, RecordQueue, type RecordQueueLimits } from './record-queue';
import { BlockrelayError } from '../retry/blockrelay-error';
import { loadNativeTap, type NativeTapExport } from '../platform/native';
import { FlushRounds } from './flush-rounds';
import { RawTarget } from '../targets/raw/raw-target';
import { ChangeTracker } from '../tracking/change-tracker';

/** The preferred block size advertised: the page size, where page-cache I/O is cheapest. */
export const NBD_PREFERRED_BLOCK_BYTES = 4096;
/** The largest READ/WRITE/WRITE_ZEROES length advertised by default: the protocol's interoperable 32 MiB. */
export const NBD_DEFAULT_MAX_BLOCK_BYTES = 32 * 1024 * 1024;

/**
 * An export as the server holds it: the export itself plus what is derived
 * once (transmission flags, block size constraints), and what every
 * connection to it shares: the write-order gate and the record queue.
 */
export class ServedExport {
  readonly name: string;
  readonly description: string;
  readonly readOnly: boolean;
  readonly exp: NbdExport;
  /** Set when the export takes writes. */
  readonly writer: NbdWriteSource | undefined;
  readonly sizeBytes: number;
  readonly minBlockBytes: number;
  readonly preferredBlockBytes: number;
  readonly maxBlockBytes: number;
  readonly transmissionFlags: number;
  readonly gate = new WriteOrderGate();
  /** Records handed to the recorder and not finished yet. */
  readonly records: RecordQueue;
  /**
   * The native data path (native/tap-transmission.cc), when this export can
   * use it: a writable raw file or device, tracked by a ChangeTracker whose
   * logs are real files, or not tracked at all. Its connections then leave
   * READ and WRITE to a native thread after the handshake.
   */
  readonly native: NativeTapExport | undefined;
  /** The disk's syncs, shared by the FLUSHes (and FUA writes) that arrive while one runs, on any connection. */
  readonly diskFlushes: FlushRounds | undefined;

  constructor(
    exp: NbdExport,
    maxBlockBytes: number,
    warn: (message: string, details?: Record<string, unknown>) => void = () => {},
    recordLimits: RecordQueueLimits = DEFAULT_RECORD_QUEUE_LIMITS,
    /** Use the native data path where the export allows it (false: TypeScript only, for tests of that path). */
    nativeDataPath = true,
  ) {
    if (Buffer.byteLength(exp.name, 'utf8') > 4096) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `NBD export name is longer than 4096 bytes: '${exp.name.slice(0, 40)}…'`);
    }
    if (!exp.readOnly && !isWriteSource(exp.source)) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `NBD export '${exp.name}' is writable but its source cannot write`);
    }
    this.name = exp.name;
    this.description = exp.description ?? '';
    this.readOnly = exp.readOnly;
    this.exp = exp;
    this.records = new RecordQueue(exp.name, recordLimits, warn);
    this.writer = exp.readOnly ? undefined : (exp.source as NbdWriteSource);
    const writer = this.writer;
    this.diskFlushes = writer === undefined ? undefined : new FlushRounds(failingForGood(exp.name, () => writer.flush()));
    this.sizeBytes = exp.source.sizeBytes;
    const alignment = exp.source.capabilities?.alignmentBytes ?? 1;
    if (!Number.isInteger(alignment) || alignment < 1 || alignment > 65536 || (alignment & (alignment - 1)) !== 0) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `NBD export '${exp.name}': alignment ${alignment} is not a power of two up to 64 KiB`);
    }
    this.minBlockBytes = alignment;
    this.preferredBlockBytes = Math.max(NBD_PREFERRED_BLOCK_BYTES, alignment);
    // The maximum must be a multiple of the minimum.
    this.maxBlockBytes = Math.floor(maxBlockBytes / alignment) * alignment;
    let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
    if (exp.readOnly) {
      flags |= NBD_FLAG_READ_ONLY;
    } else {
      flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    }
    // Every connection shares the one source, recorder and gate, and FLUSH
    // flushes the whole source (DiskTarget.flush covers every completed
    // write), so a flush on one connection covers writes completed on any.
    flags |= NBD_FLAG_CAN_MULTI_CONN;
    this.transmissionFlags = flags;
    this.native = nativeExportFor(nativeDataPath, exp, this.sizeBytes, this.minBlockBytes, this.maxBlockBytes);
  }

  /**
   * Releases the native export's resources; its connections must have ended.
   * Resolves once its writer thread has written what was queued and ended.
   */
  async closeNative(): Promise<void> {
    if (this.native === undefined) return;
    if (this.exp.recorder instanceof ChangeTracker) this.exp.recorder.detachNative(this.native);
    await this.native.close();
  }
}

function nativeExportFor(wanted: boolean, exp: NbdExport, sizeBytes: number, minBlockBytes: number, maxBlockBytes: number): NativeTapExport | undefined {
  if (exp.readOnly || !(exp.source instanceof RawTarget) || exp.source.capabilities.readOnly || !wanted) return undefined;
  const recorder = exp.recorder;
  if (recorder !== undefined && !(recorder instanceof ChangeTracker && recorder.canAttachNative)) return undefined;
  const fd = exp.source.fileDescriptor;
  const addon = loadNativeTap();
  if (addon === undefined) return undefined;
  const tracker = recorder as ChangeTracker | undefined;
  const native = new addon.TapExport(fd, sizeBytes, minBlockBytes, maxBlockBytes, tracker !== undefined, () => tracker?.onNativeNotify());
  tracker?.attachNative(native);
  return native;
}

/**
 * A disk sync that, once it failed, fails every later call too, as QEMU's
 * file driver does after a failed flush. The kernel reports a writeback
 * error to one fdatasync per file and may drop the pages it could not
 * write: a later sync would succeed and a later FLUSH would be answered
 * although writes the client made before the failure are gone. The export
 * stays refusing until it is served again (the operator checks the disk
 * first). The change tracker's log has the same rule for its own syncs.
 */
function failingForGood(exportName: string, sync: () => Promise<void>): () => Promise<void> {
  let failure: unknown;
  return async () => {
    if (failure !== undefined) {
      throw new BlockrelayError('BR_IO', `disk of export '${exportName}': an earlier flush failed, so writes before it may be lost; no flush succeeds until the disk is checked and served again`, { cause: failure });
    }
    try {
      await sync();
    } catch (err) {
      failure = err;
      throw err;
    }
  };
}
