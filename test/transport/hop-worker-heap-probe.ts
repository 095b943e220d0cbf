/**
 * The heap probe of hop-worker-heap.test.ts: `count` arrays of 1 MiB each
 * (131 072 doubles, a heap object of its own in V8's large-object space,
 * which counts toward the old generation), all kept live. V8's default old
 * generation starts near 45 MB, so 160 of them take an isolate through
 * major collections; with HOP_WORKER_INITIAL_OLD_SPACE_MB (256) none is
 * needed.
 */
export function heapProbe(count: number): number[][] {
  const kept: number[][] = [];
  for (let i = 0; i < count; i++) kept.push(new Array<number>(131_072).fill(i + 0.5));
  return kept;
}

/** MiB the probe keeps live: well above V8's default start, well below the hop workers' 256 MiB. */
export const HEAP_PROBE_ARRAYS = 160;
