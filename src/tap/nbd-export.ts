/**
 * What the NBD server serves. An export is a named byte range backed by a
 * source; the source tap adds a recorder that sees every completed write.
 *
 * The interfaces are deliberately small: any `DiskTarget` is a writable
 * source, and a retention view that synthesizes a recovery point only needs
 * `sizeBytes` and `read` to be served read-only.
 */

/** Anything that can be read as a disk: the minimum a read-only export needs. */
export interface NbdReadSource {
  readonly sizeBytes: number;
  /** Offsets and lengths must be multiples of this; 1 when any byte is addressable. Defaults to 1. */
  readonly capabilities?: { readonly alignmentBytes: number };
  read(offset: number, length: number): Promise<Buffer>;
}

/** A source that also takes writes (every `DiskTarget` is one). */
export interface NbdWriteSource extends NbdReadSource {
  write(offset: number, data: Buffer): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
}

/**
 * Receives every write the export completed, in an order consistent with the
 * disk: overlapping writes are recorded in the order they reached the disk.
 * The ChangeTracker (`src/tracking/change-tracker.ts`) satisfies it as is;
 * protocol tests use a recorder that keeps a list.
 *
 * A record call is made when the request arrives, before the disk write, so
 * every acknowledged write is recorded; the call order is the log order.
 * FLUSH and FUA wait for the returned promises (see RecordQueue).
 *
 * `data` may be reused by the tap once the returned promise settles (or the
 * call returns, for a synchronous recorder): a recorder that keeps the bytes
 * must copy them.
 */
export interface WriteRecorder {
  recordWrite(offset: number, data: Uint8Array): void | Promise<void>;
  /** A range that now reads as zeroes (NBD WRITE_ZEROES). */
  recordZeroes(offset: number, length: number): void | Promise<void>;
  /** A trimmed range; the tap's disks read trimmed ranges as zeroes. Falls back to recordZeroes. */
  recordTrim?(offset: number, length: number): void | Promise<void>;
  /** Makes every record made so far durable (NBD FLUSH and FUA). */
  flush(): Promise<void>;
  /**
   * Write intent: called after the record and before the write reaches the
   * disk. A promise means the write must wait for it (the range is being
   * marked durably, so a crash cannot leave a disk change no record or map
   * knows of); undefined means go ahead.
   */
  intend?(offset: number, length: number): Promise<void> | undefined;
}

export interface NbdExport {
  /** The name clients ask for: the disk id for the source tap. */
  readonly name: string;
  /** Shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION. */
  readonly description?: string;
  /** Refuse WRITE, TRIM and WRITE_ZEROES with EPERM (and advertise NBD_FLAG_READ_ONLY). */
  readonly readOnly: boolean;
  /** Must be an NbdWriteSource unless `readOnly`. */
  readonly source: NbdReadSource | NbdWriteSource;
  readonly recorder?: WriteRecorder;
}

/** Narrows a source to a writable one. */
export function isWriteSource(source: NbdReadSource | NbdWriteSource): source is NbdWriteSource {
  const s = source as Partial<NbdWriteSource>;
  return typeof s.write === 'function' && typeof s.writeZeroes === 'function' && typeof s.discard === 'function' && typeof s.flush === 'function';
}
