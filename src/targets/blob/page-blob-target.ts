import { randomUUID } from 'node:crypto';
import { ContainerClient, PageBlobClient, type BlobLeaseClient, type StoragePipelineOptions } from '@azure/storage-blob';
import type { Logger } from '../../daemon/logger';
import { systemClock, type Clock, type TimerHandle } from '../../platform/clock';
import { BlockrelayError } from '../../retry/blockrelay-error';
import type { AllocationExtent, DiskTarget, DiskTargetCapabilities, OpenOptions } from '../disk-target';
import { claimDiskUuid, type DiskUuidClaim } from '../disk-uuid-registry';
import { checkOpen, checkRequest } from '../request-bounds';
import {
  VHD_FOOTER_SIZE_BYTES,
  VHD_SECTOR_SIZE_BYTES,
  checkFixedVhdFooter,
  decodeVhdFooter,
  encodeVhdFooter,
  isUuid,
  newFixedVhdFooter,
  type VhdFooter,
} from '../vhd/vhd-footer';
import { wrapBlobError } from './blob-errors';
import { blobSpec, blobUrl, containerUrl, parseBlobUrl, type BlobLocation } from './blob-url';
import { InFlightLimit, runBounded } from '../../platform/in-flight-limit';
import { CONNECTION_STRING_ENV, blobAccess } from './storage-credentials';

const MiB = 1024 * 1024;

/** Limits of the page blob service, enforced by us (Azurite does not enforce them). */
export const PAGE_BLOB_LIMITS = {
  /** Page size: offsets and lengths of page writes are multiples of it. */
  pageBytes: 512,
  /** Largest body of one Put Page (update). */
  maxPutPageBytes: 4 * MiB,
  /** Largest page blob: the disk plus its 512-byte VHD footer must fit. */
  maxBlobBytes: 8 * 1024 * 1024 * MiB,
} as const;

/** Defaults, units in the names. */
export const PAGE_BLOB_DEFAULTS = {
  /** Lease length: a crashed writer's lease frees itself after this. The service allows 15-60 s. */
  leaseDurationSeconds: 60,
  /** Renewal period: a third of the lease, so two renewals can fail before it lapses. */
  leaseRenewIntervalMs: 20_000,
  /** Bound on concurrent Put Page / Clear Pages / Get Blob requests per disk. */
  maxInFlightRequests: 8,
  /** Bytes per ranged read request. */
  readPieceBytes: 4 * MiB,
  /** Page ranges asked for per listing request. */
  listPageSize: 1000,
  /**
   * The SDK's own quick retries for a request (short blips); waiting longer
   * is the project retry policy's job, driven by the coded errors we throw.
   */
  sdkMaxTries: 3,
  sdkRetryDelayMs: 500,
  sdkMaxRetryDelayMs: 4_000,
  requestTimeoutMs: 60_000,
} as const;

export interface PageBlobOpenOptions extends OpenOptions {
  /** Storage connection string; `AZURE_STORAGE_CONNECTION_STRING` by default. */
  readonly connectionString?: string;
  /** Blob name when the spec's URL names only the container. */
  readonly blobName?: string;
  /** Drives lease renewal and the footer timestamp; the system clock by default. */
  readonly clock?: Clock;
  readonly leaseDurationSeconds?: number;
  readonly leaseRenewIntervalMs?: number;
  readonly maxInFlightRequests?: number;
  /** SDK tries per request (1 = no SDK retry). */
  readonly sdkMaxTries?: number;
  /** Where to warn about a created size Azure cannot attach (not a whole MiB). */
  readonly logger?: Pick<Logger, 'warn'>;
}

/** Azure attaches a disk only if its virtual size is a whole number of MiB. */
export const AZURE_DISK_SIZE_MULTIPLE_BYTES = MiB;

/**
 * Metadata a snapshot this target takes carries (`snapshot()`): it tells
 * blockrelay's recovery-point snapshots from any other (an operator's, a
 * backup product's), which a sweep of orphans must never delete. Metadata
 * names are C# identifiers, so no dash.
 */
export const BLOCKRELAY_SNAPSHOT_METADATA = { name: 'blockrelaypoint', value: '1' } as const;

/** A snapshot of a page blob disk: a read-only past point. */
export interface PageBlobSnapshot {
  /** The service's snapshot id (a UTC time stamp). */
  readonly snapshot: string;
  /** Taken by `snapshot()` (carries BLOCKRELAY_SNAPSHOT_METADATA); set by `listSnapshots`. */
  readonly ours?: boolean;
  /** `blob:URL?snapshot=ID`, which opens it read-only. */
  readonly spec: string;
}

interface Lease {
  readonly id: string;
  readonly client: BlobLeaseClient;
}

const ZERO_PUT = Buffer.alloc(PAGE_BLOB_LIMITS.maxPutPageBytes);

function* pieces(offset: number, length: number, pieceBytes: number): Generator<{ offset: number; length: number }> {
  for (let at = offset; at < offset + length; at += pieceBytes) yield { offset: at, length: Math.min(pieceBytes, offset + length - at) };
}

/**
 * A fixed VHD in an Azure page blob: disk byte i is blob byte i, and the last
 * 512 bytes of the blob are the VHD footer (`docs/formats/vhd.md`), so the
 * blob can be attached as an Azure disk as it is.
 *
 * - Writes are split into Put Page requests of at most 4 MiB, at most
 *   `maxInFlightRequests` in flight; an all-zero piece becomes Clear Pages so
 *   holes stay holes. writeZeroes and discard are Clear Pages.
 * - A writable open holds a lease (acquired on open, renewed on the injected
 *   clock, released on close), and every write is conditional on the lease
 *   id, so a second writer can neither open nor interleave.
 * - Page writes are durable once acknowledged, so flush only reports a lost
 *   lease.
 * - extents() comes from List Page Ranges (`listPageRanges`, whose ends are
 *   inclusive; the older `getPageRanges` result is off by one in the SDK).
 * - Failures carry BR_BLOB_ codes: throttling, 5xx and network failures are
 *   recoverable for the caller's retry policy; auth and lease conflicts not.
 */
export class PageBlobTarget implements DiskTarget {
  readonly capabilities: DiskTargetCapabilities;
  /** Lease renewals that succeeded (for metrics and tests). */
  leaseRenewals = 0;
  private closed = false;
  private closing: Promise<void> | undefined;
  private renewTimer: TimerHandle | undefined;
  private renewing: Promise<void> | undefined;
  private leaseError: BlockrelayError | undefined;
  private readonly limit: InFlightLimit;
  private readonly pending = new Set<Promise<unknown>>();

  private constructor(
    readonly spec: string,
    private readonly location: BlobLocation,
    private readonly client: PageBlobClient,
    private readonly container: ContainerClient,
    private readonly footer: VhdFooter,
    private readonly lease: Lease | undefined,
    private readonly uuidClaim: DiskUuidClaim,
    private readonly clock: Clock,
    private readonly leaseRenewIntervalMs: number,
    maxInFlightRequests: number,
  ) {
    this.capabilities = { sparse: true, discard: true, alignmentBytes: VHD_SECTOR_SIZE_BYTES, readOnly: lease === undefined };
    this.limit = new InFlightLimit(maxInFlightRequests);
    if (lease !== undefined) this.scheduleRenewal();
  }

  get sizeBytes(): number {
    return this.footer.currentSizeBytes;
  }

  get diskUuid(): string {
    return this.footer.uniqueId;
  }

  /** The lease id held while open for writing (undefined when read-only). */
  get leaseId(): string | undefined {
    return this.lease?.id;
  }

  /**
   * Opens the page blob at `url` (a `blob:` spec without its prefix), or
   * creates it with `options.create`. Everything is validated before the
   * first write: the size (a positive multiple of 512 whose blob fits 8 TiB),
   * the credentials, the blob type and the footer. Creating over an existing
   * blob opens it only when it is a fixed VHD with the asked unique id and
   * size (BR_TARGET_NAME_CONFLICT otherwise).
   */
  static async open(url: string, options: PageBlobOpenOptions = {}): Promise<PageBlobTarget> {
    const location = parseBlobUrl(url, options.blobName);
    const spec = blobSpec(location);
    const readOnly = options.readOnly === true;
    const create = options.create;
    if (create !== undefined && readOnly) throw new BlockrelayError('BR_USAGE', `cannot create ${spec} read-only`);
    if (location.snapshot !== '' && !readOnly) {
      throw new BlockrelayError('BR_TARGET_READ_ONLY', `${spec} is a snapshot, which never changes; open it read-only`, { details: { spec } });
    }
    if (create !== undefined) {
      checkCreateRequest(spec, create.sizeBytes, create.diskUuid);
      // A replica keeps its source's size, so this is a warning, not a refusal:
      // whoever provisions the Azure disk from the blob must round it up.
      if (create.sizeBytes % AZURE_DISK_SIZE_MULTIPLE_BYTES !== 0) {
        options.logger?.warn({ spec, sizeBytes: create.sizeBytes }, 'disk size is not a whole MiB; Azure will not attach this page blob as a disk without resizing it');
      }
    }
    const leaseDurationSeconds = options.leaseDurationSeconds ?? PAGE_BLOB_DEFAULTS.leaseDurationSeconds;
    const leaseRenewIntervalMs = options.leaseRenewIntervalMs ?? PAGE_BLOB_DEFAULTS.leaseRenewIntervalMs;
    if (!Number.isInteger(leaseDurationSeconds) || leaseDurationSeconds < 15 || leaseDurationSeconds > 60) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `leaseDurationSeconds must be 15-60, got ${leaseDurationSeconds}`);
    }
    if (!(leaseRenewIntervalMs > 0 && leaseRenewIntervalMs < leaseDurationSeconds * 1000)) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `leaseRenewIntervalMs must be above 0 and below the lease duration, got ${leaseRenewIntervalMs}`);
    }
    const maxInFlightRequests = options.maxInFlightRequests ?? PAGE_BLOB_DEFAULTS.maxInFlightRequests;
    if (!Number.isInteger(maxInFlightRequests) || maxInFlightRequests < 1 || maxInFlightRequests > 64) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `maxInFlightRequests must be 1-64, got ${maxInFlightRequests}`);
    }
    const clock = options.clock ?? systemClock;
    const access = blobAccess(location, options.connectionString ?? process.env[CONNECTION_STRING_ENV]);
    const pipeline: StoragePipelineOptions = {
      retryOptions: {
        maxTries: options.sdkMaxTries ?? PAGE_BLOB_DEFAULTS.sdkMaxTries,
        retryDelayInMs: PAGE_BLOB_DEFAULTS.sdkRetryDelayMs,
        maxRetryDelayInMs: PAGE_BLOB_DEFAULTS.sdkMaxRetryDelayMs,
        tryTimeoutInMs: PAGE_BLOB_DEFAULTS.requestTimeoutMs,
      },
    };
    const sas = access.sasToken === '' ? '' : `?${access.sasToken}`;
    const baseClient = new PageBlobClient(`${blobUrl(location)}${sas}`, access.credential, pipeline);
    const client = location.snapshot === '' ? baseClient : baseClient.withSnapshot(location.snapshot);
    const container = new ContainerClient(`${containerUrl(location)}${sas}`, access.credential, pipeline);
    const context = {
      spec,
      location,
      client,
      container,
      clock,
      leaseDurationSeconds,
      leaseRenewIntervalMs,
      maxInFlightRequests,
    };

    if (create !== undefined) {
      // Creating first (conditional on absence) saves a round trip for the
      // common case of a new disk; an existing blob falls through to the
      // checks below, which decide whether it is ours.
      const made = await PageBlobTarget.createNew(context, create.sizeBytes, create.diskUuid);
      if (made !== 'exists') return made;
    }
    const props = await client.getProperties().catch((err: unknown) => {
      const e = wrapBlobError(err, 'Get Blob Properties', spec);
      if (e.code === 'BR_BLOB_NOT_FOUND') return undefined;
      throw e;
    });
    if (props === undefined) {
      throw new BlockrelayError('BR_BLOB_NOT_FOUND', `${spec} does not exist${create === undefined ? '' : ' (it was deleted while being created)'}`, { details: { spec } });
    }
    const blobBytes = props.contentLength ?? 0;
    if (props.blobType !== 'PageBlob') {
      if (create !== undefined) {
        throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${spec} already exists as a ${props.blobType}; refusing to create a disk over it`, { details: { spec } });
      }
      throw new BlockrelayError('BR_BLOB_NOT_PAGE_BLOB', `${spec} is a ${props.blobType}, not a page blob`, { details: { spec, blobType: props.blobType } });
    }
    if (blobBytes > PAGE_BLOB_LIMITS.maxBlobBytes) {
      throw new BlockrelayError('BR_BLOB_TOO_LARGE', `${spec} is ${blobBytes} bytes, more than the 8 TiB page blob limit`, { details: { spec, blobBytes } });
    }
    const lease = readOnly ? undefined : await acquireLease(client, spec, leaseDurationSeconds);
    try {
      let footer: VhdFooter;
      try {
        footer = await readFooter(client, spec, blobBytes);
      } catch (err) {
        if (create !== undefined && err instanceof BlockrelayError && err.code.startsWith('BR_VHD_')) {
          throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${spec} already exists and is not a blockrelay disk (${err.message}); refusing to create over it`, {
            cause: err,
            details: { spec },
          });
        }
        throw err;
      }
      if (create !== undefined) {
        const ours = create.diskUuid !== undefined && footer.uniqueId.toLowerCase() === create.diskUuid.toLowerCase() && footer.currentSizeBytes === create.sizeBytes;
        if (!ours) {
          throw new BlockrelayError('BR_TARGET_NAME_CONFLICT', `${spec} already holds disk ${footer.uniqueId} of ${footer.currentSizeBytes} bytes; refusing to create over it`, {
            details: { spec, existingUuid: footer.uniqueId },
          });
        }
      }
      // A snapshot is a past point of the disk, never written: it may be read
      // while the disk itself is open for writing, so it claims no identity.
      const claim = location.snapshot === '' ? claimDiskUuid(footer.uniqueId, spec, !readOnly) : { release: () => undefined };
      return new PageBlobTarget(spec, location, client, container, footer, lease, claim, clock, leaseRenewIntervalMs, context.maxInFlightRequests);
    } catch (err) {
      if (lease !== undefined) await lease.client.releaseLease().catch(() => undefined);
      throw err;
    }
  }

  private static async createNew(
    context: {
      spec: string;
      location: BlobLocation;
      client: PageBlobClient;
      container: ContainerClient;
      clock: Clock;
      leaseDurationSeconds: number;
      leaseRenewIntervalMs: number;
      maxInFlightRequests: number;
    },
    sizeBytes: number,
    diskUuid: string | undefined,
  ): Promise<PageBlobTarget | 'exists'> {
    const { spec, client } = context;
    const footer = newFixedVhdFooter(sizeBytes, { uniqueId: diskUuid, nowMs: context.clock.now() });
    const claim = claimDiskUuid(footer.uniqueId, spec, true);
    let lease: Lease | undefined;
    let created = false;
    /** Put Blob if none exists; false when one does (409). */
    const createBlob = (): Promise<boolean> =>
      client.create(sizeBytes + VHD_FOOTER_SIZE_BYTES, { conditions: { ifNoneMatch: '*' } }).then(
        () => true,
        (err: unknown) => {
          if ((err as { statusCode?: number }).statusCode === 409) return false;
          throw err;
        },
      );
    try {
      let fresh: boolean;
      try {
        fresh = await createBlob();
      } catch (err) {
        // The container is made only when missing, which costs a request
        // only the first time a container is used.
        if ((err as { statusCode?: number }).statusCode !== 404) throw wrapBlobError(err, 'Create Page Blob', spec);
        await context.container.createIfNotExists().catch((e: unknown) => {
          throw wrapBlobError(e, 'Create Container', spec);
        });
        fresh = await createBlob().catch((e: unknown) => {
          throw wrapBlobError(e, 'Create Page Blob', spec);
        });
      }
      if (!fresh) {
        claim.release();
        return 'exists';
      }
      created = true;
      lease = await acquireLease(client, spec, context.leaseDurationSeconds);
      const footerBytes = encodeVhdFooter(footer);
      await client.uploadPages(footerBytes, sizeBytes, VHD_FOOTER_SIZE_BYTES, { conditions: { leaseId: lease.id } }).catch((err: unknown) => {
        throw wrapBlobError(err, 'Put Page (footer)', spec);
      });
    } catch (err) {
      claim.release();
      // Leave nothing half-made: a blob without its footer would later read
      // as damaged and block the next create. Best effort; the error that
      // matters is the one thrown.
      if (created) await client.delete({ conditions: lease === undefined ? {} : { leaseId: lease.id } }).catch(() => undefined);
      else if (lease !== undefined) await lease.client.releaseLease().catch(() => undefined);
      throw err;
    }
    return new PageBlobTarget(spec, context.location, client, context.container, footer, lease, claim, context.clock, context.leaseRenewIntervalMs, context.maxInFlightRequests);
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.track(() => this.readNow(offset, length));
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.track(() => this.writeNow(offset, data));
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.track(() => this.writeZeroesNow(offset, length, 'writeZeroes'));
  }

  discard(offset: number, length: number): Promise<void> {
    return this.track(() => this.writeZeroesNow(offset, length, 'discard'));
  }

  private async readNow(offset: number, length: number): Promise<Buffer> {
    this.checkUsable();
    checkRequest(this, 'read', offset, length);
    const out = Buffer.alloc(length);
    await runBounded(this.limit, pieces(offset, length, PAGE_BLOB_DEFAULTS.readPieceBytes), async (p) => {
      const view = out.subarray(p.offset - offset, p.offset - offset + p.length);
      await this.client.downloadToBuffer(view, p.offset, p.length, { concurrency: 1, blockSize: p.length }).catch((err: unknown) => {
        throw this.failure(err, 'Get Blob');
      });
    });
    return out;
  }

  private async writeNow(offset: number, data: Buffer): Promise<void> {
    this.checkWritable();
    checkRequest(this, 'write', offset, data.length);
    const leaseId = this.lease!.id;
    await runBounded(this.limit, pieces(offset, data.length, PAGE_BLOB_LIMITS.maxPutPageBytes), async (p) => {
      const body = data.subarray(p.offset - offset, p.offset - offset + p.length);
      // An all-zero piece is cleared instead of uploaded: same contents, no
      // bytes on the wire, and the pages stay unallocated.
      if (body.equals(ZERO_PUT.subarray(0, p.length))) {
        await this.client.clearPages(p.offset, p.length, { conditions: { leaseId } }).catch((err: unknown) => {
          throw this.failure(err, 'Put Page (clear)');
        });
        return;
      }
      await this.client.uploadPages(body, p.offset, p.length, { conditions: { leaseId } }).catch((err: unknown) => {
        throw this.failure(err, 'Put Page');
      });
    });
  }

  private async writeZeroesNow(offset: number, length: number, kind: 'writeZeroes' | 'discard'): Promise<void> {
    this.checkWritable();
    checkRequest(this, kind, offset, length);
    if (length === 0) return;
    const release = await this.limit.acquire();
    try {
      // Clear Pages may span the whole blob in one request (the 4 MiB limit is for updates).
      await this.client.clearPages(offset, length, { conditions: { leaseId: this.lease!.id } });
    } catch (err) {
      throw this.failure(err, 'Put Page (clear)');
    } finally {
      release();
    }
  }

  /**
   * Takes a snapshot of the blob under the lease (for instance a recovery
   * point on the Azure side: every write acknowledged before the call is in
   * it). Returns the snapshot id and the `blob:` spec that opens it read-only.
   */
  snapshot(): Promise<PageBlobSnapshot> {
    return this.track(async () => {
      this.checkWritable();
      const release = await this.limit.acquire();
      try {
        const answer = await this.client.createSnapshot({ conditions: { leaseId: this.lease!.id }, metadata: { [BLOCKRELAY_SNAPSHOT_METADATA.name]: BLOCKRELAY_SNAPSHOT_METADATA.value } });
        const id = answer.snapshot;
        if (id === undefined) throw new BlockrelayError('BR_BLOB_REQUEST_FAILED', `Snapshot Blob on ${this.spec} answered without a snapshot id`, { details: { spec: this.spec } });
        return { snapshot: id, spec: blobSpec({ ...this.location, snapshot: id }) };
      } catch (err) {
        throw this.failure(err, 'Snapshot Blob');
      } finally {
        release();
      }
    });
  }

  /** Snapshots of this blob, oldest first; more than `maxSnapshots` is refused rather than listed without bound. */
  async listSnapshots(maxSnapshots = 10_000): Promise<PageBlobSnapshot[]> {
    this.checkUsable();
    const out: PageBlobSnapshot[] = [];
    try {
      for await (const item of this.container.listBlobsFlat({ prefix: this.location.blobName, includeSnapshots: true, includeMetadata: true })) {
        if (item.name !== this.location.blobName || item.snapshot === undefined || item.snapshot === '') continue;
        if (out.length === maxSnapshots) {
          throw new BlockrelayError('BR_BLOB_REQUEST_FAILED', `${this.spec} has more than ${maxSnapshots} snapshots`, { details: { spec: this.spec } });
        }
        const ours = item.metadata?.[BLOCKRELAY_SNAPSHOT_METADATA.name] === BLOCKRELAY_SNAPSHOT_METADATA.value;
        out.push({ snapshot: item.snapshot, spec: blobSpec({ ...this.location, snapshot: item.snapshot }), ours });
      }
    } catch (err) {
      throw this.failure(err, 'List Blobs (snapshots)');
    }
    // Snapshot ids are fixed-width UTC time stamps: text order is time order.
    return out.sort((a, b) => (a.snapshot < b.snapshot ? -1 : a.snapshot > b.snapshot ? 1 : 0));
  }

  /** Deletes one snapshot of this blob (retention pruning); the disk itself is untouched. */
  deleteSnapshot(snapshot: string): Promise<void> {
    return this.track(async () => {
      this.checkWritable();
      parseBlobUrl(`${blobUrl(this.location)}?snapshot=${encodeURIComponent(snapshot)}`);
      await this.client.withSnapshot(snapshot).delete().catch((err: unknown) => {
        throw this.failure(err, 'Delete Blob (snapshot)');
      });
    });
  }

  /** Acknowledged page writes are already durable; flush reports a lost lease. */
  async flush(): Promise<void> {
    this.checkUsable();
    if (this.leaseError !== undefined) throw this.leaseError;
  }

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    this.checkUsable();
    checkRequest(this, 'extents', offset, length);
    if (length === 0) return;
    const end = offset + length;
    let at = offset;
    let data: { offset: number; length: number } | undefined;
    const pages = this.client.listPageRanges(offset, length).byPage({ maxPageSize: PAGE_BLOB_DEFAULTS.listPageSize });
    try {
      for await (const page of pages) {
        for (const range of page.pageRange ?? []) {
          // Ranges are inclusive at both ends; clip to the asked range (and so
          // away from the footer).
          const start = Math.max(range.start, at);
          const stop = Math.min(range.end + 1, end);
          if (stop <= start) continue;
          if (data !== undefined && data.offset + data.length === start) {
            data.length += stop - start;
          } else {
            if (data !== undefined) yield { ...data, zero: false };
            data = undefined;
            if (start > at) yield { offset: at, length: start - at, zero: true };
            data = { offset: start, length: stop - start };
          }
          at = stop;
        }
      }
    } catch (err) {
      throw this.failure(err, 'List Page Ranges');
    }
    if (data !== undefined) yield { ...data, zero: false };
    if (at < end) yield { offset: at, length: end - at, zero: true };
  }

  async close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    this.closed = true;
    this.renewTimer?.cancel();
    this.renewTimer = undefined;
    try {
      // Requests already in flight finish under the lease before it is let go
      // (each is bounded by the request timeout); their callers see their results.
      await Promise.allSettled([...this.pending]);
      await this.renewing;
      if (this.lease !== undefined && this.leaseError === undefined) {
        await this.lease.client.releaseLease().catch((err: unknown) => {
          throw wrapBlobError(err, 'Release Lease', this.spec);
        });
      }
    } finally {
      this.uuidClaim.release();
    }
  }

  private scheduleRenewal(): void {
    this.renewTimer = this.clock.setTimer(() => {
      this.renewTimer = undefined;
      this.renewing = this.renewLease().finally(() => {
        this.renewing = undefined;
      });
    }, this.leaseRenewIntervalMs);
  }

  /**
   * Renews the lease. A lease the service says is gone (broken, taken, not
   * present) is final: later writes fail with BR_BLOB_LEASE_LOST. A
   * transient failure waits for the next period; the service refuses writes
   * on its own if the lease lapses meanwhile.
   */
  private async renewLease(): Promise<void> {
    if (this.closed || this.lease === undefined) return;
    try {
      // Bounded by the renewal period, so a hung renewal cannot outlive the lease unnoticed.
      await this.lease.client.renewLease({ abortSignal: AbortSignal.timeout(this.leaseRenewIntervalMs) });
      this.leaseRenewals++;
    } catch (err) {
      const e = wrapBlobError(err, 'Renew Lease', this.spec);
      if (!e.recoverable) {
        this.leaseError = new BlockrelayError('BR_BLOB_LEASE_LOST', `the lease on ${this.spec} was lost: ${e.message}`, { cause: e, details: { spec: this.spec } });
        return;
      }
    }
    if (!this.closed) this.scheduleRenewal();
  }

  /** Runs a request, remembering it until it settles so close() can wait for it. */
  private track<T>(op: () => Promise<T>): Promise<T> {
    const p = op();
    this.pending.add(p);
    const forget = (): void => {
      this.pending.delete(p);
    };
    p.then(forget, forget);
    return p;
  }

  private checkUsable(): void {
    checkOpen(this.closed, this.spec);
  }

  private checkWritable(): void {
    checkOpen(this.closed, this.spec);
    if (this.leaseError !== undefined) throw this.leaseError;
  }

  /** Wraps a request failure; a lease failure is remembered so later writes fail at once. */
  private failure(err: unknown, what: string): BlockrelayError {
    const e = wrapBlobError(err, what, this.spec);
    if (e.code === 'BR_BLOB_LEASE_LOST' || (e.code === 'BR_BLOB_REQUEST_FAILED' && e.details.statusCode === 412)) {
      this.leaseError ??= new BlockrelayError('BR_BLOB_LEASE_LOST', `the lease on ${this.spec} is gone: ${e.message}`, { cause: e, details: e.details });
      return this.leaseError;
    }
    return e;
  }
}

function checkCreateRequest(spec: string, sizeBytes: number, diskUuid: string | undefined): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % PAGE_BLOB_LIMITS.pageBytes !== 0) {
    throw new BlockrelayError('BR_TARGET_SIZE_MISMATCH', `cannot create ${spec} with size ${sizeBytes}: a page blob disk is a positive multiple of 512 bytes`, {
      details: { spec, sizeBytes },
    });
  }
  if (sizeBytes + VHD_FOOTER_SIZE_BYTES > PAGE_BLOB_LIMITS.maxBlobBytes) {
    throw new BlockrelayError(
      'BR_BLOB_TOO_LARGE',
      `cannot create ${spec} with size ${sizeBytes}: with its 512-byte VHD footer it exceeds the 8 TiB page blob limit (largest disk ${PAGE_BLOB_LIMITS.maxBlobBytes - VHD_FOOTER_SIZE_BYTES} bytes)`,
      { details: { spec, sizeBytes, maxBlobBytes: PAGE_BLOB_LIMITS.maxBlobBytes } },
    );
  }
  if (diskUuid !== undefined && !isUuid(diskUuid)) {
    throw new BlockrelayError('BR_USAGE', `disk uuid ${JSON.stringify(diskUuid)} for ${spec} is not a UUID`, { details: { spec } });
  }
}

async function acquireLease(client: PageBlobClient, spec: string, durationSeconds: number): Promise<Lease> {
  // Our own lease id: if the SDK retries an acquisition whose answer was
  // lost, the service accepts the same proposed id again.
  const id = randomUUID();
  const leaseClient = client.getBlobLeaseClient(id);
  try {
    await leaseClient.acquireLease(durationSeconds);
  } catch (err) {
    const e = wrapBlobError(err, 'Acquire Lease', spec, 'acquire');
    if (e.code === 'BR_BLOB_LEASE_HELD') {
      throw new BlockrelayError('BR_BLOB_LEASE_HELD', `${spec} is leased by another writer; it is open for writing elsewhere (a dead writer's lease expires within 60 s)`, {
        cause: e,
        details: e.details,
      });
    }
    throw e;
  }
  return { id, client: leaseClient };
}

async function readFooter(client: PageBlobClient, spec: string, blobBytes: number): Promise<VhdFooter> {
  if (blobBytes < VHD_FOOTER_SIZE_BYTES) {
    throw new BlockrelayError('BR_VHD_FOOTER_CORRUPT', `${spec}: blob is ${blobBytes} bytes, too short for the 512-byte VHD footer at byte offset 0`, {
      details: { offset: 0, where: spec, blobBytes },
    });
  }
  const footerOffset = blobBytes - VHD_FOOTER_SIZE_BYTES;
  const buf = Buffer.alloc(VHD_FOOTER_SIZE_BYTES);
  await client.downloadToBuffer(buf, footerOffset, VHD_FOOTER_SIZE_BYTES).catch((err: unknown) => {
    throw wrapBlobError(err, 'Get Blob (footer)', spec);
  });
  const footer = decodeVhdFooter(buf, footerOffset, spec);
  checkFixedVhdFooter(footer, blobBytes, spec);
  return footer;
}
