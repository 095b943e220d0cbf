/**
 * The one registry of blockrelay error codes.
 *
 * Codes never change meaning once released; messages may. Callers match on
 * `code`, never on message text. Each entry says whether the failure is
 * recoverable (retried by the retry policy) or not (the disk goes Critical
 * until an operator acts), and where Azure Site Recovery has a number users
 * know, that number. `docs/errors.md` is generated from this table
 * (`npm run errors:doc`).
 *
 * Each domain keeps its codes in its own section, prefixed by the domain.
 */
export interface ErrorSpec {
  /** True when waiting and trying again can succeed. */
  readonly recoverable: boolean;
  /** One line an operator can act on. */
  readonly description: string;
  /** The Azure Site Recovery error number users know, where one exists. */
  readonly asrCode?: number;
}

export const ERROR_CODES = {
  // --- general / daemon ---
  BR_CONFIG_INVALID: { recoverable: false, description: 'A configuration key is unknown, missing or out of range.' },
  BR_USAGE: { recoverable: false, description: 'A command line argument is missing or malformed.' },
  BR_INTERNAL: { recoverable: false, description: 'An unexpected internal failure; the message carries the cause.' },
  BR_LOCKED: { recoverable: false, description: 'Another blockrelay instance holds the lock on this state directory.' },

  // --- platform / resources ---
  BR_IO: { recoverable: true, description: 'An I/O operation on a local file failed.' },
  BR_DISK_FULL: { recoverable: true, description: 'The volume has too little free space.' },
  BR_LOW_MEMORY: { recoverable: true, description: 'The process could not obtain the memory it needs.' },
  BR_FILE_NOT_FOUND: { recoverable: false, description: 'A file named on the command line or in the configuration does not exist.' },

  // --- retry ---
  BR_RETRY_CANCELLED: { recoverable: false, description: 'A retry loop was cancelled before it succeeded.' },

  // --- native addon ---
  BR_NATIVE_UNAVAILABLE: { recoverable: false, description: 'The native addon is not built; run npm install (needs python3, make, g++).' },
  BR_DIRTYMAP_CORRUPT: { recoverable: false, description: 'A persisted dirty map failed validation.' },
  BR_DIRTYMAP_RANGE: { recoverable: false, description: 'A dirty-map range reaches past the end of the disk it tracks.' },
  BR_DIRTYMAP_MISMATCH: { recoverable: false, description: 'Two dirty maps of different disk sizes or granularities cannot be merged.' },

  // --- tracking (MS-HRL logs, change tracker) ---
  // Damage in a log names the byte offset in the message and in details.offset.
  BR_HRL_TRUNCATED: { recoverable: false, description: 'An HRL log ends before a structure it points to (header, metadata block or payload).' },
  BR_HRL_BAD_COOKIE: { recoverable: false, description: 'The file does not start with the HRL cookie "msctlog"; it is not an [MS-HRL] log.' },
  BR_HRL_UNSUPPORTED_VERSION: { recoverable: false, description: 'The HRL LogFormatVersion is not 0x00020000 (version 1 logs are local to Windows Server 2012 and not read).' },
  BR_HRL_HEADER_CHECKSUM: { recoverable: false, description: 'The HRL file header checksum does not match; the log is corrupt.' },
  BR_HRL_HEADER_FIELD: { recoverable: false, description: 'An HRL header field is out of range (FileType, Flags, Reserved or MetadataSize).' },
  BR_HRL_UNSEALED: { recoverable: false, description: 'The HRL log was not closed (EOLLocation is 0); seal its durable part with blockrelay hrl recover (the change tracker does this at open).' },
  BR_HRL_EOL_OUT_OF_RANGE: { recoverable: false, description: 'The HRL EOLLocation leaves no room for the header and one metadata block.' },
  BR_HRL_METADATA_CHECKSUM: { recoverable: false, description: 'An HRL metadata header checksum does not match.' },
  BR_HRL_METADATA_FIELD: { recoverable: false, description: 'An HRL metadata header has nonzero Reserved bytes or more valid entries than the block holds.' },
  BR_HRL_CHAIN_LOOP: { recoverable: false, description: 'An HRL metadata block points back by less than one block (or forward), so the chain would loop.' },
  BR_HRL_CHAIN_OUT_OF_RANGE: { recoverable: false, description: 'An HRL metadata block points to a previous block outside the log (before the header end).' },
  BR_HRL_ENTRY_CHECKSUM: { recoverable: false, description: 'An HRL metadata entry checksum does not match.' },
  BR_HRL_ENTRY_FIELD: { recoverable: false, description: 'An HRL metadata entry has nonzero Location or Reserved bytes, or a range beyond 2^53.' },
  BR_HRL_UNSUPPORTED_OPERATION: { recoverable: false, description: 'An HRL metadata entry has a MetaOperation other than 1 (write).' },
  BR_HRL_PAYLOAD_MISFIT: { recoverable: false, description: 'The payload lengths of an HRL metadata block do not fill the space before it exactly.' },
  BR_HRL_DATA_CHECKSUM: { recoverable: false, description: 'An HRL payload does not match the DataChecksum of its entry.' },
  BR_HRL_ENTRY_COUNT_MISMATCH: { recoverable: false, description: 'The HRL header TotalMetadataEntries differs from the sum of ValidMetadataEntries over all blocks.' },
  BR_HRL_PAST_DISK_END: { recoverable: false, description: 'An HRL entry writes past the end of the target disk.' },
  BR_HRL_MISALIGNED: { recoverable: false, description: 'An HRL entry offset or length is not a multiple of the target\'s write alignment.' },
  BR_HRL_CHAIN_BROKEN: { recoverable: false, description: 'Consecutive HRL logs are not chained: PreviousUniqueId differs from the previous log\'s UniqueId.' },
  BR_HRL_CLOSED: { recoverable: false, description: 'An HRL writer or change tracker was used after it was sealed or closed.' },
  BR_TRACKER_STATE_CORRUPT: { recoverable: false, description: 'A change tracker state file or log sidecar failed validation.' },
  BR_TRACKER_RESYNC_REQUIRED: { recoverable: false, description: 'The change tracker dropped its logs (overflow or lost dirty map); the dirty extents must be resynced.' },
  BR_TAG_RESYNC_PENDING: { recoverable: true, description: 'An app-consistent point cannot be taken while a disk of the tag still owes a resync (its replica is not in step); tag again once the resync has finished.' },

  // --- targets ---
  // fixed VHD files and Azure page blobs (src/targets/vhd, src/targets/blob)
  BR_VHD_FOOTER_CORRUPT: { recoverable: false, description: 'A VHD footer has a bad cookie, checksum or version; the message names the byte offset.' },
  BR_VHD_NOT_FIXED: { recoverable: false, description: 'The VHD is dynamic or differencing; only fixed VHDs are targets.' },
  BR_VHD_SIZE_MISMATCH: { recoverable: false, description: 'The VHD footer size does not match the data before it (truncated or damaged image).' },
  BR_BLOB_URL_INVALID: { recoverable: false, description: 'A blob: disk spec is not http(s)://host[:port]/account/container/blob.' },
  BR_BLOB_CREDENTIALS: { recoverable: false, description: 'AZURE_STORAGE_CONNECTION_STRING is missing, malformed or for another account.' },
  BR_BLOB_AUTH: { recoverable: false, description: 'The storage account refused the credentials (HTTP 401/403).' },
  BR_BLOB_THROTTLED: { recoverable: true, description: 'The storage account is throttling requests (HTTP 429/503).' },
  BR_BLOB_SERVER_ERROR: { recoverable: true, description: 'The storage service answered with a server error (HTTP 5xx).' },
  BR_BLOB_NETWORK: { recoverable: true, description: 'The storage endpoint could not be reached or the request timed out.' },
  BR_BLOB_REQUEST_FAILED: { recoverable: false, description: 'The storage service refused a request (HTTP 4xx other than auth and throttling).' },
  BR_BLOB_NOT_FOUND: { recoverable: false, description: 'The page blob or its container does not exist.' },
  BR_BLOB_NOT_PAGE_BLOB: { recoverable: false, description: 'The blob exists but is not a page blob.' },
  BR_BLOB_TOO_LARGE: { recoverable: false, description: 'The disk does not fit a page blob (8 TiB including the 512-byte VHD footer).' },
  BR_BLOB_LEASE_HELD: { recoverable: true, description: 'Another writer holds the lease on the page blob; a dead holder\'s lease expires within 60 s.' },
  BR_BLOB_LEASE_LOST: { recoverable: false, description: 'The lease on the page blob was lost while writing; another writer may have written.' },

  BR_TARGET_SPEC_INVALID: { recoverable: false, description: 'A disk spec is malformed; expected raw:PATH, vmdk:PATH, vmdk-flat:PATH, vhd:PATH, blob:URL or nbd://HOST:PORT/EXPORT.' },
  BR_TARGET_UNSUPPORTED: { recoverable: false, description: 'The disk kind or a feature of this image (e.g. a VMDK subformat) is not supported.' },
  BR_TARGET_OUT_OF_RANGE: { recoverable: false, description: 'A request reaches outside the disk.' },
  BR_TARGET_UNALIGNED: { recoverable: false, description: 'A request offset or length is not a multiple of the target alignment.' },
  BR_TARGET_READ_ONLY: { recoverable: false, description: 'The disk is open read-only and refuses writes.' },
  BR_TARGET_CLOSED: { recoverable: false, description: 'The disk was used after close.' },
  BR_TARGET_NAME_CONFLICT: { recoverable: false, description: 'A disk that is not ours already exists where a disk was to be created.', asrCode: 78052 },
  BR_TARGET_DUPLICATE_UUID: { recoverable: false, description: 'Another open disk in this process has the same disk UUID.' },
  BR_TARGET_HAS_PARENT: { recoverable: false, description: 'The image is a child in a snapshot chain (it has a parent); the master target needs a disk without snapshots.' },
  BR_TARGET_IS_PARENT: { recoverable: false, description: 'The image is the parent of another image (a snapshot exists); writing it would corrupt the child.' },
  BR_TARGET_TOO_MANY_DISKS: { recoverable: false, description: 'The master target already has the maximum of 60 attached disks.' },
  BR_TARGET_CORRUPT: { recoverable: false, description: 'The disk image is damaged (bad magic, bad checksum, pointers past the end, truncated); the message names the byte offset.' },
  BR_TARGET_SIZE_MISMATCH: { recoverable: false, description: 'The disks of a copy differ in size, or a size is not valid for the format.' },

  // --- tap (NBD) ---
  BR_NBD_CONNECTION: { recoverable: true, description: 'An NBD connection could not be made or closed before every reply arrived.' },
  BR_NBD_PROTOCOL: { recoverable: false, description: 'The NBD peer broke the protocol (bad magic, malformed reply, unexpected handle).' },
  BR_NBD_EXPORT_UNKNOWN: { recoverable: false, description: 'The NBD server has no export of that name.' },
  BR_NBD_REQUEST_FAILED: { recoverable: false, description: 'The NBD server answered a request with an error value (named in the message).' },
  BR_NBD_READ_ONLY: { recoverable: false, description: 'The NBD export is read-only; writes are refused.' },
  BR_NBD_OUT_OF_RANGE: { recoverable: false, description: 'An NBD request lies outside the export or breaks its block size constraints.' },
  BR_TAP_LISTEN: { recoverable: true, description: 'The source tap could not listen on its address (in use or not permitted).' },
  BR_TAP_STOP_TIMEOUT: { recoverable: false, description: 'The source tap did not stop in time (a disk that hangs): the message names the logs not sealed, the disks not flushed and the NBD requests not answered.' },

  // --- transport ---
  BR_QUIESCE_FAILED: { recoverable: true, description: 'The application quiesce hook failed or timed out; no app-consistent point was taken.' },
  BR_NET_UNREACHABLE: { recoverable: true, description: 'The next hop refused or reset the connection, or could not be resolved.' },
  BR_NET_TIMEOUT: { recoverable: true, description: 'The next hop stopped answering within the time allowed.' },
  BR_PEER_BUSY: { recoverable: true, description: 'The next hop asked us to slow down (HTTP 429 or 503).' },
  BR_PEER_ERROR: { recoverable: true, description: 'The next hop failed with a server error (HTTP 5xx); it may recover.' },
  BR_AUTH_FAILED: { recoverable: false, description: 'The shared secret was missing or wrong (HTTP 401); fix the configuration on both ends.' },
  BR_PROTOCOL: { recoverable: false, description: 'A request or answer did not follow the blockrelay transport protocol.' },
  BR_DISK_ID_INVALID: { recoverable: false, description: 'A disk id is empty, too long, or holds characters other than letters, digits, ".", "_" and "-".' },
  BR_DISK_UNKNOWN: { recoverable: false, description: 'The disk is not configured on this role.' },
  BR_SEQ_GAP: { recoverable: true, description: 'A log arrived ahead of its turn; the sender resends from the sequence number the receiver expects.' },
  BR_SEQ_CONFLICT: { recoverable: false, description: 'A log arrived with a sequence number already used by a different log.' },
  BR_SEQ_UNKNOWN: { recoverable: false, description: 'A log arrived below the next expected sequence number that this receiver neither accepted nor saw skipped by a resync log; it is refused rather than answered as a duplicate.' },
  BR_UPLOAD_INCOMPLETE: { recoverable: true, description: 'An upload ended before its declared length; it is discarded and resent.' },
  BR_UPLOAD_HASH_MISMATCH: { recoverable: true, description: 'An upload does not match the xxhash64 its sender declared; it is discarded and resent.' },
  BR_UPLOAD_TOO_LARGE: { recoverable: false, description: 'An upload is larger than the receiver accepts for one log.' },
  BR_SPOOL_FULL: { recoverable: true, description: 'The process server cache volume spool reached its size bound; the source keeps logging and resyncs if it overflows.' },
  BR_DISK_CRITICAL: { recoverable: false, description: 'The disk replication is stopped in state Critical until an operator resumes it.' },
  BR_APPLY_STATE_CORRUPT: { recoverable: false, description: 'The master target apply state file failed validation.' },

  // --- resync ---
  BR_RESYNC_SIZE_MISMATCH: { recoverable: false, description: 'Resync source and target disks differ in size.' },
  BR_RESYNC_PROTOCOL: { recoverable: false, description: 'A resync message between source and target side is malformed.' },
  BR_RESYNC_STATE_CORRUPT: { recoverable: false, description: 'A resync state file failed validation; remove it to start the resync over.' },
  BR_RESYNC_STATE_MISMATCH: { recoverable: false, description: 'A resync state file belongs to another source/target pair.' },
  BR_RESYNC_EXTENTS_INVALID: { recoverable: false, description: 'The extents given to a resync are malformed or outside the disk.' },
  BR_RESYNC_ABORTED: { recoverable: true, description: 'A resync was stopped before it finished; its progress is saved and it resumes.' },
  BR_ROLE_STOP_TIMEOUT: { recoverable: true, description: 'A process server or master target did not stop within its bound after SIGTERM (a target or volume not answering); it exits 1, and what it acknowledged goes on at the next start.' },
  BR_SOURCE_STOPPING: { recoverable: true, description: 'The source is stopping and starts nothing new; send the request again once it runs (it resumes interrupted resyncs by itself).' },
  BR_RESYNC_SESSION_BUSY: { recoverable: false, description: 'Another networked resync session holds this disk (HTTP 409); wait for it to end or expire, then run the resync again.' },
  BR_RESYNC_SESSION_EXPIRED: { recoverable: true, description: 'The networked resync session ended (expired, superseded or stopped); the resync resumes from its saved progress in a new session.' },
  BR_RESYNC_HISTORY_DROPPED: { recoverable: true, description: 'A networked resync session was interrupted before its pre-images were complete, so the disk\'s older recovery points were dropped; history starts again with the next log.' },
  BR_RESYNC_NOT_READY: { recoverable: true, description: 'The receiving hop has not yet applied or forwarded the logs up to the resync anchor; the resync tries again.' },
  BR_RESYNC_ANCHOR_PASSED: { recoverable: true, description: 'A log after the resync anchor was already applied on the receiving hop, so the session cannot open at that anchor; the source cuts again and opens a new attempt.' },
  BR_RESYNC_HOLD_FULL: { recoverable: true, description: 'The logs a networked resync session held back reached their bound (a quarter of the spool, or the spool\'s last eighth); the session ended so they go on, and the resync resumes in a new session.' },

  // --- retention ---
  BR_RETENTION_VOLUME_SHARED: { recoverable: false, description: 'The retention volume is the cache or install volume (same device as the state, cache or install directory); give it a volume of its own.' },
  BR_RETENTION_VOLUME_HOLDS_TARGET: { recoverable: false, description: 'A replication target lies on the retention volume directory; targets and history must be kept apart.' },
  BR_RETENTION_VOLUME_FAT: { recoverable: false, description: 'The retention volume is FAT/FAT32, which cannot hold the journal safely (no fsync of renames, 4 GiB file limit).' },
  BR_RETENTION_VOLUME_READ_ONLY: { recoverable: false, description: 'The retention volume is mounted read-only or the directory is not writable.' },
  BR_RETENTION_VOLUME_NO_CAPACITY: { recoverable: false, description: 'The retention volume reports zero capacity.' },
  BR_RETENTION_VOLUME_FULL: { recoverable: true, description: 'The retention volume is full: the oldest history was pruned to keep applying; history is shorter than the retention window.' },
  BR_RETENTION_JOURNAL_CORRUPT: { recoverable: false, description: 'An undo-journal segment failed verification; the message names the file and byte offset. Points newer than the segment are still usable.' },
  BR_RETENTION_JOURNAL_MISSING: { recoverable: false, description: 'An undo-journal segment a point needs is missing, so the point cannot be rebuilt.' },
  BR_RETENTION_CATALOG_CORRUPT: { recoverable: false, description: 'The recovery point catalog has a damaged record before its end; the message names the byte offset.' },
  BR_RETENTION_DISK_UNKNOWN: { recoverable: false, description: 'The retention directory holds no history for this disk (no manifest).' },
  BR_RETENTION_MANIFEST_INVALID: { recoverable: false, description: 'A retention disk manifest or failover record is unreadable or malformed.' },
  BR_POINT_NONE: { recoverable: false, description: 'The disk has no recovery point yet, so it cannot fail over.' },
  BR_POINT_UNKNOWN: { recoverable: false, description: 'No recovery point matches the POINT given (id, cut id, ISO time or latest/latest-processed/latest-app).' },
  BR_POINT_BEFORE_WINDOW: { recoverable: false, description: 'The time asked for lies before the retention window; that history was pruned.' },
  BR_POINT_NOT_COMMON: { recoverable: false, description: 'The members of the group share no recovery point matching POINT (a group fails over only to a common cut).' },
  BR_POINT_OUT_EXISTS: { recoverable: false, description: 'The failover output already exists and is not this disk\'s failed-over copy.', asrCode: 78052 },
  BR_POINT_NOT_FAILED_OVER: { recoverable: false, description: 'The disk is not failed over; commit ends a failover and deletes the points.' },
  BR_POINT_RESYNC_RUNNING: { recoverable: true, description: 'A resync session is changing the target in a slot the recovery point needs: the point cannot be read until the session ends (retry then).' },
  BR_POINT_PENDING_TIMEOUT: { recoverable: true, description: 'Failover to latest waited too long for pending logs to be applied.' },
} as const satisfies Record<string, ErrorSpec>;

export type ErrorCode = keyof typeof ERROR_CODES;

export function isErrorCode(value: string): value is ErrorCode {
  return Object.prototype.hasOwnProperty.call(ERROR_CODES, value);
}
