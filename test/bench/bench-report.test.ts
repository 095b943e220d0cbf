import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { judgeGoal, MAX_GENERIC_FIGURES, MIN_SLOT_MS, normaliseResult, NO_TARGET, renderMarkdown, runOrder, slotMs, type BenchRun, type Summary } from '../../bench/report';
import { discoverBenches } from '../../bench/run';
import { useTempDirs } from '../helpers/tmp';

// Trimmed copies of what the benches wrote in real runs.
const convertFixture = {
  bench: 'convert',
  quick: false,
  sizeBytes: 268435456,
  dataBytes: 63963136,
  repetitions: 3,
  blockrelayMs: 259.406748,
  qemuImgMs: 105.717356,
  qemuImgWritebackMs: 958.840078,
  ratio: 2.4537763505928014,
  ratioVsWriteback: 0.2705422457320354,
  identicalToSource: true,
};
const blobFixture = {
  bench: 'blob-upload',
  sizeBytes: 268435456,
  dataBytes: 180355072,
  concurrency: 8,
  peer: 'Azure SDK uploadPages loop, 4 MiB chunks, zero chunks skipped; same Azurite',
  medianMs: { blockrelay: 865.897573, sdkConcurrent: 726.879085, sdkSequential: 993.372107 },
  blockrelayMiBPerSecond: 295.6,
  ratio: { vsSdkSameConcurrency: 1.191, vsSdkSequential: 0.872 },
  verifiedIdentical: true,
};
const resyncFixture = {
  bench: 'resync',
  quick: true,
  sizeBytes: 268435456,
  changedBytes: 2682880,
  blockrelay: { medianMs: 688, totalBytes: 2817468 },
  rsync: { medianMs: 603.5, totalBytes: 3404069 },
  speedupVsRsync: 0.88,
  bytesRatioVsRsync: 0.828,
  goal: { speedupAtLeast: 4, fewerBytes: true },
};
const nativeFixture = {
  bench: 'native',
  dirtyMap: {
    peer: 'flat Uint32Array bitmap in TypeScript',
    random4KiB: { nativeBatchedMarksPerSecond: 8247013, peerMarksPerSecond: 8576757, ratio: 0.41, batchedRatio: 0.96, nativeMemoryBytes: 5587032, peerMemoryBytes: 67108864 },
    sequential4KiB: { ratio: 0.05, batchedRatio: 0.27 },
  },
  checksum: { bestKernel: 'avx2', nativeGBps: 36.77, plainLoopGBps: 0.61, ratio: 60.3 },
};

function machine(): Summary['machine'] {
  return { cpuModel: 'AMD EPYC 7B13 | test', cores: 2, memoryBytes: 8 * 1024 ** 3, loadAverage1m: 1.5, node: 'v20.20.2', commit: 'abc1234', dirty: true, date: '2026-11-21T09:00:00.000Z' };
}

describe('bench report normaliser', () => {
  it('turns convert times into a speed ratio (qemu-img time over ours)', () => {
    const r = normaliseResult('convert', convertFixture);
    expect(r.ratios['raw -> sparse VMDK vs qemu-img convert']).toBeCloseTo(105.717356 / 259.406748, 6);
    expect(r.ratios['raw -> sparse VMDK vs qemu-img convert -t writeback']).toBeCloseTo(958.840078 / 259.406748, 6);
    expect(r.figures['output identical to source']).toBe(true);
    expect(r.peer).toBe('qemu-img convert -O vmdk');
  });

  it('turns the page-blob upload medians into speed ratios and keeps its peer text', () => {
    const r = normaliseResult('blob-upload', blobFixture);
    expect(r.ratios['vs SDK uploadPages loop, same concurrency']).toBeCloseTo(726.879085 / 865.897573, 6);
    expect(r.ratios['vs SDK uploadPages loop, sequential']).toBeCloseTo(993.372107 / 865.897573, 6);
    expect(r.figures['blockrelay MiB/s']).toBe(295.6);
    expect(r.peer).toBe(blobFixture.peer);
  });

  it('reads the native micro-benchmarks nested two levels down', () => {
    const r = normaliseResult('native', nativeFixture);
    expect(r.ratios).toEqual({
      'dirty map, random 4 KiB marks, batched': 0.96,
      'dirty map, random 4 KiB marks, one call each': 0.41,
      'dirty map, sequential 4 KiB marks, batched': 0.27,
      'HRL checksum, best kernel': 60.3,
    });
    expect(r.figures['checksum kernel']).toBe('avx2');
  });

  it('judges resync against 4x rsync with fewer bytes: 0.88x is not met', () => {
    const r = normaliseResult('resync', resyncFixture);
    expect(r.ratios['resync time vs rsync']).toBe(0.88);
    expect(judgeGoal('resync', r, resyncFixture)).toEqual({ text: '≥ 4× faster than rsync, and fewer bytes sent', met: false });
    const fast = normaliseResult('resync', { ...resyncFixture, speedupVsRsync: 4.2 });
    expect(judgeGoal('resync', fast).met).toBe(true);
    const fastButWordy = normaliseResult('resync', { ...resyncFixture, speedupVsRsync: 4.2, bytesRatioVsRsync: 1.01 });
    expect(judgeGoal('resync', fastButWordy).met).toBe(false);
  });

  it('takes a result in the current convention (top-level ratios) as it stands, and judges the tap goals', () => {
    const raw = { bench: 'tap', ratios: { '64 KiB random writes, data logging': 0.86, '64 KiB random writes, dirty-map only': 0.97, '4 KiB random writes, data logging': 0.81, '4 KiB random writes, dirty-map only': 0.96 }, figures: { 'tap MiB/s': 410 }, peer: 'qemu-nbd', notes: ['same file system'] };
    const r = normaliseResult('tap', raw);
    expect(r).toEqual({ name: 'tap', ratios: raw.ratios, figures: raw.figures, peer: 'qemu-nbd', notes: ['same file system'] });
    expect(judgeGoal('tap', r).met).toBe(true);
    const slowLogging = normaliseResult('tap', { ...raw, ratios: { ...raw.ratios, '4 KiB random writes, data logging': 0.79 } });
    expect(judgeGoal('tap', slowLogging).met).toBe(false);
    expect(judgeGoal('tap', normaliseResult('tap', { ratios: { overall: 0.9 } })).met).toBeNull();
  });

  it('judges end-to-end churn: 200 MB/s with RPO p99 under 2 s, reading ms and MiB units', () => {
    const met = normaliseResult('e2e-churn', { ratios: {}, figures: { 'churn MB/s': 210, 'RPO p99 ms': 1500 } });
    expect(judgeGoal('e2e-churn', met).met).toBe(true);
    const late = normaliseResult('e2e-churn', { ratios: {}, figures: { 'churn MB/s': 210, 'RPO p99 ms': 2500 } });
    expect(judgeGoal('e2e-churn', late).met).toBe(false);
    // 191 MiB/s is 200.3 MB/s.
    const mib = normaliseResult('e2e-churn', { ratios: {}, figures: { 'churn MiB/s': 191, 'RPO p99 s': 1.2 } });
    expect(judgeGoal('e2e-churn', mib).met).toBe(true);
    expect(judgeGoal('e2e-churn', normaliseResult('e2e-churn', { figures: { other: 1 } }))).toEqual({ text: '200 MB/s of sustained churn with RPO p99 < 2 s', met: null });
    expect(judgeGoal('churn', met).text).toContain('200 MB/s');
    // The shape bench/e2e.bench.ts writes: flat figures, the peer's rate first.
    const e2e = { name: 'e2e', quick: true, peer: 'same fio job against qemu-nbd', peerMBs: 900, churnMBs: 150.2, ratio: 0.167, appliedMBs: 140, rpoP50Seconds: 0.9, rpoP99Seconds: 1.6, goal: 'churn >= 200 MB/s with RPO p99 < 2 s (issue 6)' };
    const slow = normaliseResult('e2e', e2e);
    expect(slow.figures).toMatchObject({ churnMBs: 150.2, rpoP99Seconds: 1.6 });
    expect(slow.figures.name).toBeUndefined();
    expect(judgeGoal('e2e', slow, e2e).met).toBe(false);
    expect(judgeGoal('e2e', normaliseResult('e2e', { ...e2e, churnMBs: 240 })).met).toBe(true);
    expect(judgeGoal('e2e', normaliseResult('e2e', { ...e2e, churnMBs: 240, rpoP99Seconds: 2.1 })).met).toBe(false);
    // No RPO samples: the figure is shown as not measured and the goal not judged, saying why...
    const unsampled = normaliseResult('e2e', { ...e2e, churnMBs: 240, rpoP99Seconds: null });
    expect(unsampled.figures.rpoP99Seconds).toBeNull();
    expect(judgeGoal('e2e', unsampled)).toMatchObject({ met: null, why: 'rpoP99Seconds was not measured' });
    // ...unless the churn rate alone misses the goal.
    expect(judgeGoal('e2e', normaliseResult('e2e', { ...e2e, churnMBs: 196.6, rpoP99Seconds: null })).met).toBe(false);
  });

  it('lets a result judge itself with goal.met', () => {
    expect(judgeGoal('e2e', normaliseResult('e2e', {}), { goal: { met: false } }).met).toBe(false);
    expect(judgeGoal('failover', normaliseResult('failover', {}), { goal: { met: true } })).toEqual({ text: NO_TARGET, met: true });
  });

  it('falls back to scalars for an unknown shape, bounded, and says the ratio direction is the bench\'s own', () => {
    const raw: Record<string, unknown> = { bench: 'failover', ratio: 3.5, peer: 'cp --sparse=always', nested: { firstReadMs: 12, list: [1, 2] } };
    for (let i = 0; i < 40; i++) raw[`f${i}`] = i;
    const r = normaliseResult('failover', raw);
    expect(r.ratios).toEqual({ ratio: 3.5 });
    expect(r.peer).toBe('cp --sparse=always');
    expect(r.figures['nested.firstReadMs']).toBe(12);
    expect(r.figures['nested.list']).toBeUndefined();
    expect(Object.keys(r.figures)).toHaveLength(MAX_GENERIC_FIGURES);
    expect(r.notes.join(' ')).toContain('direction');
  });

  it('survives a result that is not an object', () => {
    expect(normaliseResult('x', [1, 2])).toEqual({ name: 'x', ratios: {}, figures: {}, peer: '', notes: ['the result is not a JSON object'] });
    expect(normaliseResult('x', null).ratios).toEqual({});
  });
});

describe('bench time budget', () => {
  it('never hands out more than is left, keeps a minimum slot for each later bench, and respects the cap', () => {
    expect(slotMs(100_000, 1, 45_000)).toBe(45_000);
    expect(slotMs(100_000, 4, 45_000)).toBe(37_500); // fair 25 s, stretched by half
    expect(slotMs(30_000, 3, 45_000)).toBe(14_000); // stretching stops at 2 x 8 s kept for the rest
    expect(slotMs(MIN_SLOT_MS - 1, 1, 45_000)).toBe(0);
    expect(slotMs(100_000, 0, 45_000)).toBe(0);
    // Simulate benches that all use their whole slot: the total stays in budget.
    let remaining = 105_000;
    for (let left = 8; left > 0; left--) {
      const slot = slotMs(remaining, left, 45_000);
      remaining -= slot;
      expect(remaining).toBeGreaterThanOrEqual(0);
    }
  });

  it('runs last time\'s quick benches first, new ones next, and last time\'s timeouts last', () => {
    const goal = { text: NO_TARGET, met: null };
    const previous = {
      benches: [
        { name: 'blob-upload', status: 'timeout' as const, durationMs: 26_000, goal },
        { name: 'convert', status: 'ok' as const, durationMs: 3_600, goal },
        { name: 'failover', status: 'ok' as const, durationMs: 14_400, goal },
        { name: 'native', status: 'ok' as const, durationMs: 4_700, goal },
      ],
    };
    expect(runOrder(['blob-upload', 'convert', 'e2e', 'failover', 'native', 'tap'], previous)).toEqual(['convert', 'native', 'failover', 'e2e', 'tap', 'blob-upload']);
    expect(runOrder(['b', 'a'], undefined)).toEqual(['a', 'b']);
  });

  it('discovers every *.bench.ts in name order', () => {
    const names = discoverBenches(path.join(__dirname, '..', '..', 'bench'));
    expect(names).toEqual([...names].sort());
    expect(names).toEqual(expect.arrayContaining(['convert', 'resync']));
    expect(names).not.toContain('run');
  });
});

describe('benchmarks.md renderer', () => {
  const tmp = useTempDirs();

  function summary(benches: BenchRun[]): Summary {
    return { machine: machine(), quick: true, budgetMs: 105_000, totalMs: 98_765, benches };
  }

  it('shows machine, commit with its dirty flag, each scenario with its ratio, goal and status', () => {
    const resync = normaliseResult('resync', resyncFixture);
    const convert = normaliseResult('convert', convertFixture);
    const md = renderMarkdown(
      summary([
        { name: 'convert', status: 'ok', durationMs: 3900, result: convert, goal: judgeGoal('convert', convert) },
        { name: 'resync', status: 'ok', durationMs: 12000, result: resync, goal: judgeGoal('resync', resync, resyncFixture) },
        { name: 'tap', status: 'skipped', durationMs: 800, reason: 'tool fio missing', goal: judgeGoal('tap', undefined) },
        { name: 'e2e', status: 'timeout', durationMs: 30000, reason: 'no result within 30 s', goal: judgeGoal('e2e', undefined) },
        { name: 'failover', status: 'not-run', durationMs: 0, reason: 'the time budget was spent', goal: judgeGoal('failover', undefined) },
      ]),
    );
    expect(md).toContain('| CPU | AMD EPYC 7B13 \\| test |');
    expect(md).toContain('| cores | 2 |');
    expect(md).toContain('| memory | 8.0 GiB |');
    expect(md).toContain('| Node.js | v20.20.2 |');
    expect(md).toContain('`abc1234` (work tree had uncommitted changes)');
    expect(md).toContain('| convert | ok | 0.41× (raw -> sparse VMDK vs qemu-img convert) | none set; the ratio is reported | – |');
    expect(md).toContain('| resync | ok | 0.88× (resync time vs rsync) | ≥ 4× faster than rsync, and fewer bytes sent | not met |');
    expect(md).toContain('| tap | skipped: tool fio missing | – |');
    expect(md).toContain('| e2e | timeout: no result within 30 s | – | 200 MB/s of sustained churn with RPO p99 < 2 s | – |');
    expect(md).toContain('| failover | not-run: the time budget was spent |');
    expect(md).toContain('| qemu-img median ms | 106 |');
    expect(md).toContain('| changed bytes | 2,682,880 |');
    expect(md).toContain('`--quick` run');
    expect(md).toContain('98.8 s of a 105 s budget');
    expect(md).toContain('## Adding a scenario');
    const withNull = normaliseResult('e2e', { ratios: {}, figures: { rpoP99Seconds: null } });
    const nullMd = renderMarkdown(summary([{ name: 'e2e', status: 'ok', durationMs: 1, result: withNull, goal: judgeGoal('e2e', withNull) }]));
    expect(nullMd).toContain('| rpoP99Seconds | not measured |');
    expect(nullMd).toContain('| 200 MB/s of sustained churn with RPO p99 < 2 s | not judged: rpoP99Seconds was not measured |');
    expect(nullMd).toContain('(not judged: rpoP99Seconds was not measured).');
    // A summary round-trips through JSON, as summary.json does.
    const file = path.join(tmp(), 'summary.json');
    const s = summary([{ name: 'convert', status: 'ok', durationMs: 1, result: convert, goal: judgeGoal('convert', convert) }]);
    fs.writeFileSync(file, JSON.stringify(s));
    expect(renderMarkdown(JSON.parse(fs.readFileSync(file, 'utf8')) as Summary)).toBe(renderMarkdown(s));
  });
});
