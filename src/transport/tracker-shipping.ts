import type { ChangeTracker } from '../tracking/change-tracker';
import type { ShippableLog, ShippingSource } from './log-shipper';

/**
 * A change tracker's sealed logs as a shipping source: the tracker's
 * sequence numbers are the transport's, and its sidecar's cut becomes the
 * recovery point's time and identity.
 */
export function trackerShippingSource(tracker: ChangeTracker, extra: { group?: string } = {}): ShippingSource {
  const names = new Map<number, string>();
  return {
    diskId: tracker.diskId,
    diskSizeBytes: tracker.diskSizeBytes,
    async sealedLogs(): Promise<ShippableLog[]> {
      return tracker.sealedLogs().map((s) => {
        names.set(s.sequence, s.name);
        return { seq: s.sequence, file: s.path, cutTimeMs: s.cutTimeMs, cutId: s.cutId.replace(/[^A-Za-z0-9._-]/g, '').slice(0, 64), group: extra.group, appTag: s.appTag, resync: s.resync === true, ...(s.follows === undefined ? {} : { follows: s.follows }), ...(s.tainted === true ? { tainted: true } : {}) };
      });
    },
    async acknowledge(seq: number): Promise<void> {
      const name = names.get(seq);
      if (name !== undefined) await tracker.acknowledge(name);
      names.delete(seq);
    },
  };
}
