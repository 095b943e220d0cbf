import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { removeStrayTemporaries, writeFileDurably } from '../../src/platform/durable-file';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();

/** The id of a process that has exited. */
function deadPid(): number {
  const child = spawnSync('sh', ['-c', 'echo $$'], { encoding: 'utf8' });
  return Number(child.stdout.trim());
}

describe('writeFileDurably', () => {
  it('lets overlapping writes of one file each rename their own temporary: all succeed, the file is one of them whole', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'state.json');
    const contents = Array.from({ length: 16 }, (_, i) => JSON.stringify({ writer: i, pad: 'x'.repeat(64 * 1024 + i) }));
    await Promise.all(contents.map((c) => writeFileDurably(file, c)));
    expect(contents).toContain(fs.readFileSync(file, 'utf8'));
    expect(fs.readdirSync(dir)).toEqual(['state.json']);
  });
});

describe('removeStrayTemporaries', () => {
  it('removes temporaries of dead processes only, and leaves the files they were replacing whole', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'ledger.json');
    await writeFileDurably(file, '{"seq":1}');
    const dead = deadPid();
    fs.writeFileSync(`${file}.${dead}.tmp`, '{"seq":2');
    fs.writeFileSync(`${file}.${dead}-7.tmp`, '{"seq":3');
    fs.writeFileSync(`${file}.${process.pid}-1.tmp`, 'ours, being written');
    fs.writeFileSync(`${file}.${process.ppid}-2.tmp`, 'a live process, being written');
    fs.writeFileSync(path.join(dir, 'notes.tmp'), 'not a temporary of ours');
    expect((await removeStrayTemporaries(dir)).sort()).toEqual([`ledger.json.${dead}-7.tmp`, `ledger.json.${dead}.tmp`].sort());
    expect(fs.readdirSync(dir).sort()).toEqual(['ledger.json', `ledger.json.${process.pid}-1.tmp`, `ledger.json.${process.ppid}-2.tmp`, 'notes.tmp'].sort());
    expect(fs.readFileSync(file, 'utf8')).toBe('{"seq":1}');
  });

  it('touches only the named files when given, and sweeps nothing in a missing directory', async () => {
    const dir = tempDir();
    const dead = deadPid();
    fs.writeFileSync(path.join(dir, `state.${dead}.tmp`), 'x');
    fs.writeFileSync(path.join(dir, `someone-else.${dead}.tmp`), 'y');
    expect(await removeStrayTemporaries(dir, ['state'])).toEqual([`state.${dead}.tmp`]);
    expect(fs.readdirSync(dir)).toEqual([`someone-else.${dead}.tmp`]);
    expect(await removeStrayTemporaries(path.join(dir, 'missing'))).toEqual([]);
  });
});

describe('owners sweep their temporaries when they open', () => {
  it('a resync job removes its state file\'s stray temporaries and nothing else beside it', async () => {
    const { ResyncJob } = await import('../../src/resync/resync-job');
    const { BlockHasher } = await import('../../src/resync/block-hasher');
    const dir = tempDir();
    const statePath = path.join(dir, 'disk0.resync');
    const dead = deadPid();
    fs.writeFileSync(`${statePath}.${dead}.tmp`, 'half a state');
    fs.writeFileSync(path.join(dir, `operator-file.${dead}.tmp`), 'not ours');
    const job = await ResyncJob.open(statePath, await BlockHasher.create());
    await job.close();
    expect(fs.existsSync(`${statePath}.${dead}.tmp`)).toBe(false);
    expect(fs.existsSync(path.join(dir, `operator-file.${dead}.tmp`))).toBe(true);
  });

  it('a disk history on the retention volume removes the stray temporaries of its catalog and manifest', async () => {
    const { DiskHistory } = await import('../../src/retention/retention-pruner');
    const { diskRetentionPaths } = await import('../../src/retention/retention-format');
    const retentionDir = tempDir();
    const paths = diskRetentionPaths(retentionDir, 'disk0');
    fs.mkdirSync(path.dirname(paths.catalog), { recursive: true });
    const dead = deadPid();
    fs.writeFileSync(`${paths.catalog}.${dead}.tmp`, 'a pruning cut short');
    fs.writeFileSync(`${paths.manifest}.${dead}.tmp`, '{"half');
    const history = new DiskHistory(retentionDir, 'disk0');
    await history.open(null);
    expect(fs.readdirSync(path.dirname(paths.catalog)).filter((n) => n.endsWith('.tmp'))).toEqual([]);
  });
});

describe('receiving hops sweep their state temporaries when they start', () => {
  it('removes stray ledger and resync-state temporaries of dead processes from both hops, keeping the files themselves', async () => {
    const { startHops } = await import('../transport/transport-fixture');
    const dir = tempDir();
    const dead = deadPid();
    for (const hop of ['mt', 'ps']) {
      for (const sub of ['disks', 'resync']) {
        fs.mkdirSync(path.join(dir, hop, sub), { recursive: true });
        fs.writeFileSync(path.join(dir, hop, sub, `disk0.json.${dead}.tmp`), '{"half');
      }
    }
    const { stop } = await startHops(dir);
    try {
      for (const hop of ['mt', 'ps']) {
        for (const sub of ['disks', 'resync']) expect(fs.readdirSync(path.join(dir, hop, sub)).filter((n) => n.endsWith('.tmp'))).toEqual([]);
      }
    } finally {
      await stop();
    }
  });
});
