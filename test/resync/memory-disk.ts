import type { AllocationExtent, DiskTarget, DiskTargetCapabilities } from '../../src/targets/disk-target';

/**
 * Test fixture only: a DiskTarget held in a Buffer, so the engine's unit
 * tests run without files. Real targets (openDisk) are used by the
 * integration tests. `failWritesAfter` makes the n-th and later writes throw,
 * to interrupt a resync at a known point.
 */
export class MemoryDisk implements DiskTarget {
  readonly diskUuid = undefined;
  readonly capabilities: DiskTargetCapabilities;
  readonly data: Buffer;
  readCount = 0;
  readBytes = 0;
  writeCount = 0;
  /** When set, extents() reports all-zero regions of this size as zero extents, like a sparse format. */
  zeroExtentBytes: number | undefined;
  failWritesAfter = Number.POSITIVE_INFINITY;

  constructor(
    readonly spec: string,
    sizeBytes: number,
    alignmentBytes = 512,
  ) {
    this.data = Buffer.alloc(sizeBytes);
    this.capabilities = { sparse: false, discard: false, alignmentBytes, readOnly: false };
  }

  get sizeBytes(): number {
    return this.data.length;
  }

  static from(spec: string, bytes: Buffer): MemoryDisk {
    const disk = new MemoryDisk(spec, bytes.length);
    bytes.copy(disk.data);
    return disk;
  }

  private check(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.data.length) throw new Error(`MemoryDisk: [${offset}, +${length}) outside ${this.data.length}`);
    if (offset % this.capabilities.alignmentBytes !== 0 || length % this.capabilities.alignmentBytes !== 0) throw new Error(`MemoryDisk: unaligned [${offset}, +${length})`);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.check(offset, length);
    this.readCount++;
    this.readBytes += length;
    return Buffer.from(this.data.subarray(offset, offset + length));
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.check(offset, data.length);
    if (this.writeCount >= this.failWritesAfter) throw new Error('MemoryDisk: injected write failure');
    this.writeCount++;
    data.copy(this.data, offset);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    this.data.fill(0, offset, offset + length);
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }

  async flush(): Promise<void> {}

  async *extents(offset: number, length: number): AsyncIterable<AllocationExtent> {
    const unit = this.zeroExtentBytes;
    if (unit === undefined) {
      yield { offset, length, zero: false };
      return;
    }
    for (let pos = offset; pos < offset + length; pos += unit) {
      const end = Math.min(pos + unit, offset + length);
      yield { offset: pos, length: end - pos, zero: this.data.subarray(pos, end).every((b) => b === 0) };
    }
  }

  async close(): Promise<void> {}
}
