/**
 * Applies a write a power loss tore: each `unitBytes`-aligned unit of the
 * file the write touches (absolute sector or page boundaries, not offsets
 * from the write's start) reached the disk or not, independently.
 */
export function applyTornWrite(apply: (position: number, data: Buffer) => void, position: number, data: Buffer, unitBytes: number, rnd: () => number): void {
  const end = position + data.length;
  for (let at = position; at < end; ) {
    const next = Math.min(end, (Math.floor(at / unitBytes) + 1) * unitBytes);
    if (rnd() < 0.5) apply(at, data.subarray(at - position, next - position));
    at = next;
  }
}

/** A file as a power loss leaves it, built from the writes that reached the disk at absolute positions; grows as a write lands past its end. */
export class CrashImage {
  bytes = Buffer.alloc(0);

  /** Puts `data` at `position` (a bound function: pass it to applyTornWrite as is). */
  readonly apply = (position: number, data: Buffer): void => {
    if (position + data.length > this.bytes.length) this.bytes = Buffer.concat([this.bytes, Buffer.alloc(position + data.length - this.bytes.length)]);
    data.copy(this.bytes, position);
  };
}
