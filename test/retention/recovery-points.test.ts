import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { appendToState, encodeCatalogLine, parseCatalog, PointCatalog, pointRecordFromEnvelope, resolvePoint, type CatalogRecord, type RecoveryPoint } from '../../src/retention/recovery-points';
import { CATALOG_JSON_OFFSET } from '../../src/retention/retention-format';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { useTempDirs } from '../helpers/tmp';
import { prng } from './retention-fixture';

const T0 = Date.UTC(2026, 10, 20, 12, 0, 0);

function point(seq: number, extra: Partial<CatalogRecord & { t: 'point' }> = {}): CatalogRecord {
  return { v: 1, t: 'point', seq, timeMs: T0 + seq * 60_000, kind: 'crash', cutId: `c${seq}`, ...extra } as CatalogRecord;
}

function catalogBytes(records: CatalogRecord[]): Buffer {
  return Buffer.concat(records.map(encodeCatalogLine));
}

describe('recovery point catalog', () => {
  const tmp = useTempDirs();

  it('encodes a line as CRC-32, a space and the JSON record (reference bytes from Python zlib.crc32)', () => {
    const line = encodeCatalogLine({ v: 1, t: 'applied', seq: 7 });
    expect(line.toString('latin1')).toBe('65fb0891 {"v":1,"t":"applied","seq":7}\n');
    expect(CATALOG_JSON_OFFSET).toBe(9);
  });

  it('makes points from envelopes: crash, app with a name, app without one', () => {
    const env = { diskId: 'd', seq: 3, xxhash64: '0'.repeat(16), logLength: 1, cutTimeMs: T0, cutId: 'k', group: 'G', appTag: undefined, diskSizeBytes: 512 };
    expect(pointRecordFromEnvelope(env)).toEqual({ v: 1, t: 'point', seq: 3, timeMs: T0, kind: 'crash', cutId: 'k', group: 'G' });
    expect(pointRecordFromEnvelope({ ...env, appTag: 'sql' })).toMatchObject({ kind: 'app', name: 'sql' });
    expect(pointRecordFromEnvelope({ ...env, appTag: '' })).not.toHaveProperty('name');
  });

  it('counts a point as applied once marked, followed by a later point, or confirmed by the ledger', () => {
    const bytes = catalogBytes([point(1), { v: 1, t: 'applied', seq: 1 }, point(2), point(3)]);
    const c = parseCatalog(bytes, 'd', 'f');
    expect(c.points.map((p) => p.id)).toEqual(['d-1', 'd-2']);
    expect(c.pending?.id).toBe('d-3');
    expect(parseCatalog(bytes, 'd', 'f', 3).points.map((p) => p.seq)).toEqual([1, 2, 3]);
    // A point recorded twice (a re-run after a crash) counts once.
    expect(parseCatalog(catalogBytes([point(1), point(1), point(2)]), 'd', 'f').points.map((p) => p.seq)).toEqual([1]);
  });

  it('keeps the same state appending in memory as reading the file back (seeded sequences)', () => {
    const rand = prng(404);
    for (let run = 0; run < 300; run++) {
      let state: { points: RecoveryPoint[]; pending: RecoveryPoint | undefined } = { points: [], pending: undefined };
      const records: CatalogRecord[] = [];
      let seq = 0;
      for (let i = 0; i < 20; i++) {
        const r = rand();
        // The hooks' patterns: a point, its applied record, a re-run duplicate, a snapshot point (applied at once).
        let rec: CatalogRecord;
        if (r < 0.4) rec = point(++seq);
        else if (r < 0.7) rec = { v: 1, t: 'applied', seq };
        else if (r < 0.8) rec = point(Math.max(seq, 1));
        else rec = point(++seq, { snapshot: `blob:http://h/a/c/b?snapshot=${seq}`, applied: true });
        records.push(rec);
        state = appendToState('d', state, rec);
        const parsed = parseCatalog(catalogBytes(records), 'd', 'f');
        expect(state.points).toEqual(parsed.points);
        expect(state.pending).toEqual(parsed.pending);
      }
    }
  });

  it('ignores a torn last line, cuts it off before the next append, and names the offset of damage before the end', async () => {
    const dir = tmp();
    const file = path.join(dir, 'points.log');
    const good = catalogBytes([point(1), { v: 1, t: 'applied', seq: 1 }, point(2)]);
    const torn = encodeCatalogLine(point(3)).subarray(0, 20);
    fs.writeFileSync(file, Buffer.concat([good, torn]));
    const catalog = new PointCatalog(file, 'd');
    const read = await catalog.read();
    expect(read.validBytes).toBe(good.length);
    expect(read.pending?.seq).toBe(2);
    await catalog.append([{ v: 1, t: 'applied', seq: 2 }], read.validBytes);
    expect((await catalog.read()).points.map((p) => p.seq)).toEqual([1, 2]);
    expect(fs.readFileSync(file).subarray(0, good.length).equals(good)).toBe(true);

    const damaged = fs.readFileSync(file);
    const secondLine = damaged.indexOf(0x0a) + 1;
    damaged[secondLine + CATALOG_JSON_OFFSET + 3] ^= 0x01;
    fs.writeFileSync(file, damaged);
    await expect(catalog.read()).rejects.toMatchObject({ code: 'BR_RETENTION_CATALOG_CORRUPT', details: { file, offset: secondLine } });
  });

  it('salvages the intact lines around a damaged one when asked (the master target keeps replicating)', () => {
    const lines = [point(1), { v: 1, t: 'applied', seq: 1 } as CatalogRecord, point(2), { v: 1, t: 'applied', seq: 2 } as CatalogRecord, point(3)].map(encodeCatalogLine);
    lines[2]![CATALOG_JSON_OFFSET + 2] ^= 0x10; // point 2's record
    const bytes = Buffer.concat(lines);
    expect(() => parseCatalog(bytes, 'd', 'f')).toThrow(expect.objectContaining({ code: 'BR_RETENTION_CATALOG_CORRUPT' }));
    const salvaged = parseCatalog(bytes, 'd', 'f', null, { skipDamaged: true });
    expect(salvaged.points.map((p) => p.seq)).toEqual([1]);
    expect(salvaged.pending?.seq).toBe(3);
    expect(salvaged.damagedLines).toBe(1);
    expect(parseCatalog(bytes, 'd', 'f', 3, { skipDamaged: true }).points.map((p) => p.seq)).toEqual([1, 3]);
  });

  it('never fails other than with BR_RETENTION_CATALOG_CORRUPT on damaged catalogs (seeded fuzz)', () => {
    const rand = prng(31337);
    const base = catalogBytes([point(1, { name: 'n', kind: 'app' }), { v: 1, t: 'applied', seq: 1 }, point(2, { group: 'G' }), point(3)]);
    const started = Date.now();
    let corrupt = 0;
    for (let i = 0; i < 5000 && Date.now() - started < 5000; i++) {
      const bytes = Buffer.from(base);
      const flips = 1 + Math.floor(rand() * 4);
      for (let f = 0; f < flips; f++) bytes[Math.floor(rand() * bytes.length)] = Math.floor(rand() * 256);
      const cut = rand() < 0.3 ? Math.floor(rand() * bytes.length) : bytes.length;
      // Salvaging never throws on the same bytes.
      expect(() => parseCatalog(bytes.subarray(0, cut), 'd', 'f', null, { skipDamaged: true })).not.toThrow();
      try {
        const c = parseCatalog(bytes.subarray(0, cut), 'd', 'f');
        for (const p of c.points) expect(Number.isSafeInteger(p.seq) && Number.isSafeInteger(p.timeMs)).toBe(true);
      } catch (err) {
        expect(err).toBeInstanceOf(BlockrelayError);
        expect((err as BlockrelayError).code).toBe('BR_RETENTION_CATALOG_CORRUPT');
        corrupt++;
      }
    }
    expect(corrupt).toBeGreaterThan(0);
  });

  it('resolves keywords, ISO times, point ids and cut ids, and refuses the rest with codes', () => {
    const pts: RecoveryPoint[] = [1, 2, 3, 4].map((seq) => ({ id: `d-${seq}`, seq, timeMs: T0 + seq * 600_000, kind: seq === 2 ? 'app' : 'crash', cutId: `cut${seq}`, ...(seq === 2 ? { name: 'x' } : {}) }));
    const ctx = { diskId: 'd', nowMs: T0 + 3_600_000, windowMs: 24 * 3_600_000 };
    expect(resolvePoint(pts, 'latest', ctx).seq).toBe(4);
    expect(resolvePoint(pts, 'latest-processed', ctx).seq).toBe(4);
    expect(resolvePoint(pts, 'latest-app', ctx).seq).toBe(2);
    expect(resolvePoint(pts, new Date(T0 + 25 * 60_000).toISOString(), ctx).seq).toBe(2);
    expect(resolvePoint(pts, new Date(T0 + 30 * 60_000).toISOString(), ctx).seq).toBe(3);
    expect(resolvePoint(pts, '2026-11-20T12:35:00+00:00', ctx).seq).toBe(3);
    expect(resolvePoint(pts, 'd-1', ctx).seq).toBe(1);
    expect(resolvePoint(pts, 'cut3', ctx).seq).toBe(3);
    expect(() => resolvePoint([], 'latest', ctx)).toThrow(expect.objectContaining({ code: 'BR_POINT_NONE' }));
    expect(() => resolvePoint(pts.filter((p) => p.kind === 'crash'), 'latest-app', ctx)).toThrow(expect.objectContaining({ code: 'BR_POINT_UNKNOWN' }));
    expect(() => resolvePoint(pts, 'd-9', ctx)).toThrow(expect.objectContaining({ code: 'BR_POINT_UNKNOWN' }));
    expect(() => resolvePoint(pts, new Date(T0 + 60_000).toISOString(), ctx)).toThrow(expect.objectContaining({ code: 'BR_POINT_UNKNOWN' }));
    expect(() => resolvePoint(pts, new Date(T0 - 24 * 3_600_000).toISOString(), ctx)).toThrow(expect.objectContaining({ code: 'BR_POINT_BEFORE_WINDOW' }));
    expect(() => resolvePoint(pts, '2026-13-45T99:00Z', ctx)).toThrow(expect.objectContaining({ code: 'BR_POINT_UNKNOWN' }));
  });
});
