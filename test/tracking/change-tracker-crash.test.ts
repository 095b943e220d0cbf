import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { hrlChecksum } from '../../src/tracking/hrl-format';
import { HrlLogFile } from '../../src/tracking/hrl-reader';
import { REPO_ROOT } from '../helpers/cli';
import { useTempDirs } from '../helpers/tmp';
import { CRASH_DISK_BYTES, crashTrackerOptions, writeOf, type PlannedWrite } from './change-tracker-crash-plan';

const tempDir = useTempDirs();
// The tsx loader inside this one process: the tsx CLI would run the script in a
// grandchild that a SIGKILL of the CLI leaves running.
const TSX_LOADER = pathToFileURL(path.join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;
const CHILD = path.join(__dirname, 'change-tracker-crash-child.ts');
const ROUNDS = 5;
const INDEX_STRIDE = 1_000_000;
/** Writes issued after the last acknowledged one that may still be in a log (not acknowledged before the kill). */
const REPLACEMENT_LOOKAHEAD = 10_000;

/** Runs the child until it is ready, lets it work for `runMs`, then SIGKILLs it. */
function runAndKill(dir: string, first: number, seed: number, runMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', TSX_LOADER, CHILD, dir, String(first), String(seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    let killed = false;
    child.stderr.on('data', (d) => { stderr += d; });
    child.stdout.on('data', (d: Buffer) => {
      if (d.toString().includes('ready') && !killed) {
        killed = true;
        setTimeout(() => child.kill('SIGKILL'), runMs);
      }
    });
    const guard = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(guard);
      if (signal === 'SIGKILL' && killed) resolve();
      else reject(new Error(`child ended with ${code ?? signal} before the kill: ${stderr}`));
    });
  });
}

/**
 * Entry keys (offset:length:data checksum) of every log in `dirs`, logs
 * checked on the way, and each key's logs (by name: a log shipped just
 * before a kill is in both directories).
 */
async function loggedWrites(dirs: string[]): Promise<{ keys: Set<string>; logsOf: Map<string, Set<string>>; logs: { name: string; uniqueId: string; previousUniqueId: string }[] }> {
  const keys = new Set<string>();
  const logsOf = new Map<string, Set<string>>();
  const logs: { name: string; uniqueId: string; previousUniqueId: string }[] = [];
  for (const dir of dirs) {
    for (const name of fs.readdirSync(dir).filter((n) => n.endsWith('.hrl'))) {
      const log = await HrlLogFile.open(path.join(dir, name));
      try {
        const v = await log.verify({ diskSizeBytes: CRASH_DISK_BYTES });
        logs.push({ name, uniqueId: v.header.uniqueId, previousUniqueId: v.header.previousUniqueId });
        for await (const e of log.entries(v)) {
          const key = `${e.byteOffset}:${e.dataLength}:${e.dataChecksum}`;
          keys.add(key);
          const names = logsOf.get(key) ?? new Set<string>();
          names.add(name);
          logsOf.set(key, names);
        }
      } finally {
        await log.close();
      }
    }
  }
  logs.sort((a, b) => (a.name < b.name ? -1 : 1));
  // A log copied to shipped/ just before a kill, and so not yet acknowledged,
  // is in both places (it is shipped again; the receiver drops the repeat).
  const unique = logs.filter((l, i) => i === 0 || l.name !== logs[i - 1]!.name || l.uniqueId !== logs[i - 1]!.uniqueId);
  return { keys, logsOf, logs: unique };
}

function acknowledgedWrites(journal: string): number[] {
  if (!fs.existsSync(journal)) return [];
  const ends = new Map<number, number>();
  for (const line of fs.readFileSync(journal, 'utf8').split('\n')) {
    const m = /^(\d+) (\d+)$/.exec(line);
    if (m) ends.set(Number(m[1]), Math.max(ends.get(Number(m[1])) ?? 0, Number(m[2])));
  }
  const out: number[] = [];
  for (const [first, end] of ends) for (let i = first; i < end; i++) out.push(i);
  return out;
}

function covered(extents: { offset: number; length: number }[], offset: number, length: number): boolean {
  return extents.some((e) => e.offset <= offset && offset + length <= e.offset + e.length);
}

describe('ChangeTracker under SIGKILL', () => {
  it('keeps every flushed write in a log or a persisted resync extent, and never asks for a whole-disk resync', async () => {
    const dir = tempDir();
    const logsDir = path.join(dir, 'logs');
    let seed = 0x00c0ffee;
    let checkedWrites = 0;
    for (let round = 0; round < ROUNDS; round++) {
      seed = (seed * 1103515245 + 12345) >>> 0;
      await runAndKill(dir, (round + 1) * INDEX_STRIDE, seed, 300 + (seed % 1200));

      // Restart as the source would: recovery happens in open().
      const tracker = await ChangeTracker.open({ ...crashTrackerOptions(logsDir), persistIntervalMs: 0 });
      try {
        const status = tracker.status();
        expect(status.lastResyncReason).not.toBe('dirty-map-lost');
        expect(status.resyncBytes).toBeLessThan(CRASH_DISK_BYTES);
        // Only the resync extents survive shipping (acknowledge rebuilds the dirty
        // map from the remaining logs), so a write in no log must be in them.
        const resync = [...tracker.resyncExtents()];
        const { keys, logsOf, logs } = await loggedWrites([path.join(dir, 'shipped'), logsDir]);
        // Shipped and unshipped logs form one chain in name order.
        for (let i = 1; i < logs.length; i++) expect(logs[i]!.previousUniqueId, logs[i]!.name).toBe(logs[i - 1]!.uniqueId);
        const acked = acknowledgedWrites(path.join(dir, 'journal.txt'));
        // The open log coalesces: a later write of exactly the same extent
        // rewrites an earlier entry in place, so the earlier write's own key
        // is gone and the later one's stands for the extent's final state.
        // Only within one log: the later write must be in a log that also
        // holds a write recorded before this one (so the log was open when
        // this one was recorded); a later log's write of the extent does not
        // excuse a write its own log lost.
        const lastAcked = acked.length > 0 ? Math.max(...acked) : 0;
        const keyOf = (o: PlannedWrite): string => `${o.offset}:${o.length}:${hrlChecksum(o.data)}`;
        const replacedLater = (i: number, w: PlannedWrite): boolean => {
          const roundFirst = Math.floor(i / INDEX_STRIDE) * INDEX_STRIDE;
          for (let j = i + 1; j <= lastAcked + REPLACEMENT_LOOKAHEAD; j++) {
            const o = writeOf(j);
            if (o.offset !== w.offset || o.length !== w.length) continue;
            for (const log of logsOf.get(keyOf(o)) ?? []) {
              // A log never spans a restart: earlier writes of this round only.
              for (let k = i - 1; k >= roundFirst; k--) if (logsOf.get(keyOf(writeOf(k)))?.has(log)) return true;
            }
          }
          return false;
        };
        for (const i of acked) {
          const w = writeOf(i);
          const key = `${w.offset}:${w.length}:${hrlChecksum(w.data)}`;
          if (!keys.has(key) && !covered(resync, w.offset, w.length) && !replacedLater(i, w)) throw new Error(`round ${round}: flushed write ${i} [${w.offset}, +${w.length}) is in no log, no resync extent, and not replaced by a later write of the same extent`);
        }
        checkedWrites = acked.length;
      } finally {
        await tracker.close({ seal: false });
      }
    }
    expect(checkedWrites).toBeGreaterThan(20);
  }, 120_000);
});
