import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { AppTagger } from '../../src/daemon/app-tagger';
import { withQuiesce } from '../../src/daemon/quiesce-hook';
import { SimulatedClock } from '../../src/platform/clock';
import { useTempDirs } from '../helpers/tmp';

describe('quiesce hook', () => {
  const tmp = useTempDirs();

  function hookScript(dir: string, body = ''): string {
    const script = path.join(dir, 'hook.sh');
    fs.writeFileSync(script, `#!/bin/sh\necho "$1 $BLOCKRELAY_DISKS $BLOCKRELAY_TAG" >> ${path.join(dir, 'phases')}\n${body}\n`, { mode: 0o755 });
    return script;
  }

  it('freezes, cuts, then thaws, telling the hook the disks and the tag', async () => {
    const dir = tmp();
    const order: string[] = [];
    const result = await withQuiesce({ command: hookScript(dir) }, { BLOCKRELAY_DISKS: 'disk0,disk1', BLOCKRELAY_TAG: 'nightly' }, async () => {
      order.push(fs.readFileSync(path.join(dir, 'phases'), 'utf8'));
      return 'cut';
    });
    expect(result).toBe('cut');
    expect(order).toEqual(['freeze disk0,disk1 nightly\n']);
    expect(fs.readFileSync(path.join(dir, 'phases'), 'utf8')).toBe('freeze disk0,disk1 nightly\nthaw disk0,disk1 nightly\n');
  });

  it('still thaws when the cut fails', async () => {
    const dir = tmp();
    await expect(withQuiesce({ command: hookScript(dir) }, {}, async () => { throw new Error('cut failed'); })).rejects.toThrow('cut failed');
    expect(fs.readFileSync(path.join(dir, 'phases'), 'utf8')).toMatch(/^freeze.*\nthaw/);
  });

  it('refuses with BR_QUIESCE_FAILED when freeze fails, and never cuts', async () => {
    const dir = tmp();
    let cut = false;
    await expect(withQuiesce({ command: hookScript(dir, '[ "$1" = freeze ] && { echo db busy >&2; exit 3; }') }, {}, async () => { cut = true; })).rejects.toMatchObject({ code: 'BR_QUIESCE_FAILED', message: expect.stringContaining('db busy') });
    expect(cut).toBe(false);
  });

  it('thaws after a freeze that failed part-way, and reports the freeze error', async () => {
    const dir = tmp();
    await expect(withQuiesce({ command: hookScript(dir, '[ "$1" = freeze ] && { echo second fs busy >&2; exit 3; }') }, {}, async () => 1)).rejects.toMatchObject({ code: 'BR_QUIESCE_FAILED', message: expect.stringContaining('second fs busy') });
    expect(fs.readFileSync(path.join(dir, 'phases'), 'utf8')).toMatch(/^freeze.*\nthaw/);
  });

  it('bounds a hook that hangs, kills what it started, and thaws', async () => {
    const dir = tmp();
    const late = path.join(dir, 'late');
    // The freeze's child outlives its shell unless the whole group is killed.
    const body = `[ "$1" = freeze ] && { (sleep 1; touch ${late}) & wait; }`;
    await expect(withQuiesce({ command: hookScript(dir, body), freezeTimeoutMs: 300 }, {}, async () => 1)).rejects.toMatchObject({ code: 'BR_QUIESCE_FAILED', message: expect.stringContaining('did not finish within 300 ms') });
    expect(fs.readFileSync(path.join(dir, 'phases'), 'utf8')).toMatch(/^freeze.*\nthaw/);
    await new Promise((resolve) => setTimeout(resolve, 1500));
    expect(fs.existsSync(late)).toBe(false);
  });
});

describe('AppTagger', () => {
  it('tags on demand and on schedule, one tag at a time', async () => {
    const clock = new SimulatedClock(0);
    const cuts: Array<{ disks: string[]; tag: string; at: number }> = [];
    let inCut = 0;
    const tagger = new AppTagger({
      clock,
      hook: undefined,
      intervalMs: 60 * 60_000,
      select: (r) => (r.diskId ? [r.diskId] : ['disk0', 'disk1']),
      cut: async (disks, tag) => {
        expect(inCut).toBe(0);
        inCut++;
        await Promise.resolve();
        inCut--;
        cuts.push({ disks, tag, at: clock.now() });
        return { cutId: `c${cuts.length}`, cutTimeMs: clock.now() };
      },
    });
    tagger.start();
    const [a, b] = await Promise.all([tagger.tag({ diskId: 'disk0', name: 'before-upgrade' }), tagger.tag({ name: 'all' })]);
    expect(a).toMatchObject({ name: 'before-upgrade', disks: ['disk0'] });
    expect(b).toMatchObject({ name: 'all', disks: ['disk0', 'disk1'] });
    await clock.advance(2 * 60 * 60_000 + 1);
    expect(cuts.filter((c) => c.tag === 'scheduled').map((c) => c.at)).toEqual([3_600_000, 7_200_000]);
    tagger.stop();
    expect(clock.pendingTimers()).toBe(0);
    await expect(tagger.tag({ name: 'x'.repeat(300) })).rejects.toMatchObject({ code: 'BR_USAGE' });
  });

  it('arms no new schedule when a scheduled tag in flight settles after stop', async () => {
    const clock = new SimulatedClock(0);
    let release!: () => void;
    let cuts = 0;
    const tagger = new AppTagger({
      clock,
      hook: undefined,
      intervalMs: 60 * 60_000,
      select: () => ['disk0'],
      cut: async () => {
        cuts++;
        await new Promise<void>((resolve) => { release = resolve; });
        return { cutId: `c${cuts}`, cutTimeMs: clock.now() };
      },
    });
    tagger.start();
    await clock.advance(60 * 60_000);
    expect(cuts).toBe(1);
    tagger.stop();
    release();
    await new Promise((resolve) => setTimeout(resolve, 10));
    expect(clock.pendingTimers()).toBe(0);
    await clock.advance(3 * 60 * 60_000);
    expect(cuts).toBe(1);
  });
});
