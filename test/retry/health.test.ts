import { describe, expect, it } from 'vitest';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { DiskHealth } from '../../src/retry/health';

describe('DiskHealth', () => {
  it('is OK until something goes wrong', () => {
    expect(new DiskHealth('disk0').state).toBe('OK');
  });

  it('warns while a recoverable error is retried and recovers on success', () => {
    const h = new DiskHealth('disk0');
    h.reportError('ship', new BlockrelayError('BR_IO', 'reset'), 1000);
    expect(h.state).toBe('Warning');
    h.reportSuccess('ship');
    expect(h.state).toBe('OK');
    expect(h.recentErrors.map((e) => e.code)).toEqual(['BR_IO']);
  });

  it('stays Critical after a non-recoverable error until an operator acknowledges it', () => {
    const h = new DiskHealth('disk0');
    h.reportError('apply', new BlockrelayError('BR_CONFIG_INVALID', 'bad'), 1000);
    h.reportSuccess('apply');
    expect(h.state).toBe('Critical');
    h.acknowledgeCritical();
    expect(h.state).toBe('OK');
  });

  it('warns when the RPO passes the threshold (15 minutes by default)', () => {
    const h = new DiskHealth('disk0');
    h.reportRpo(14 * 60_000, 0);
    expect(h.state).toBe('OK');
    h.reportRpo(16 * 60_000, 0);
    expect(h.state).toBe('Warning');
    expect(h.reasons[0]?.code).toBe('RPO_EXCEEDED');
    h.reportRpo(1000, 0);
    expect(h.state).toBe('OK');
  });

  it('warns while a resync is pending or running', () => {
    const h = new DiskHealth('disk0');
    h.reportResync('pending', 5);
    expect(h.state).toBe('Warning');
    h.reportResync('running', 6);
    expect(h.reasons.map((r) => r.code)).toEqual(['RESYNC_RUNNING']);
    h.reportResync('none', 7);
    expect(h.state).toBe('OK');
  });

  it('keeps a bounded list of recent errors', () => {
    const h = new DiskHealth('disk0');
    for (let i = 0; i < 50; i++) h.reportError('ship', new BlockrelayError('BR_IO', `e${i}`), i);
    expect(h.recentErrors.length).toBe(20);
    expect(h.recentErrors[19]?.message).toBe('e49');
  });
});
