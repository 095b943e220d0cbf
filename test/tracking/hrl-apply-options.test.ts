import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openDisk } from '../../src/targets/disk-spec';
import { applyHrlLogs } from '../../src/tracking/hrl-apply';
import { HrlWriter } from '../../src/tracking/hrl-writer';
import { useTempDirs } from '../helpers/tmp';

describe('applyHrlLogs checkPayloads', () => {
  const tmp = useTempDirs();

  async function damagedLog(dir: string): Promise<string> {
    const file = path.join(dir, 'log.hrl');
    const w = await HrlWriter.create(file);
    await w.append(4096, Buffer.alloc(8192, 0x5a));
    await w.seal();
    await w.close();
    const bytes = fs.readFileSync(file);
    // The payload sits between the anchor block (4096..8192) and the last block.
    bytes[8192 + 100] ^= 0xff;
    fs.writeFileSync(file, bytes);
    return file;
  }

  it('refuses a damaged payload by default and leaves the target untouched', async () => {
    const dir = tmp();
    const log = await damagedLog(dir);
    const target = await openDisk(`raw:${path.join(dir, 't.img')}`, { create: { sizeBytes: 1 << 20 } });
    await expect(applyHrlLogs(target, [log])).rejects.toMatchObject({ code: 'BR_HRL_DATA_CHECKSUM' });
    await target.close();
    expect(fs.readFileSync(path.join(dir, 't.img')).every((b) => b === 0)).toBe(true);
  });

  it('skips the payload check only when told the payloads were verified already', async () => {
    const dir = tmp();
    const log = await damagedLog(dir);
    const target = await openDisk(`raw:${path.join(dir, 't.img')}`, { create: { sizeBytes: 1 << 20 } });
    const result = await applyHrlLogs(target, [log], { checkPayloads: false });
    await target.close();
    expect(result.bytesApplied).toBe(8192);
  });
});
