import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { isBlockrelayError } from '../../src/retry/blockrelay-error';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { useTempDirs } from '../helpers/tmp';
import { hrlLayout, setStructureByte, type HrlLayout } from './hrl-damage';
import { buildIndependentLog } from './hrl-independent-writer';

const tempDir = useTempDirs();
const MS = 256;
const DISK_BYTES = 256 * 1024;
const MAX_ITERATIONS = 6000;
const TIME_BUDGET_MS = 18_000;

/** xorshift32: the fuzz run is reproducible from its seed. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

async function baseLogs(dir: string): Promise<Buffer[]> {
  const file = path.join(dir, 'base.hrl');
  const w = await HrlWriter.create(file, { metadataSizeBytes: MS, stagingBytes: 2048 });
  for (let i = 0; i < 20; i++) {
    await w.append((i * 7919) % (DISK_BYTES - 4096), Buffer.alloc(64 + i * 37, i + 1));
    if (i % 6 === 5) await w.flush();
  }
  await w.seal();
  const ours = fs.readFileSync(file);
  const theirs = Buffer.from(buildIndependentLog({
    metadataSize: MS,
    blocks: [[], [{ offset: 0, data: new Uint8Array(700).fill(3) }, { offset: 9000, data: new Uint8Array(300).fill(4) }], [{ offset: 100, data: new Uint8Array(1000).fill(5) }]],
  }));
  return [ours, theirs];
}

function mutate(base: Buffer, layout: HrlLayout, other: Buffer, rnd: () => number): Buffer {
  const pick = (n: number): number => Math.floor(rnd() * n);
  let log = Buffer.from(base);
  const kind = pick(6);
  if (kind === 0) {
    for (let i = 0, n = 1 + pick(4); i < n; i++) {
      const at = rnd() < 0.3 ? pick(log.length) : 4096 + pick(log.length - 4096);
      log[at] ^= 1 << pick(8);
    }
  } else if (kind === 1) {
    log = log.subarray(0, pick(log.length));
  } else if (kind === 2) {
    const from = pick(other.length);
    const len = 1 + pick(Math.min(512, other.length - from));
    const to = pick(log.length);
    log = Buffer.concat([log.subarray(0, to), other.subarray(from, from + len), log.subarray(rnd() < 0.5 ? to : to + len)]);
  } else if (kind === 3) {
    log = Buffer.concat([log, Buffer.from(Array.from({ length: 1 + pick(600) }, () => pick(256)))]);
  } else {
    // Structure-aware: change a field of the header, a block or an entry and
    // fix that structure's checksum, so the damage reaches the deeper checks.
    const all = [0, ...layout.blocks, ...layout.entries];
    const at = all[pick(all.length)]!;
    const field = pick(at === 0 ? 128 : 32);
    setStructureByte(log, layout, at, field, rnd() < 0.3 ? 0xff : pick(256));
  }
  return log;
}

describe('hrl reader and apply under fuzzing', () => {
  it('never crashes, always names a BR_HRL code with an offset, and never applies any part of a batch holding a damaged log', async () => {
    const dir = tempDir();
    const logs = await baseLogs(dir);
    const layouts = logs.map((l) => hrlLayout(l, MS));
    const goodFile = path.join(dir, 'good.hrl');
    fs.writeFileSync(goodFile, logs[1]!);
    const img = path.join(dir, 'disk.img');
    const baseline = Buffer.alloc(DISK_BYTES, 0x77);
    fs.writeFileSync(img, baseline);
    const target = await openDisk(`raw:${img}`);
    const rnd = prng(0x5eed_0003);
    const started = Date.now();
    const seen = new Map<string, number>();
    let iterations = 0;
    try {
      for (; iterations < MAX_ITERATIONS && Date.now() - started < TIME_BUDGET_MS; iterations++) {
        const which = Math.floor(rnd() * logs.length);
        const mutated = mutate(logs[which]!, layouts[which]!, logs[1 - which]!, rnd);
        const file = path.join(dir, 'm.hrl');
        fs.writeFileSync(file, mutated);
        let outcome: string;
        // Half the time the damaged log comes second, after a valid one: still nothing may be written.
        const files = rnd() < 0.5 ? [file] : [goodFile, file];
        try {
          await applyHrlLogs(target, files, { checkChain: false });
          outcome = 'applied';
          fs.writeFileSync(img, baseline);
        } catch (err) {
          if (!isBlockrelayError(err) || !err.code.startsWith('BR_HRL_') || typeof err.details.offset !== 'number') {
            throw new Error(`iteration ${iterations}: uncoded failure ${String((err as Error)?.stack ?? err)}`);
          }
          outcome = err.code;
          const now = fs.readFileSync(img);
          if (!now.equals(baseline)) throw new Error(`iteration ${iterations}: target changed although ${err.code} was raised`);
        }
        seen.set(outcome, (seen.get(outcome) ?? 0) + 1);
      }
    } finally {
      await target.close();
    }
    expect(iterations).toBeGreaterThan(500);
    // The mutations must reach the deep checks, not only the header.
    for (const code of ['BR_HRL_TRUNCATED', 'BR_HRL_HEADER_CHECKSUM', 'BR_HRL_METADATA_CHECKSUM', 'BR_HRL_ENTRY_CHECKSUM', 'BR_HRL_DATA_CHECKSUM', 'BR_HRL_PAYLOAD_MISFIT']) {
      expect(seen.get(code) ?? 0, `${code} in ${JSON.stringify([...seen])}`).toBeGreaterThan(0);
    }
  }, 60_000);
});
