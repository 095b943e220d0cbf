import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/**
 * One prom-client registry per process. Every metric name starts with
 * `blockrelay_` and ends in its base unit (`_bytes_total`, `_seconds`).
 * Metrics are created here, in one place, so names and labels stay
 * consistent across roles; components receive the `Metrics` object.
 */
export function createMetrics(options: { defaultMetrics?: boolean } = {}) {
  const registry = new Registry();
  if (options.defaultMetrics !== false) collectDefaultMetrics({ register: registry, prefix: 'blockrelay_process_' });
  const disk = ['disk'] as const;
  const metrics = {
    registry,
    writesBytesTotal: new Counter({ name: 'blockrelay_tap_write_bytes_total', help: 'Bytes written by clients through the source tap.', labelNames: disk, registers: [registry] }),
    logBytesTotal: new Counter({ name: 'blockrelay_log_bytes_total', help: 'Bytes of sealed MS-HRL logs produced.', labelNames: disk, registers: [registry] }),
    shippedBytesTotal: new Counter({ name: 'blockrelay_shipped_bytes_total', help: 'Bytes of logs acknowledged by the next hop.', labelNames: ['disk', 'hop'] as const, registers: [registry] }),
    appliedBytesTotal: new Counter({ name: 'blockrelay_applied_bytes_total', help: 'Bytes applied to targets.', labelNames: disk, registers: [registry] }),
    pendingBytes: new Gauge({ name: 'blockrelay_pending_bytes', help: 'Bytes waiting at a hop (source, spool, apply).', labelNames: ['disk', 'hop'] as const, registers: [registry] }),
    rpoSeconds: new Gauge({ name: 'blockrelay_rpo_seconds', help: 'Age of the newest recovery point on the target side.', labelNames: disk, registers: [registry] }),
    health: new Gauge({ name: 'blockrelay_disk_health', help: 'Disk health: 0 OK, 1 Warning, 2 Critical.', labelNames: disk, registers: [registry] }),
    errorsTotal: new Counter({ name: 'blockrelay_errors_total', help: 'Errors by stable code.', labelNames: ['disk', 'code'] as const, registers: [registry] }),
    retriesTotal: new Counter({ name: 'blockrelay_retries_total', help: 'Retries scheduled by the retry policy.', labelNames: ['disk', 'code'] as const, registers: [registry] }),
    resyncBytesTotal: new Counter({ name: 'blockrelay_resync_sent_bytes_total', help: 'Bytes of differing blocks sent by resync.', labelNames: disk, registers: [registry] }),
    inHandSeconds: new Gauge({ name: 'blockrelay_log_in_hand_seconds', help: 'How long the log being applied (or forwarded) at a disk has been running; 0 when none is.', labelNames: ['disk', 'stage'] as const, registers: [registry] }),
    applySeconds: new Histogram({ name: 'blockrelay_apply_seconds', help: 'Time to apply one log to its target.', labelNames: disk, buckets: [0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30], registers: [registry] }),
  };
  return metrics;
}

export type Metrics = ReturnType<typeof createMetrics>;

export const HEALTH_GAUGE_VALUE = { OK: 0, Warning: 1, Critical: 2 } as const;
