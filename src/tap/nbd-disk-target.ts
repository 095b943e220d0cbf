import { NbdClient } from './nbd-client';
import { NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES } from './nbd-protocol';
import type { AllocationExtent, DiskTarget, DiskTargetCapabilities, OpenOptions } from '../targets/disk-target';
import { checkOpen, checkRequest } from '../targets/request-bounds';
import { BlockrelayError } from '../retry/blockrelay-error';

/**
 * An NBD export as a DiskTarget: the `nbd://HOST:PORT/EXPORT` disk spec.
 * DESIGN.md needs the read side (copying a disk out of a tap or a recovery
 * point export); writes work too when the export allows them. NBD has no
 * identity or allocation map in simple-reply mode, so `diskUuid` is
 * undefined and `extents()` reports one data extent.
 */
export class NbdDiskTarget implements DiskTarget {
  readonly diskUuid = undefined;
  readonly capabilities: DiskTargetCapabilities;
  readonly sizeBytes: number;
  private closed = false;

  private constructor(
    readonly spec: string,
    private readonly client: NbdClient,
    readOnly: boolean,
  ) {
    this.sizeBytes = client.sizeBytes;
    this.capabilities = {
      sparse: false,
      discard: client.has(NBD_FLAG_SEND_TRIM),
      alignmentBytes: Math.max(1, client.blockSizes.minimumBytes),
      readOnly: readOnly || client.readOnly,
    };
  }

  /** Connects to the export. `create` is refused: an NBD export's size is the server's. */
  static async open(host: string, port: number, exportName: string, options: OpenOptions = {}, spec = `nbd://${host}:${port}/${exportName}`): Promise<NbdDiskTarget> {
    if (options.create !== undefined) {
      throw new BlockrelayError('BR_TARGET_UNSUPPORTED', `cannot create ${spec}: an NBD export is sized by its server`, { details: { spec } });
    }
    const client = await NbdClient.connect({ host, port, exportName });
    return new NbdDiskTarget(spec, client, options.readOnly === true);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'read', offset, length);
    if (length === 0) return Buffer.alloc(0);
    return this.client.read(offset, length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'write', offset, data.length);
    if (data.length === 0) return;
    await this.client.write(offset, data);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'writeZeroes', offset, length);
    if (length === 0) return;
    if (this.client.has(NBD_FLAG_SEND_WRITE_ZEROES)) {
      await this.client.writeZeroes(offset, length);
      return;
    }
    // Without WRITE_ZEROES, write real zeroes in bounded pieces.
    const pieceBytes = Math.min(length, 1024 * 1024);
    const zeroes = Buffer.alloc(pieceBytes);
    for (let at = offset; at < offset + length; at += pieceBytes) {
      const n = Math.min(pieceBytes, offset + length - at);
      await this.client.write(at, n === pieceBytes ? zeroes : zeroes.subarray(0, n));
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'discard', offset, length);
    // NBD TRIM leaves the contents undefined, while DiskTarget.discard must
    // read back as zeroes: write zeroes instead.
    await this.writeZeroes(offset, length);
  }

  async flush(): Promise<void> {
    checkOpen(this.closed, this.spec);
    if (this.capabilities.readOnly || !this.client.has(NBD_FLAG_SEND_FLUSH)) return;
    await this.client.flush();
  }

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    checkOpen(this.closed, this.spec);
    checkRequest(this, 'extents', offset, length);
    if (length > 0) yield { offset, length, zero: false };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.capabilities.readOnly && this.client.has(NBD_FLAG_SEND_FLUSH)) await this.client.flush();
    } finally {
      await this.client.close();
    }
  }
}
