import { describe, expect, it } from 'vitest';
import { createMetrics } from '../../src/daemon/metrics';

describe('metrics', () => {
  it('prefixes every metric with blockrelay_ and uses base units', async () => {
    const m = createMetrics();
    m.writesBytesTotal.inc({ disk: 'disk0' }, 4096);
    const text = await m.registry.metrics();
    const names = [...text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((x) => [x[1]!, x[2]!] as const);
    expect(names.length).toBeGreaterThan(5);
    for (const [name, type] of names) {
      expect(name.startsWith('blockrelay_')).toBe(true);
      if (type === 'counter') expect(name).toMatch(/_total$/);
    }
    expect(text).toContain('blockrelay_tap_write_bytes_total{disk="disk0"} 4096');
  });
});
