import type { BlockrelayError } from './blockrelay-error';
import type { ErrorCode } from './error-codes';

/**
 * Health of one replicated disk, as operators see it:
 * - OK: replicating within the RPO threshold.
 * - Warning: RPO over the threshold, a resync pending or running, a
 *   recoverable error being retried, the retention volume short of space,
 *   or one log's apply (or forward) running longer than the stall bound.
 * - Critical: a non-recoverable error stopped the disk's pipeline; it stays
 *   Critical until an operator clears it.
 */
export type HealthState = 'OK' | 'Warning' | 'Critical';

/** Reasons that are states, not errors: each is on or off as its source last reported. */
export type HealthFlag = 'RPO_EXCEEDED' | 'RESYNC_PENDING' | 'RESYNC_RUNNING' | 'APPLY_STALLED';

/** Why a disk is not OK; each reason stands until its own source clears it. */
export interface HealthIssue {
  readonly code: ErrorCode | HealthFlag;
  readonly message: string;
  readonly sinceMs: number;
  readonly critical: boolean;
}

export const HEALTH_DEFAULTS = {
  rpoThresholdMs: 15 * 60_000,
  /**
   * One log's apply (or forward) running longer than this warns
   * (APPLY_STALLED): a hung target otherwise shows only as a busy disk until
   * the RPO passes its threshold. Warning, not Critical: it may recover.
   */
  applyStallMs: 60_000,
  /** Last errors kept per disk for the status page; older ones are dropped. */
  recentErrorsMax: 20,
} as const;

export interface RecentError {
  readonly code: ErrorCode;
  readonly message: string;
  readonly atMs: number;
  readonly recoverable: boolean;
}

/**
 * Tracks one disk's health from the events the pipeline reports. Pure state,
 * no timers: the caller passes times, so tests need no clock at all.
 */
export class DiskHealth {
  private readonly issues = new Map<string, HealthIssue>();
  private readonly recent: RecentError[] = [];

  constructor(
    readonly diskId: string,
    private readonly rpoThresholdMs: number = HEALTH_DEFAULTS.rpoThresholdMs,
    private readonly applyStallMs: number = HEALTH_DEFAULTS.applyStallMs,
  ) {}

  get state(): HealthState {
    let state: HealthState = 'OK';
    for (const issue of this.issues.values()) {
      if (issue.critical) return 'Critical';
      state = 'Warning';
    }
    return state;
  }

  /** Current reasons, oldest first. */
  get reasons(): HealthIssue[] {
    return [...this.issues.values()].sort((a, b) => a.sinceMs - b.sinceMs);
  }

  get recentErrors(): readonly RecentError[] {
    return this.recent;
  }

  /**
   * A failure in the disk's pipeline under `source` (e.g. 'ship', 'apply'):
   * recoverable ones warn while they are retried, others make the disk Critical.
   */
  reportError(source: string, err: BlockrelayError, nowMs: number): void {
    this.recent.push({ code: err.code, message: err.message, atMs: nowMs, recoverable: err.recoverable });
    if (this.recent.length > HEALTH_DEFAULTS.recentErrorsMax) this.recent.shift();
    const prior = this.issues.get(`error:${source}`);
    this.issues.set(`error:${source}`, {
      code: err.code,
      message: err.message,
      sinceMs: prior?.code === err.code ? prior.sinceMs : nowMs,
      critical: !err.recoverable || prior?.critical === true,
    });
  }

  /**
   * The operation under `source` succeeded: a recoverable error there is over.
   * A Critical one is not cleared by success; only `acknowledgeCritical` does.
   */
  reportSuccess(source: string): void {
    const issue = this.issues.get(`error:${source}`);
    if (issue !== undefined && !issue.critical) this.issues.delete(`error:${source}`);
  }

  /** An operator acted on a Critical state (`blockrelay` resume); the pipeline may restart. */
  acknowledgeCritical(): void {
    for (const [key, issue] of this.issues) if (issue.critical) this.issues.delete(key);
  }

  /** The age of the newest recovery point on the target side, in ms (undefined: no point yet). */
  reportRpo(rpoMs: number | undefined, nowMs: number): void {
    const over = rpoMs !== undefined && rpoMs > this.rpoThresholdMs;
    this.setFlag('RPO_EXCEEDED', over, `RPO ${Math.round((rpoMs ?? 0) / 1000)} s is over the ${Math.round(this.rpoThresholdMs / 1000)} s threshold`, nowMs);
  }

  reportResync(state: 'none' | 'pending' | 'running', nowMs: number): void {
    this.setFlag('RESYNC_PENDING', state === 'pending', 'resync required', nowMs);
    this.setFlag('RESYNC_RUNNING', state === 'running', 'resync in progress', nowMs);
  }

  /**
   * The log in hand at the disk's `stage` ('apply', 'forward'), described
   * as `what` (e.g. "log 7"), has been running `runningMs` (undefined: none
   * in hand). Over the stall bound it warns APPLY_STALLED, with the
   * seconds; it clears once that log ends or another one is in hand.
   */
  reportInHand(stage: string, what: string | undefined, runningMs: number | undefined, nowMs: number): void {
    const over = what !== undefined && runningMs !== undefined && runningMs > this.applyStallMs;
    this.setFlag('APPLY_STALLED', over, `${stage} of ${what ?? 'a log'} running for ${Math.round((runningMs ?? 0) / 1000)} s, over the ${Math.round(this.applyStallMs / 1000)} s bound`, nowMs);
  }

  private setFlag(code: HealthFlag, on: boolean, message: string, nowMs: number): void {
    const prior = this.issues.get(code);
    if (!on) {
      this.issues.delete(code);
      return;
    }
    this.issues.set(code, { code, message, sinceMs: prior?.sinceMs ?? nowMs, critical: false });
  }
}
