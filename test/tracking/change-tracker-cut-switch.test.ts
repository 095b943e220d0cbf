import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ChangeTracker } from '../../src/tracking/change-tracker';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { openDisk } from '../../src/targets/disk-spec';
import { pattern } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const DISK = 4 * 1024 * 1024;
const BLOCK = 4096;
/** Cuts tried before giving up on seeing a write pass one (each cut's seal is several syncs long). */
const ATTEMPTS = 20;

const opened: ChangeTracker[] = [];
afterEach(async () => {
  for (const t of opened.splice(0)) await t.close({ seal: false }).catch(() => undefined);
});

async function open(dir: string): Promise<ChangeTracker> {
  const t = await ChangeTracker.open({ dir, diskId: 'disk0', diskSizeBytes: DISK, persistIntervalMs: 0 });
  opened.push(t);
  return t;
}

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

/**
 * Cuts `t` and, once the next log has taken the active one's place (its
 * entry count drops to 0 while the cut is still running), records one write
 * at block `n`. Returns whether that write completed before the cut did.
 */
async function writeDuringCut(t: ChangeTracker, n: number): Promise<{ passed: boolean; wrote: boolean }> {
  let cutDone = false;
  const cut = ChangeTracker.cut([t]).then((s) => { cutDone = true; return s; });
  let write: Promise<void> | undefined;
  let writeDone = false;
  let writeDoneBeforeCut = false;
  while (!cutDone) {
    if (write === undefined && t.status().activeLogEntries === 0) {
      write = t.recordWrite(n * BLOCK, pattern(n, BLOCK)).then(() => {
        writeDone = true;
        writeDoneBeforeCut = !cutDone;
      });
    }
    await turn();
  }
  await cut;
  await write;
  return { passed: writeDone && writeDoneBeforeCut, wrote: write !== undefined };
}

describe('ChangeTracker cut with the next log made ahead', () => {
  it('lets a write complete into the next log while the cut still seals the last one, and keeps both logs exact', async () => {
    const dir = tempDir();
    const t = await open(dir);
    let n = 0;
    let passedAt: number | undefined;
    const written: number[] = [];
    for (let attempt = 0; attempt < ATTEMPTS && passedAt === undefined; attempt++) {
      // One write before each cut, so every cut seals something.
      await t.recordWrite(n * BLOCK, pattern(n, BLOCK));
      written.push(n++);
      const { passed, wrote } = await writeDuringCut(t, n);
      if (wrote) written.push(n++);
      if (passed) passedAt = n - 1;
    }
    expect(passedAt, `no write completed during any of ${ATTEMPTS} cuts`).toBeDefined();
    // The write that passed is in the log after the cut, not in the one it sealed.
    const last = await t.rotate();
    const logs = t.sealedLogs();
    expect(last!.entryCount).toBe(1);
    expect(logs.at(-2)!.entryCount).toBe(1);
    // Every log follows the one before it, the spare taken at each cut included.
    for (let i = 1; i < logs.length; i++) expect(logs[i]!.previousUniqueId).toBe(logs[i - 1]!.uniqueId);
    // Applied in order, the logs give every write.
    const img = path.join(dir, 'replica.img');
    const target = await openDisk(`raw:${img}`, { create: { sizeBytes: DISK } });
    await applyHrlLogs(target, logs.map((l) => l.path)).finally(() => target.close());
    const replica = fs.readFileSync(img);
    for (const w of written) expect(replica.subarray(w * BLOCK, (w + 1) * BLOCK).equals(pattern(w, BLOCK)), `block ${w}`).toBe(true);
  });

  it('leaves no spare behind a clean close, and a spare left by a crash is deleted at open without a resync', async () => {
    const dir = tempDir();
    const t = await open(dir);
    await t.recordWrite(0, pattern(1, BLOCK));
    await t.rotate();
    // The spare for the next cut is made in the background: wait for it.
    for (let i = 0; i < 500 && !fs.readdirSync(dir).some((f) => f.endsWith('.hrl.spare')); i++) await new Promise((r) => setTimeout(r, 10));
    const spare = fs.readdirSync(dir).find((f) => f.endsWith('.hrl.spare'));
    expect(spare).toBeDefined();
    // A crash keeps the spare: copy the directory as it is now.
    const crashed = tempDir();
    for (const f of fs.readdirSync(dir)) fs.copyFileSync(path.join(dir, f), path.join(crashed, f));
    await t.close();
    opened.splice(opened.indexOf(t), 1);
    expect(fs.readdirSync(dir).filter((f) => f.endsWith('.hrl.spare'))).toEqual([]);
    const again = await open(crashed);
    expect(fs.readdirSync(crashed)).not.toContain(spare);
    expect(again.status().resyncRequired).toBe(false);
    expect(again.sealedLogs().map((l) => l.entryCount)).toEqual([1, 0]);
  });

  it("deletes at open only its own spares, not those of a disk whose id starts with its own and '.next-'", async () => {
    const dir = tempDir();
    // A spare another disk would leave: `disk0.next-a` is a valid disk id sharing the directory.
    const other = 'disk0.next-a.next-1.hrl.spare';
    const mine = 'disk0.next-7.hrl.spare';
    fs.writeFileSync(path.join(dir, other), '');
    fs.writeFileSync(path.join(dir, mine), '');
    await open(dir);
    const names = fs.readdirSync(dir);
    expect(names).toContain(other);
    expect(names).not.toContain(mine);
  });
});
