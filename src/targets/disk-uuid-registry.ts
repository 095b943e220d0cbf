import { BlockrelayError } from '../retry/blockrelay-error';

/**
 * The disk UUIDs open in this process. Two open disks with one identity (a
 * copied VMDK, a cloned VHD) would let replication write the wrong one, so a
 * second open of a UUID is refused while either open may write. Read-only
 * opens of one UUID may coexist (a failover reading a point while another
 * reader compares).
 */
const open = new Map<string, { spec: string; writable: boolean; count: number }>();

/** A claim on a UUID; `release()` is idempotent. */
export interface DiskUuidClaim {
  release(): void;
}

function normalise(uuid: string): string {
  return uuid.toLowerCase().replace(/[^0-9a-f]/g, '');
}

/** Claims `uuid` for `spec`; throws BR_TARGET_DUPLICATE_UUID if it clashes with an open disk. */
export function claimDiskUuid(uuid: string, spec: string, writable: boolean): DiskUuidClaim {
  const key = normalise(uuid);
  const held = open.get(key);
  if (held !== undefined) {
    if (held.writable || writable) {
      throw new BlockrelayError('BR_TARGET_DUPLICATE_UUID', `disk uuid ${uuid} of ${spec} is already open as ${held.spec}`, { details: { uuid, spec, openSpec: held.spec } });
    }
    held.count++;
  } else {
    open.set(key, { spec, writable, count: 1 });
  }
  let released = false;
  return {
    release() {
      if (released) return;
      released = true;
      const entry = open.get(key);
      if (entry === undefined) return;
      entry.count--;
      if (entry.count === 0) open.delete(key);
    },
  };
}
