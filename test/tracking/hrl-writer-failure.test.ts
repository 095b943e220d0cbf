import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { HrlWriter, type HrlWriterFile } from '../../src/tracking/hrl-writer';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();

/**
 * A real log file whose next fdatasync or write fails once with EIO, as Linux
 * reports a writeback error to one fdatasync only (the failed pages are then
 * clean, so the next fdatasync returns 0 with the data gone).
 */
class FailingOnceLog implements HrlWriterFile {
  failNextSync = false;
  failNextWrite = false;
  readonly calls: string[] = [];
  private constructor(private readonly fh: fsp.FileHandle) {}

  static last: FailingOnceLog | undefined;
  static async open(p: string): Promise<HrlWriterFile> {
    FailingOnceLog.last = new FailingOnceLog(await fsp.open(p, 'wx+'));
    return FailingOnceLog.last;
  }

  private eio(what: string): Error {
    this.calls.push(`${what}:EIO`);
    return Object.assign(new Error(`EIO: i/o error, ${what}`), { code: 'EIO', errno: -5 });
  }

  async write(buffer: Buffer, offset: number, length: number, position: number): Promise<unknown> {
    if (this.failNextWrite) {
      this.failNextWrite = false;
      throw this.eio('write');
    }
    this.calls.push('write');
    return this.fh.write(buffer, offset, length, position);
  }

  async writev(buffers: Buffer[], position: number): Promise<unknown> {
    if (this.failNextWrite) {
      this.failNextWrite = false;
      throw this.eio('writev');
    }
    this.calls.push('writev');
    return this.fh.writev(buffers, position);
  }

  async datasync(): Promise<void> {
    if (this.failNextSync) {
      this.failNextSync = false;
      throw this.eio('fdatasync');
    }
    this.calls.push('fdatasync');
    await this.fh.datasync();
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

async function createLog(): Promise<{ writer: HrlWriter; file: FailingOnceLog }> {
  const writer = await HrlWriter.create(path.join(tempDir(), 'a.hrl.open'), { metadataSizeBytes: 256, stagingBytes: 64 * 1024, openFile: FailingOnceLog.open });
  return { writer, file: FailingOnceLog.last! };
}

describe('HrlWriter after a failed write or sync', () => {
  it('rejects every later flush with the first fdatasync error instead of syncing again', async () => {
    const { writer, file } = await createLog();
    await writer.append(0, Buffer.alloc(4096, 1));
    file.failNextSync = true;
    const first = await writer.flush().then(() => undefined, (err: unknown) => err);
    expect(first).toMatchObject({ code: 'BR_IO' });
    expect(String((first as Error).message)).toMatch(/fdatasync failed.*EIO/);
    const durableEnd = writer.durableEndBytes;
    const callsAfterFailure = file.calls.length;
    // A retried flush would otherwise get 0 from fdatasync: the error was reported once.
    await expect(writer.flush()).rejects.toBe(first);
    await expect(writer.append(8192, Buffer.alloc(512, 2))).rejects.toBe(first);
    await expect(writer.appendZeroes(0, 4096)).rejects.toBe(first);
    await expect(writer.seal()).rejects.toBe(first);
    expect(writer.appendsInMemory(512)).toBe(false);
    expect(file.calls.length, 'no write or sync after the failure').toBe(callsAfterFailure);
    expect(writer.durableEndBytes).toBe(durableEnd);
    await writer.close();
  });

  it('rejects the flush and every later operation after a failed payload write', async () => {
    const { writer, file } = await createLog();
    file.failNextWrite = true;
    // Larger than the staging buffer: written straight away, and the write fails.
    const first = await writer.append(0, Buffer.alloc(128 * 1024, 3)).then(() => undefined, (err: unknown) => err);
    expect(first).toMatchObject({ code: 'BR_IO' });
    const syncsBefore = file.calls.filter((c) => c === 'fdatasync').length;
    await expect(writer.flush()).rejects.toBe(first);
    expect(file.calls.filter((c) => c === 'fdatasync').length, 'no fdatasync after the failed write').toBe(syncsBefore);
    await writer.close();
  });

  it('keeps working after no failure: a flush with nothing new costs no fdatasync', async () => {
    const { writer, file } = await createLog();
    await writer.append(0, Buffer.alloc(4096, 1));
    await writer.flush();
    const syncs = file.calls.filter((c) => c === 'fdatasync').length;
    await writer.flush();
    expect(file.calls.filter((c) => c === 'fdatasync').length).toBe(syncs);
    await writer.seal();
  });
});
