import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { parseCommandArgs, writeJson, type Command, type CommandIo } from '../daemon/command';
import { BlockrelayError } from '../retry/blockrelay-error';
import { copyDisk, type CopyProgress } from './disk-copy';
import { openDisk, parseDiskSpec } from './disk-spec';
import type { DiskTarget } from './disk-target';
import { flatExtentName } from './vmdk/vmdk-flat-target';

const USAGE = 'convert FROM TO [--json]';
const OPTIONS = { json: { type: 'boolean' } } as const;
/** Progress lines on stderr come this often. */
const PROGRESS_INTERVAL_MS = 1000;

function mib(bytes: number): string {
  return (bytes / (1024 * 1024)).toFixed(1);
}

function progressLine(p: CopyProgress): string {
  const pct = p.totalBytes === 0 ? 100 : Math.floor((p.doneBytes * 100) / p.totalBytes);
  const rate = p.elapsedMs === 0 ? 0 : p.doneBytes / 1024 / 1024 / (p.elapsedMs / 1000);
  return `convert: ${pct}% (${mib(p.doneBytes)} of ${mib(p.totalBytes)} MiB, ${mib(p.writtenBytes)} MiB written, ${rate.toFixed(1)} MiB/s)\n`;
}

/** Files a failed convert created and must take away again, so no half-written disk is left behind. */
function createdFiles(spec: string): string[] {
  const parsed = parseDiskSpec(spec);
  if (parsed.kind === 'vmdk-flat') return [parsed.path, path.join(path.dirname(parsed.path), flatExtentName(parsed.path))];
  if (parsed.kind === 'raw' || parsed.kind === 'vmdk' || parsed.kind === 'vhd') return [parsed.path];
  return [];
}

/**
 * `blockrelay convert FROM TO`: copies a whole disk between any two specs.
 * FROM is opened read-only (and so fully validated) before TO is created
 * with FROM's size; TO must not exist (creating over a disk that is not
 * ours is BR_TARGET_NAME_CONFLICT). Holes stay holes where TO can express
 * them. If the copy fails, the files TO was created as are removed.
 */
export const convertCommand: Command = {
  path: ['convert'],
  usage: USAGE,
  summary: 'copy a whole disk between specs (raw:, vmdk:, vmdk-flat:, vhd:, blob:, nbd://), keeping holes',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, OPTIONS, USAGE);
    if (positionals.length !== 2) throw new BlockrelayError('BR_USAGE', `convert takes FROM and TO, got ${positionals.length} arguments; usage: ${USAGE}`);
    const [fromSpec, toSpec] = positionals as [string, string];
    parseDiskSpec(fromSpec);
    parseDiskSpec(toSpec);
    const from = await openDisk(fromSpec, { readOnly: true });
    let to: DiskTarget | undefined;
    try {
      // Only what this run creates is taken away on failure: `create` also
      // takes an existing empty file or a block device, which must stay.
      const made = createdFiles(toSpec).filter((f) => !fs.existsSync(f));
      to = await openDisk(toSpec, { create: { sizeBytes: from.sizeBytes } });
      let result;
      try {
        result = await copyDisk(from, to, {
          targetIsZero: to.capabilities.sparse,
          progressIntervalMs: PROGRESS_INTERVAL_MS,
          onProgress: (p) => io.stderr.write(progressLine(p)),
        });
        await to.close();
      } catch (err) {
        await to.close().catch(() => undefined);
        for (const file of made) await fsp.rm(file, { force: true });
        throw err;
      }
      if (values.json === true) writeJson(io, { from: fromSpec, to: toSpec, ...result });
      else io.stderr.write(`convert ${fromSpec} -> ${toSpec}: ${result.sizeBytes} bytes, ${result.writtenBytes} written, ${result.zeroBytes} left as holes, ${result.durationMs} ms\n`);
      return 0;
    } finally {
      await from.close();
    }
  },
};
