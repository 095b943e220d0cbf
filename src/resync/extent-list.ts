import { BlockrelayError } from '../retry/blockrelay-error';
import type { Extent } from '../targets/disk-target';

/** Most extents a resync work list holds; a longer list is coalesced (compare more, never less). */
export const MAX_WORK_EXTENTS = 1_048_576;

/** Extents from a dirty map, an extent file or an array: sync or async. */
export type ExtentSource = Iterable<Extent> | AsyncIterable<Extent>;

function checkExtent(e: Extent, sizeBytes: number, what: string): void {
  if (!Number.isSafeInteger(e.offset) || !Number.isSafeInteger(e.length) || e.offset < 0 || e.length < 0) {
    throw new BlockrelayError('BR_RESYNC_EXTENTS_INVALID', `${what}: extent at ${e.offset} length ${e.length} is not a whole non-negative byte range`, { details: { offset: e.offset, length: e.length } });
  }
  if (e.offset + e.length > sizeBytes) {
    throw new BlockrelayError('BR_RESYNC_EXTENTS_INVALID', `${what}: extent at ${e.offset} length ${e.length} reaches past the disk end ${sizeBytes}`, { details: { offset: e.offset, length: e.length, sizeBytes } });
  }
}

/**
 * Sorts, widens to whole `granularityBytes` blocks (clipped at the disk end)
 * and merges extents that touch or overlap. Empty extents disappear.
 */
export function mergeExtents(extents: readonly Extent[], granularityBytes: number, sizeBytes: number): Extent[] {
  const widened = extents
    .filter((e) => e.length > 0)
    .map((e) => {
      const start = Math.floor(e.offset / granularityBytes) * granularityBytes;
      const end = Math.min(sizeBytes, Math.ceil((e.offset + e.length) / granularityBytes) * granularityBytes);
      return { offset: start, end };
    })
    .sort((a, b) => a.offset - b.offset);
  const out: Extent[] = [];
  let cur: { offset: number; end: number } | undefined;
  for (const w of widened) {
    if (cur !== undefined && w.offset <= cur.end) cur.end = Math.max(cur.end, w.end);
    else {
      if (cur !== undefined) out.push({ offset: cur.offset, length: cur.end - cur.offset });
      cur = { ...w };
    }
  }
  if (cur !== undefined) out.push({ offset: cur.offset, length: cur.end - cur.offset });
  return out;
}

/**
 * Merges at ever coarser granularity until at most `maxExtents` remain. The
 * result covers every byte of the input, so a bounded list only ever makes
 * the resync compare more.
 */
export function boundExtents(extents: readonly Extent[], granularityBytes: number, sizeBytes: number, maxExtents: number): Extent[] {
  let g = granularityBytes;
  let out = mergeExtents(extents, g, sizeBytes);
  while (out.length > maxExtents) {
    g *= 2;
    out = mergeExtents(out, g, sizeBytes);
  }
  return out;
}

/**
 * Collects a work list: validates every extent against the disk size first
 * (nothing happens on bad input), then merges to whole blocks and bounds it.
 */
export async function collectWorkExtents(source: ExtentSource, blockSizeBytes: number, sizeBytes: number): Promise<Extent[]> {
  let pending: Extent[] = [];
  for await (const e of source as AsyncIterable<Extent>) {
    checkExtent(e, sizeBytes, 'work list');
    pending.push({ offset: e.offset, length: e.length });
    // Merge as we go so a huge dirty map never sits in memory unmerged.
    // (No push(...list) here: a spread of ~120 000 arguments overflows V8's stack.)
    if (pending.length >= MAX_WORK_EXTENTS) pending = boundExtents(pending, blockSizeBytes, sizeBytes, MAX_WORK_EXTENTS);
  }
  return boundExtents(pending, blockSizeBytes, sizeBytes, MAX_WORK_EXTENTS);
}

/**
 * Parses an extent file: a JSON array of `{"offset": N, "length": N}` (the
 * form `blockrelay` tools print), validated whole.
 */
export function parseExtentFile(text: string, path: string): Extent[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new BlockrelayError('BR_RESYNC_EXTENTS_INVALID', `${path} is not JSON: ${(err as Error).message}`, { cause: err, details: { path } });
  }
  if (!Array.isArray(parsed)) throw new BlockrelayError('BR_RESYNC_EXTENTS_INVALID', `${path} must hold a JSON array of {offset, length}`, { details: { path } });
  return parsed.map((item, i) => {
    const e = item as Partial<Extent> | null;
    if (e === null || typeof e !== 'object' || typeof e.offset !== 'number' || typeof e.length !== 'number') {
      throw new BlockrelayError('BR_RESYNC_EXTENTS_INVALID', `${path}: item ${i} is not {offset, length}`, { details: { path, index: i } });
    }
    return { offset: e.offset, length: e.length };
  });
}
