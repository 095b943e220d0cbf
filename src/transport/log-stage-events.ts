/**
 * Where a log is on its way from the source's cut to the target: each hop
 * reports when it starts and finishes its stage for a log (shipping at the
 * source, forwarding at the process server, applying at the master target).
 * The end-to-end bench turns these into per-stage latencies; nothing in the
 * replication path depends on them.
 */
export type LogStage = 'ship' | 'forward' | 'apply';

export interface LogStageEvent {
  readonly diskId: string;
  readonly seq: number;
  readonly stage: LogStage;
  /** `start`: the hop took the log up; `done`: the next hop holds it durably (or it is applied and flushed). */
  readonly phase: 'start' | 'done';
  /** Wall-clock time of the event, ms since the epoch (the hop's clock). */
  readonly atMs: number;
  /** The source's cut that ended the log: its recovery point's time. */
  readonly cutTimeMs: number;
  readonly sizeBytes: number;
}

/** Receives stage events; must not throw and must return quickly (it runs on the hot path). */
export type LogStageSink = (event: LogStageEvent) => void;
