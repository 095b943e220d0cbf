import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { nativeFileExtents } from '../../src/platform/file-extents';
import { TARGET_POOL_JOBS } from '../../src/platform/pool-job-limit';
import { FileSpan } from '../../src/targets/file-span';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();
const SIZE_BYTES = 4 * 1024 * 1024;
const RUN_BYTES = 4096;

/**
 * A file whose writes hang, as on a device that stopped answering, until
 * `answer()`: each write really goes to the file afterwards. Counts how many
 * writes were on the (would-be) pool at once.
 */
async function hangingFile(file: string): Promise<{ handle: fsp.FileHandle; answer: () => void; maxInFlight: () => number; inFlight: () => number }> {
  await fsp.writeFile(file, Buffer.alloc(0));
  await fsp.truncate(file, SIZE_BYTES);
  const handle = await fsp.open(file, 'r+');
  const realWrite = handle.write.bind(handle) as unknown as (...args: unknown[]) => Promise<unknown>;
  let answer!: () => void;
  const answered = new Promise<void>((r) => { answer = r; });
  let inFlight = 0;
  let maxInFlight = 0;
  (handle as unknown as { write: (...args: unknown[]) => Promise<unknown> }).write = async (...args: unknown[]) => {
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    try {
      await answered;
      return await realWrite(...args);
    } finally {
      inFlight--;
    }
  };
  return { handle, answer, maxInFlight: () => maxInFlight, inFlight: () => inFlight };
}

function span(file: string, handle: fsp.FileHandle): FileSpan {
  return new FileSpan({ path: file, handle, fileOffsetBytes: 0, sizeBytes: SIZE_BYTES, regularFile: true, punchHoles: false, ownsFileTail: true, ops: nativeFileExtents });
}

describe('FileSpan: thread-pool jobs of one file', () => {
  it(`a hung file holds at most ${TARGET_POOL_JOBS} pool jobs however many writes its callers start, and loses none`, async () => {
    const file = path.join(tempDir(), 'hung.raw');
    const hung = await hangingFile(file);
    const target = span(file, hung.handle);
    try {
      // What a resync's target service does: a request's runs written all at once.
      const runs = Array.from({ length: 1000 }, (_, i) => Buffer.alloc(RUN_BYTES, (i % 250) + 1));
      const writes = runs.map((data, i) => target.write(data, 0, i * RUN_BYTES, RUN_BYTES));
      await new Promise((r) => setTimeout(r, 50));
      expect(hung.inFlight()).toBe(TARGET_POOL_JOBS);
      // Meanwhile another disk's file, on a healthy device, is written and synced.
      const otherFile = path.join(tempDir(), 'healthy.raw');
      await fsp.writeFile(otherFile, Buffer.alloc(0));
      await fsp.truncate(otherFile, SIZE_BYTES);
      const other = span(otherFile, await fsp.open(otherFile, 'r+'));
      await other.write(Buffer.alloc(RUN_BYTES, 9), 0, 0, RUN_BYTES);
      await other.datasync();
      await other.close();
      expect(hung.maxInFlight()).toBe(TARGET_POOL_JOBS);
      // The device answers: every write lands.
      hung.answer();
      await Promise.all(writes);
      const back = await fsp.readFile(file);
      for (let i = 0; i < runs.length; i++) expect(back.subarray(i * RUN_BYTES, (i + 1) * RUN_BYTES).equals(runs[i]!)).toBe(true);
      expect(hung.maxInFlight()).toBe(TARGET_POOL_JOBS);
    } finally {
      await target.close();
    }
  });
});
