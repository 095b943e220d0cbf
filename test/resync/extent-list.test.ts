import { describe, expect, it } from 'vitest';
import { boundExtents, collectWorkExtents, mergeExtents, parseExtentFile } from '../../src/resync/extent-list';

describe('resync extent lists', () => {
  it('widens extents to whole blocks, clips at the disk end and merges what touches', () => {
    expect(mergeExtents([{ offset: 5000, length: 10 }, { offset: 0, length: 1 }, { offset: 4096, length: 1 }, { offset: 20_000, length: 0 }], 4096, 10_000)).toEqual([
      { offset: 0, length: 8192 },
    ]);
    expect(mergeExtents([{ offset: 9000, length: 1000 }], 4096, 10_000)).toEqual([{ offset: 8192, length: 1808 }]);
  });

  it('bounds a fragmented list by coarsening, never dropping a byte', () => {
    const many = Array.from({ length: 100 }, (_, i) => ({ offset: i * 8192, length: 512 }));
    const bounded = boundExtents(many, 4096, 1 << 20, 10);
    expect(bounded.length).toBeLessThanOrEqual(10);
    for (const e of many) expect(bounded.some((b) => b.offset <= e.offset && e.offset + e.length <= b.offset + b.length)).toBe(true);
  });

  it('refuses a work list reaching past the disk before using any of it', async () => {
    await expect(collectWorkExtents([{ offset: 0, length: 4096 }, { offset: 8192, length: 4096 }], 4096, 10_000)).rejects.toMatchObject({ code: 'BR_RESYNC_EXTENTS_INVALID' });
    await expect(collectWorkExtents([{ offset: -1, length: 1 }], 4096, 10_000)).rejects.toMatchObject({ code: 'BR_RESYNC_EXTENTS_INVALID' });
    async function* dirty() {
      yield { offset: 4096, length: 100 };
      yield { offset: 0, length: 10 };
    }
    expect(await collectWorkExtents(dirty(), 4096, 1 << 20)).toEqual([{ offset: 0, length: 8192 }]);
  });

  it('collects a fragmented dirty map of 300 000 extents (a failback after scattered writes)', async () => {
    const count = 300_000;
    function* scattered() {
      for (let i = 0; i < count; i++) yield { offset: i * 8192, length: 4096 };
    }
    const work = await collectWorkExtents(scattered(), 4096, count * 8192);
    expect(work.length).toBe(count);
    expect(work[count - 1]).toEqual({ offset: (count - 1) * 8192, length: 4096 });
  });

  it('parses an extent file and names the bad item', () => {
    expect(parseExtentFile('[{"offset":0,"length":4096}]', 'x.json')).toEqual([{ offset: 0, length: 4096 }]);
    expect(() => parseExtentFile('{"offset":0}', 'x.json')).toThrow(/JSON array/);
    expect(() => parseExtentFile('[{"offset":0,"length":1},{"offset":"a"}]', 'x.json')).toThrow(/item 1/);
    expect(() => parseExtentFile('[', 'x.json')).toThrow(/not JSON/);
  });
});
