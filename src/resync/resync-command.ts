import * as fs from 'node:fs';
import { parseCommandArgs, parseIntegerOption, writeJson, type Command, type CommandIo } from '../daemon/command';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import { parseExtentFile } from './extent-list';
import { RESYNC_DEFAULTS } from './resync-engine';
import { resyncDisks } from './resync-disks';
import { ResyncProgressPrinter } from './resync-progress';
import { MAX_BLOCK_BYTES, MIN_BLOCK_BYTES } from './resync-wire';

const USAGE = 'resync SOURCE TARGET [--block-size BYTES] [--json] [--state FILE] [--extents FILE] [--create] [--max-read-rate BYTES_PER_SEC] [--checkpoint-ms N]';

/** Progress lines in logs come this often; a terminal bar is redrawn faster. */
const LOG_PROGRESS_INTERVAL_MS = 2000;
const TTY_PROGRESS_INTERVAL_MS = 200;

const OPTIONS = {
  'block-size': { type: 'string' },
  json: { type: 'boolean' },
  state: { type: 'string' },
  extents: { type: 'string' },
  create: { type: 'boolean' },
  'max-read-rate': { type: 'string' },
  'checkpoint-ms': { type: 'string' },
} as const;

function readExtents(file: string) {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot read extent file ${file}`);
  }
  return parseExtentFile(text, file);
}

/**
 * `blockrelay resync SOURCE TARGET`: brings TARGET in step with SOURCE by
 * comparing block hashes and sending only the blocks that differ. With
 * `--state` progress is saved and a rerun after an interruption resumes;
 * SIGINT/SIGTERM stop it cleanly with progress saved. `--create` makes a
 * new TARGET of the source's size and copies every non-zero block.
 */
export const resyncCommand: Command = {
  path: ['resync'],
  usage: USAGE,
  summary: 'bring TARGET in step with SOURCE, sending only blocks whose xxh64 differs (resumable with --state)',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, OPTIONS, USAGE);
    if (positionals.length !== 2) throw new BlockrelayError('BR_USAGE', `resync takes SOURCE and TARGET, got ${positionals.length} arguments; usage: ${USAGE}`);
    const [sourceSpec, targetSpec] = positionals;
    const blockSizeBytes = parseIntegerOption('block-size', values['block-size'], RESYNC_DEFAULTS.blockSizeBytes, MIN_BLOCK_BYTES, MAX_BLOCK_BYTES);
    // Validate the whole command line before opening anything.
    if ((blockSizeBytes & (blockSizeBytes - 1)) !== 0) throw new BlockrelayError('BR_USAGE', `--block-size must be a power of two (e.g. 4096 or 65536), got ${blockSizeBytes}`);
    const checkpointIntervalMs = parseIntegerOption('checkpoint-ms', values['checkpoint-ms'], RESYNC_DEFAULTS.checkpointIntervalMs, 0, 3_600_000);
    const maxReadRate = values['max-read-rate'] === undefined ? undefined : parseIntegerOption('max-read-rate', values['max-read-rate'], 0, 1);
    if (values.create === true && values.extents !== undefined) throw new BlockrelayError('BR_USAGE', '--create copies the whole disk; it takes no --extents');
    const extents = values.extents === undefined ? undefined : readExtents(values.extents);

    const tty = (io.stderr as NodeJS.WriteStream).isTTY === true;
    const printer = new ResyncProgressPrinter(io.stderr, tty);
    const controller = new AbortController();
    const stop = (): void => controller.abort();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    try {
      const result = await resyncDisks(sourceSpec, targetSpec, {
        blockSizeBytes,
        checkpointIntervalMs,
        ...(maxReadRate === undefined ? {} : { readRateBytesPerSec: maxReadRate }),
        ...(values.state === undefined ? {} : { statePath: values.state }),
        ...(extents === undefined ? {} : { extents }),
        create: values.create === true,
        onProgress: printer.report,
        progressIntervalMs: tty ? TTY_PROGRESS_INTERVAL_MS : LOG_PROGRESS_INTERVAL_MS,
        signal: controller.signal,
      });
      printer.finish();
      if (result.restartReason !== undefined) io.stderr.write(`resync: saved progress not used (${result.restartReason}); started from the beginning\n`);
      if (values.json === true) {
        writeJson(io, { source: sourceSpec, target: targetSpec, ...result });
      } else {
        const resumed = result.resumedFromBytes > 0 ? `, resumed at byte ${result.resumedFromBytes}` : '';
        io.stdout.write(`resync ${sourceSpec} -> ${targetSpec}: compared ${result.blocksCompared} blocks of ${result.blockSizeBytes} bytes, sent ${result.blocksSent} (${result.bytesSent} bytes sent, ${result.bytesReceived} received) in ${result.durationMs} ms${resumed}\n`);
      }
      return 0;
    } finally {
      printer.finish();
      process.removeListener('SIGINT', stop);
      process.removeListener('SIGTERM', stop);
    }
  },
};
