import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { run, startTap, type TapFixture } from './nbd-fixtures';
import { NbdServer } from '../../src/tap/nbd-server';
import { RawTarget } from '../../src/targets/raw/raw-target';

const tempDir = useTempDirs();
const open: TapFixture[] = [];
afterEach(async () => {
  for (const f of open.splice(0)) await f.close();
});

async function tap(options: Parameters<typeof startTap>[1] = {}): Promise<TapFixture> {
  const f = await startTap(tempDir(), options);
  open.push(f);
  return f;
}

const MiB = 1024 * 1024;

describe('NBD server with real clients', () => {
  it.runIf(requireTool('qemu-io'))('stores qemu-io writes on the disk and in the recorder, and reads them back', async () => {
    const f = await tap();
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 64k', '-c', 'write -P 0xcd 1M 4k', '-c', 'read -P 0xab 0 64k', '-c', 'read -P 0xcd 1M 4k', '-c', 'read -P 0 64k 4k', '-c', 'flush', f.uri]);
    const image = fs.readFileSync(f.imagePath);
    expect(image.subarray(0, 65536).every((b) => b === 0xab)).toBe(true);
    expect(image.subarray(MiB, MiB + 4096).every((b) => b === 0xcd)).toBe(true);
    const writes = f.recorder.records.filter((r) => r.kind === 'write');
    expect(writes.map((r) => r.offset).sort((a, b) => a - b)).toEqual([0, MiB]);
    expect(f.recorder.flushes).toBeGreaterThan(0);
    expect(f.recorder.replayOnto(Buffer.alloc(image.length)).equals(image)).toBe(true);
  });

  it.runIf(requireTool('qemu-io'))('turns WRITE_ZEROES and TRIM into zeroed ranges on the disk and in the recorder', async () => {
    const f = await tap({ fill: 0x5a, sizeBytes: 4 * MiB });
    await run('qemu-io', ['-f', 'raw', '-c', 'write -z 0 128k', '-c', 'discard 1M 256k', '-c', 'write -z -u 2M 64k', '-c', 'read -P 0 0 128k', f.uri]);
    const image = fs.readFileSync(f.imagePath);
    expect(image.subarray(0, 128 * 1024).every((b) => b === 0)).toBe(true);
    expect(image.subarray(128 * 1024, MiB).every((b) => b === 0x5a)).toBe(true);
    expect(f.recorder.records.filter((r) => r.kind === 'zero').length).toBeGreaterThanOrEqual(2);
    expect(f.recorder.replayOnto(Buffer.alloc(4 * MiB, 0x5a)).equals(image)).toBe(true);
  });

  it.runIf(requireTool('nbdinfo'))('advertises size, transmission flags and block sizes that nbdinfo reads back', async () => {
    const f = await tap({ sizeBytes: 8 * MiB });
    const { stdout } = await run('nbdinfo', ['--json', f.uri]);
    const info = JSON.parse(stdout);
    const exp = info.exports[0];
    expect(info.protocol).toBe('newstyle-fixed');
    expect(exp['export-name']).toBe('disk0');
    expect(exp['export-size']).toBe(8 * MiB);
    expect(exp.is_read_only).toBe(false);
    expect(exp.can_flush).toBe(true);
    expect(exp.can_fua).toBe(true);
    expect(exp.can_trim).toBe(true);
    expect(exp.can_zero).toBe(true);
    expect(exp.can_multi_conn).toBe(true);
    expect(exp.can_df).toBe(false);
    expect(exp.block_size_minimum).toBe(1);
    expect(exp.block_size_preferred).toBe(4096);
    expect(exp.block_size_maximum).toBe(32 * MiB);
  });

  it.runIf(requireTool('nbdinfo'))('lists one export per disk with NBD_OPT_LIST', async () => {
    const dir = tempDir();
    const a = await RawTarget.open(path.join(dir, 'a.img'), { create: { sizeBytes: MiB } });
    const b = await RawTarget.open(path.join(dir, 'b.img'), { create: { sizeBytes: 2 * MiB } });
    const server = new NbdServer({ exports: [
      { name: 'disk-a', readOnly: false, source: a, description: 'first' },
      { name: 'disk-b', readOnly: true, source: b },
    ] });
    const { port } = await server.listen('127.0.0.1', 0);
    try {
      const { stdout } = await run('nbdinfo', ['--json', '--list', `nbd://127.0.0.1:${port}`]);
      const info = JSON.parse(stdout);
      const byName = Object.fromEntries(info.exports.map((e: { 'export-name': string }) => [e['export-name'], e]));
      expect(Object.keys(byName).sort()).toEqual(['disk-a', 'disk-b']);
      expect(byName['disk-a']['export-size']).toBe(MiB);
      expect(byName['disk-a'].description).toBe('first');
      expect(byName['disk-b'].is_read_only).toBe(true);
      expect(byName['disk-b'].can_trim).toBe(false);
    } finally {
      await server.close();
      await a.close();
      await b.close();
    }
  });

  it.runIf(requireTool('qemu-io') && requireTool('nbdinfo'))('refuses writes, trims and zeroes on a read-only export and leaves the disk untouched', async () => {
    const f = await tap({ fill: 0x11, sizeBytes: MiB, readOnly: true });
    const { stdout } = await run('nbdinfo', ['--json', f.uri]);
    expect(JSON.parse(stdout).exports[0].is_read_only).toBe(true);
    await expect(run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xff 0 4k', f.uri])).rejects.toBeDefined();
    await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x11 0 64k', f.uri]);
    expect(fs.readFileSync(f.imagePath).every((b) => b === 0x11)).toBe(true);
    expect(f.recorder.records).toEqual([]);
  });

  it.runIf(requireTool('nbdcopy') && requireTool('qemu-img'))('copies an image in and out with nbdcopy and qemu-img, identical both ways', async () => {
    const dir = tempDir();
    const src = path.join(dir, 'src.img');
    const data = Buffer.alloc(8 * MiB);
    for (let i = 0; i < data.length; i += 4096) data.fill((i / 4096) % 251, i, i + 2048);
    fs.writeFileSync(src, data);
    const f = await tap({ sizeBytes: 8 * MiB });
    await run('nbdcopy', [src, f.uri]);
    expect(fs.readFileSync(f.imagePath).equals(data)).toBe(true);
    const out = path.join(dir, 'out.img');
    await run('nbdcopy', [f.uri, out]);
    expect(fs.readFileSync(out).equals(data)).toBe(true);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, f.uri]);
    const out2 = path.join(dir, 'out2.img');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', f.uri, out2]);
    expect(fs.readFileSync(out2).equals(data)).toBe(true);
    expect(f.recorder.replayOnto(Buffer.alloc(8 * MiB)).equals(data)).toBe(true);
  });

  it.runIf(requireTool('fio'))('passes fio random writes with crc32c verification at queue depth 16', async () => {
    const f = await tap({ sizeBytes: 32 * MiB });
    // fio prints "connected to NBD server" on stdout, so the JSON goes to a file.
    const report = path.join(tempDir(), 'fio.json');
    await run('fio', ['--name=verify', '--ioengine=nbd', `--uri=${f.uri}`, '--rw=randwrite', '--bs=64k', '--iodepth=16', '--size=32m', '--verify=crc32c', '--verify_state_save=0', '--output-format=json', `--output=${report}`]);
    const job = JSON.parse(fs.readFileSync(report, 'utf8')).jobs[0];
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBe(32 * MiB);
  });

  it.runIf(requireTool('fio'))('records overlapping concurrent writes in the order the disk applied them', async () => {
    // Mixed block sizes over a small region at depth 32 make in-flight writes
    // overlap, and the jitter makes the disk finish them out of order;
    // replaying the records must still give the disk's bytes.
    const f = await tap({ sizeBytes: 2 * MiB, jitterWrites: true });
    await run('fio', ['--name=overlap', '--ioengine=nbd', `--uri=${f.uri}`, '--rw=randwrite', '--bsrange=4k-128k', '--iodepth=32', '--size=2m', '--io_size=16m', '--randrepeat=0', '--norandommap', '--refill_buffers']);
    const image = fs.readFileSync(f.imagePath);
    expect(f.recorder.records.length).toBeGreaterThan(200);
    expect(f.recorder.replayOnto(Buffer.alloc(2 * MiB)).equals(image)).toBe(true);
  });
});
