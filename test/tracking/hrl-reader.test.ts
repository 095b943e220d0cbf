import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { verifyHrlLog } from '../../src/tracking/hrl-reader';
import { useTempDirs } from '../helpers/tmp';
import { buildIndependentLog, resealHeader, type IndependentWrite } from './hrl-independent-writer';

const tempDir = useTempDirs();

function fill(seed: number, length: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (seed * 31 + i * 7 + (i >> 8)) & 0xff;
  return b;
}

const BLOCKS: IndependentWrite[][] = [
  [],
  [{ offset: 0, data: fill(1, 4096) }, { offset: 8192, data: fill(2, 1024) }, { offset: 512, data: fill(3, 512) }],
  [{ offset: 65536, data: fill(4, 8192) }, { offset: 0, data: fill(5, 512) }],
];
const MS = 256;

function logFile(bytes: Uint8Array, name = 'x.hrl'): string {
  const file = path.join(tempDir(), name);
  fs.writeFileSync(file, bytes);
  return file;
}

/** Byte offsets in the BLOCKS layout with MS = 256. */
const BLOCK1 = 4096 + MS + 4096 + 1024 + 512;
const BLOCK2 = BLOCK1 + MS + 8192 + 512;

async function expectDamage(bytes: Uint8Array, code: string, offset: number, options = {}): Promise<void> {
  const file = logFile(bytes);
  const err = await verifyHrlLog(file, options).then(() => undefined, (e: unknown) => e);
  expect(err, `expected ${code}`).toMatchObject({ code, recoverable: false, details: { offset } });
  expect((err as Error).message).toContain(`at byte ${offset}`);
}

describe('hrl reader on logs from the independent writer', () => {
  it('verifies the layout the notes describe (empty first block, payloads before each block)', async () => {
    const v = await verifyHrlLog(logFile(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS })));
    expect(v.blocks.map((b) => [b.offset, b.validEntries, b.payloadStart])).toEqual([[4096, 0, 4096], [BLOCK1, 3, 4096 + MS], [BLOCK2, 2, BLOCK1 + MS]]);
    expect(v.entryCount).toBe(5);
    expect(v.unverifiedPayloads).toBe(0);
  });

  it('accepts DataChecksum 0 as "not recorded" (as in the spec example) and counts those payloads', async () => {
    const v = await verifyHrlLog(logFile(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, dataChecksums: false })));
    expect(v.unverifiedPayloads).toBe(5);
  });

  it('applies the independent log to a raw disk exactly', async () => {
    const dir = tempDir();
    const file = logFile(buildIndependentLog({ blocks: BLOCKS, metadataSize: 4096 }), 'ind.hrl');
    const model = Buffer.alloc(131072);
    for (const block of BLOCKS) for (const w of block) model.set(w.data, w.offset);
    const img = path.join(dir, 'disk.img');
    const target = await openDisk(`raw:${img}`, { create: { sizeBytes: model.length } });
    await applyHrlLogs(target, [file]).finally(() => target.close());
    expect(fs.readFileSync(img)).toEqual(model);
  });
});

describe('hrl reader refuses each kind of damage with its own code and the byte offset', () => {
  const good = (): Uint8Array => buildIndependentLog({ blocks: BLOCKS, metadataSize: MS });

  it('a file shorter than the header: BR_HRL_TRUNCATED', async () => {
    await expectDamage(good().subarray(0, 4000), 'BR_HRL_TRUNCATED', 4000);
  });

  it('a sealed log cut short: BR_HRL_TRUNCATED at the file end', async () => {
    const g = good();
    await expectDamage(g.subarray(0, g.length - 1), 'BR_HRL_TRUNCATED', g.length - 1);
  });

  it('a wrong cookie: BR_HRL_BAD_COOKIE', async () => {
    const g = good();
    g[0] = 0x4d;
    await expectDamage(g, 'BR_HRL_BAD_COOKIE', 0);
  });

  it('version 1 or an unknown version (checksum right): BR_HRL_UNSUPPORTED_VERSION', async () => {
    await expectDamage(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, logFormatVersion: 0x10000 }), 'BR_HRL_UNSUPPORTED_VERSION', 8);
    await expectDamage(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, logFormatVersion: 0x30000 }), 'BR_HRL_UNSUPPORTED_VERSION', 8);
  });

  it('a damaged header byte: BR_HRL_HEADER_CHECKSUM', async () => {
    const g = good();
    g[3000] ^= 0x40;
    await expectDamage(g, 'BR_HRL_HEADER_CHECKSUM', 40);
  });

  it('nonzero Flags or Reserved, wrong FileType, bad MetadataSize (checksum right): BR_HRL_HEADER_FIELD', async () => {
    for (const [at, value, offset] of [[108, 1, 108], [3000, 1, 3000], [104, 2, 104], [56, 100, 56]] as const) {
      const g = good();
      if (at === 56) new DataView(g.buffer).setUint32(56, value, true);
      else g[at] = value;
      resealHeader(g);
      await expectDamage(g, 'BR_HRL_HEADER_FIELD', offset);
    }
  });

  it('EOLLocation 0: BR_HRL_UNSEALED', async () => {
    await expectDamage(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, eolLocation: 0 }), 'BR_HRL_UNSEALED', 44);
  });

  it('EOLLocation inside the header: BR_HRL_EOL_OUT_OF_RANGE', async () => {
    await expectDamage(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, eolLocation: 4096 }), 'BR_HRL_EOL_OUT_OF_RANGE', 44);
  });

  it('a damaged metadata header: BR_HRL_METADATA_CHECKSUM', async () => {
    const g = good();
    g[BLOCK2 + 20] = 9;
    await expectDamage(g, 'BR_HRL_METADATA_CHECKSUM', BLOCK2 + 12);
  });

  it('a chain that points at itself or forward: BR_HRL_CHAIN_LOOP', async () => {
    await expectDamage(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, previousLocation: (i, h) => (i === 2 ? 100n : BigInt(h)) }), 'BR_HRL_CHAIN_LOOP', BLOCK2);
    await expectDamage(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, previousLocation: (i, h) => (i === 2 ? (1n << 64n) - 256n : BigInt(h)) }), 'BR_HRL_CHAIN_LOOP', BLOCK2);
  });

  it('a chain that points before the header end: BR_HRL_CHAIN_OUT_OF_RANGE', async () => {
    await expectDamage(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, previousLocation: (i, h) => (i === 2 ? BigInt(BLOCK2) : BigInt(h)) }), 'BR_HRL_CHAIN_OUT_OF_RANGE', BLOCK2);
  });

  it('a chain that skips a block: BR_HRL_PAYLOAD_MISFIT at the block whose payloads no longer fit', async () => {
    await expectDamage(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, previousLocation: (i, h) => (i === 2 ? BigInt(BLOCK2 - 4096) : BigInt(h)) }), 'BR_HRL_PAYLOAD_MISFIT', BLOCK2);
  });

  it('payload lengths that do not fill the space: BR_HRL_PAYLOAD_MISFIT', async () => {
    const blocks = [[], [{ offset: 0, data: fill(1, 4096), declaredLength: 4000 }]];
    await expectDamage(buildIndependentLog({ blocks, metadataSize: MS }), 'BR_HRL_PAYLOAD_MISFIT', 4096 + MS + 4096);
  });

  it('a damaged metadata entry: BR_HRL_ENTRY_CHECKSUM', async () => {
    const g = good();
    g[BLOCK1 + 32 + 32 + 17] ^= 1;
    await expectDamage(g, 'BR_HRL_ENTRY_CHECKSUM', BLOCK1 + 64 + 8);
  });

  it('MetaOperation other than 1: BR_HRL_UNSUPPORTED_OPERATION', async () => {
    const blocks = [[], [{ offset: 0, data: fill(1, 512), metaOperation: 2 }]];
    await expectDamage(buildIndependentLog({ blocks, metadataSize: MS }), 'BR_HRL_UNSUPPORTED_OPERATION', 4096 + MS + 512 + 32 + 20);
  });

  it('a damaged payload: BR_HRL_DATA_CHECKSUM at the payload', async () => {
    const g = good();
    g[4096 + MS + 4096 + 5] ^= 0x80;
    await expectDamage(g, 'BR_HRL_DATA_CHECKSUM', 4096 + MS + 4096);
  });

  it('TotalMetadataEntries unlike the blocks: BR_HRL_ENTRY_COUNT_MISMATCH', async () => {
    await expectDamage(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, totalMetadataEntries: 6 }), 'BR_HRL_ENTRY_COUNT_MISMATCH', 96);
  });

  it('an entry past the disk end: BR_HRL_PAST_DISK_END', async () => {
    await expectDamage(good(), 'BR_HRL_PAST_DISK_END', BLOCK2 + 32, { diskSizeBytes: 65536 });
  });

  it('an entry off the target alignment: BR_HRL_MISALIGNED', async () => {
    const blocks = [[], [{ offset: 100, data: fill(1, 512) }]];
    await expectDamage(buildIndependentLog({ blocks, metadataSize: MS }), 'BR_HRL_MISALIGNED', 4096 + MS + 512 + 32, { alignmentBytes: 512 });
  });
});

describe('hrl apply', () => {
  it('leaves the target untouched when any log fails validation, even the last one', async () => {
    const dir = tempDir();
    const img = path.join(dir, 'disk.img');
    const before = Buffer.alloc(131072, 0xaa);
    fs.writeFileSync(img, before);
    const good = logFile(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS }), 'a.hrl');
    const badBytes = buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, uniqueId: new Uint8Array(16).fill(0x22), previousUniqueId: new Uint8Array(16).fill(0x11) });
    badBytes[badBytes.length - MS - 100] ^= 1;
    const bad = logFile(badBytes, 'b.hrl');
    const target = await openDisk(`raw:${img}`);
    await expect(applyHrlLogs(target, [good, bad]).finally(() => target.close())).rejects.toMatchObject({ code: 'BR_HRL_DATA_CHECKSUM' });
    expect(fs.readFileSync(img)).toEqual(before);
  });

  it('refuses logs given out of chain order with BR_HRL_CHAIN_BROKEN', async () => {
    const dir = tempDir();
    const img = path.join(dir, 'disk.img');
    fs.writeFileSync(img, Buffer.alloc(131072));
    const a = logFile(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, uniqueId: new Uint8Array(16).fill(0x11) }), 'a.hrl');
    const b = logFile(buildIndependentLog({ blocks: BLOCKS, metadataSize: MS, uniqueId: new Uint8Array(16).fill(0x22), previousUniqueId: new Uint8Array(16).fill(0x11) }), 'b.hrl');
    const target = await openDisk(`raw:${img}`);
    try {
      await expect(applyHrlLogs(target, [b, a])).rejects.toMatchObject({ code: 'BR_HRL_CHAIN_BROKEN', details: { offset: 76 } });
      await expect(applyHrlLogs(target, [a, b])).resolves.toMatchObject({ entriesApplied: 10 });
    } finally {
      await target.close();
    }
  });
});
