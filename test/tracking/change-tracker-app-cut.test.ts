import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import type { HrlWriterFile } from '../../src/tracking/hrl-writer';
import { parseSidecar } from '../../src/tracking/tracker-files';
import { useTempDirs } from '../helpers/tmp';
import { pattern } from '../helpers/prng';

const SIZE = 4 * 1024 * 1024;
const CHUNK = 64 * 1024;

/**
 * Opens log files for a tracker; once `gate` is set, the next open waits for
 * it and then fails with EIO when it resolves false (a failing log volume).
 */
class GatedLogs {
  gate: Promise<boolean> | undefined;
  reached = false;
  readonly open = async (p: string): Promise<HrlWriterFile> => {
    const gate = this.gate;
    if (gate !== undefined) {
      this.gate = undefined;
      this.reached = true;
      if (!(await gate)) throw Object.assign(new Error('EIO: i/o error, open'), { code: 'EIO', errno: -5 });
    }
    const fh = await fsp.open(p, 'wx+');
    return { write: (b, o, l, pos) => fh.write(b, o, l, pos), writev: (bs, pos) => fh.writev(bs, pos), datasync: () => fh.datasync(), close: () => fh.close() };
  };
}

async function until(what: string, done: () => boolean): Promise<void> {
  for (let i = 0; i < 400 && !done(); i++) await new Promise((r) => setTimeout(r, 5));
  if (!done()) throw new Error(`timed out waiting for ${what}`);
}

function sidecarTag(log: { sidecarPath: string }): string | undefined {
  return parseSidecar(JSON.parse(fs.readFileSync(log.sidecarPath, 'utf8')), log.sidecarPath).appTag;
}

/**
 * Review s6 (V4, C): a group's app-consistent cut refused for one disk could
 * leave a log carrying the tag on another member. The refusal is now all or
 * nothing.
 */
describe('ChangeTracker.cutAppConsistent of several disks', () => {
  const tmp = useTempDirs();

  it('refuses without sealing anything when a member owes a resync by the time every lock is held', async () => {
    const dir = tmp();
    const a = await ChangeTracker.open({ dir, diskId: 'a', diskSizeBytes: SIZE, overflowRatio: 0.25, persistIntervalMs: 0 });
    const b = await ChangeTracker.open({ dir, diskId: 'b', diskSizeBytes: SIZE, overflowRatio: 0.25, persistIntervalMs: 0 });
    try {
      await a.recordWrite(0, pattern(1, CHUNK));
      await b.recordWrite(0, pattern(2, CHUNK));
      // Queued on b's lock before the cut: a trim of half the disk folds b into its resync map.
      const trim = b.recordZeroes(0, SIZE / 2);
      const cut = ChangeTracker.cutAppConsistent([a, b], 'quiesced');
      await trim;
      await expect(cut).rejects.toMatchObject({ code: 'BR_TAG_RESYNC_PENDING', details: { disk: 'b' } });
      expect(b.status()).toMatchObject({ mode: 'dirty-only', resyncRequired: true });
      // a sealed nothing: its write is still in its active log.
      expect(a.status()).toMatchObject({ sealedLogs: 0, activeLogEntries: 1 });
      expect(fs.readdirSync(dir).filter((n) => n.endsWith('.hrl.json'))).toEqual([]);
    } finally {
      await a.close();
      await b.close();
    }
  });

  /**
   * Disks a (one write) and b (a gated log volume) in one directory; an
   * app-consistent cut of both is started and has sealed both logs, b
   * waiting to open its next one. `openB` lets that open go on (true) or
   * fail with EIO (false); `end` lets the cut end (also after a failed
   * assertion, or the closes would wait for its locks) and closes both.
   */
  async function cutWaitingOnB(dir: string) {
    const logsB = new GatedLogs();
    const a = await ChangeTracker.open({ dir, diskId: 'a', diskSizeBytes: SIZE, persistIntervalMs: 0 });
    const b = await ChangeTracker.open({ dir, diskId: 'b', diskSizeBytes: SIZE, persistIntervalMs: 0, openLogFile: logsB.open });
    let openB: (ok: boolean) => void = () => undefined;
    logsB.gate = new Promise<boolean>((r) => { openB = r; });
    await a.recordWrite(0, pattern(1, CHUNK));
    const cut = ChangeTracker.cutAppConsistent([a, b], 'quiesced');
    const end = async (): Promise<void> => {
      openB(false);
      await cut.catch(() => undefined);
      await a.close();
      await b.close();
    };
    try {
      await until('both seals', () => logsB.reached && a.status().sealedLogs === 1);
    } catch (err) {
      await end();
      throw err;
    }
    return { a, b, cut, openB, end };
  }

  it('keeps no log with the tag when a member fails during the seal, and ships none of them before the outcome is known', async () => {
    const dir = tmp();
    const { a, b, cut, openB, end } = await cutWaitingOnB(dir);
    try {
      // a has sealed its log with the tag: no shipper sees it yet, nor b's.
      expect(a.sealedLogs()).toEqual([]);
      expect(b.sealedLogs()).toEqual([]);
      openB(false);
      await expect(cut).rejects.toMatchObject({ code: 'BR_TAG_RESYNC_PENDING', details: { disk: 'b' } });
      // b folded (its sealed log with it); a's log is an ordinary one, in memory and on disk.
      expect(b.status()).toMatchObject({ mode: 'dirty-only', sealedLogs: 0 });
      const [log] = a.sealedLogs();
      expect(log).toBeDefined();
      expect(log!.appTag).toBeUndefined();
      expect(sidecarTag(log!)).toBeUndefined();
      // Reopened, the log is still untagged.
      await a.close();
      const again = await ChangeTracker.open({ dir, diskId: 'a', diskSizeBytes: SIZE, persistIntervalMs: 0 });
      expect(again.sealedLogs().map((l) => l.appTag)).toEqual([undefined, undefined]);
      await again.close();
    } finally {
      await end();
    }
  });

  it('hands every member its tagged log once all seals succeeded', async () => {
    const { a, b, cut, openB, end } = await cutWaitingOnB(tmp());
    try {
      expect(a.sealedLogs()).toEqual([]);
      openB(true);
      const taken = await cut;
      for (const t of [a, b]) {
        const [log] = t.sealedLogs();
        expect(log).toMatchObject({ cutId: taken.cutId, appTag: 'quiesced' });
        expect(sidecarTag(log!)).toBe('quiesced');
      }
    } finally {
      await end();
    }
  });
});
