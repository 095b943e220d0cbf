import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { validateDiskId } from '../transport/transport-protocol';
import { networkedResync } from './networked-resync';
import { parseCommandArgs, parseIntegerOption, writeJson, type Command, type CommandIo } from '../daemon/command';
import { BlockrelayError, wrapError } from '../retry/blockrelay-error';
import { RETRY_POLICY_DEFAULTS } from '../retry/retry-policy';
import { parseExtentFile } from './extent-list';
import { RESYNC_DEFAULTS } from './resync-engine';
import { resyncDisks } from './resync-disks';
import { ResyncProgressPrinter } from './resync-progress';
import { MAX_BLOCK_BYTES, MIN_BLOCK_BYTES } from './resync-wire';
import { tellStopping, untilStopSignal } from '../daemon/stop-signals';

const USAGE = 'resync SOURCE TARGET [--block-size BYTES] [--json] [--state FILE] [--extents FILE] [--create] [--max-read-rate BYTES_PER_SEC] [--checkpoint-ms N]\n       resync SOURCE --process-server URL --disk ID [--ca FILE] [--after-seq N] [--state FILE] [--block-size BYTES] [--json] [--extents FILE] [--max-read-rate BYTES_PER_SEC] [--checkpoint-ms N] [--retry-ms N]';

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
  'process-server': { type: 'string' },
  disk: { type: 'string' },
  ca: { type: 'string' },
  'after-seq': { type: 'string' },
  'retry-ms': { type: 'string' },
} as const;

/** The process server's shared secret, as `blockrelay source --process-server` reads it (never on the command line). */
const PROCESS_SERVER_SECRET_ENV = 'BLOCKRELAY_SECRET';

type ParsedValues = ReturnType<typeof parseCommandArgs<typeof OPTIONS>>['values'];

function readExtents(file: string) {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot read extent file ${file}`);
  }
  return parseExtentFile(text, file);
}

/** The options both forms share, validated whole before anything is opened. */
function sharedOptions(values: ParsedValues) {
  const blockSizeBytes = parseIntegerOption('block-size', values['block-size'], RESYNC_DEFAULTS.blockSizeBytes, MIN_BLOCK_BYTES, MAX_BLOCK_BYTES);
  if ((blockSizeBytes & (blockSizeBytes - 1)) !== 0) throw new BlockrelayError('BR_USAGE', `--block-size must be a power of two (e.g. 4096 or 65536), got ${blockSizeBytes}`);
  const checkpointIntervalMs = parseIntegerOption('checkpoint-ms', values['checkpoint-ms'], RESYNC_DEFAULTS.checkpointIntervalMs, 0, 3_600_000);
  const maxReadRate = values['max-read-rate'] === undefined ? undefined : parseIntegerOption('max-read-rate', values['max-read-rate'], 0, 1);
  return { blockSizeBytes, checkpointIntervalMs, ...(maxReadRate === undefined ? {} : { readRateBytesPerSec: maxReadRate }) };
}

/**
 * Runs a resync with its progress on stderr (a live line on a terminal, a
 * line every so often otherwise); SIGINT and SIGTERM stop it with its
 * progress saved.
 */
async function withProgress<T>(io: CommandIo, run: (progress: { onProgress: ResyncProgressPrinter['report']; progressIntervalMs: number; signal: AbortSignal }) => Promise<T>): Promise<T> {
  const tty = (io.stderr as NodeJS.WriteStream).isTTY === true;
  const printer = new ResyncProgressPrinter(io.stderr, tty);
  const controller = new AbortController();
  const stopSignals = untilStopSignal(tellStopping(io.stderr, 'stopping the resync with its progress saved'));
  void stopSignals.signal.then(() => controller.abort());
  try {
    return await run({ onProgress: printer.report, progressIntervalMs: tty ? TTY_PROGRESS_INTERVAL_MS : LOG_PROGRESS_INTERVAL_MS, signal: controller.signal });
  } finally {
    printer.finish();
    stopSignals.release();
  }
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
    if (values['process-server'] !== undefined || values.disk !== undefined) return runNetworked(values, positionals, io);
    if (positionals.length !== 2) throw new BlockrelayError('BR_USAGE', `resync takes SOURCE and TARGET, got ${positionals.length} arguments; usage: ${USAGE}`);
    const [sourceSpec, targetSpec] = positionals;
    // Validate the whole command line before opening anything.
    const shared = sharedOptions(values);
    if (values.create === true && values.extents !== undefined) throw new BlockrelayError('BR_USAGE', '--create copies the whole disk; it takes no --extents');
    const extents = values.extents === undefined ? undefined : readExtents(values.extents);

    const result = await withProgress(io, (progress) =>
      resyncDisks(sourceSpec, targetSpec, {
        ...shared,
        ...(values.state === undefined ? {} : { statePath: values.state }),
        ...(extents === undefined ? {} : { extents }),
        create: values.create === true,
        ...progress,
      }),
    );
    if (result.restartReason !== undefined) io.stderr.write(`resync: saved progress not used (${result.restartReason}); started from the beginning\n`);
    if (values.json === true) {
      writeJson(io, { source: sourceSpec, target: targetSpec, ...result });
    } else {
      const resumed = result.resumedFromBytes > 0 ? `, resumed at byte ${result.resumedFromBytes}` : '';
      io.stdout.write(`resync ${sourceSpec} -> ${targetSpec}: compared ${result.blocksCompared} blocks of ${result.blockSizeBytes} bytes, sent ${result.blocksSent} (${result.bytesSent} bytes sent, ${result.bytesReceived} received) in ${result.durationMs} ms${resumed}\n`);
    }
    return 0;
  },
};

/**
 * `blockrelay resync SOURCE --process-server URL --disk ID`: resyncs the
 * replicated disk ID from SOURCE through its process server (which relays
 * to the master target, or serves a page blob itself), with the process
 * server's secret from BLOCKRELAY_SECRET. Progress is saved (by default in
 * the temp directory, keyed by URL and disk) so an outage resumes; failed
 * attempts are retried under the retry policy. `--after-seq` anchors the
 * first session after that log; without it, and for every later session,
 * the hop anchors at what it received.
 */
/**
 * Where a networked resync keeps its progress when `--state` is not given:
 * a directory that survives a reboot (the temp directory may not, and the
 * saved progress is what lets a long resync resume rather than start over).
 * systemd's StateDirectory (`$STATE_DIRECTORY`), else `$XDG_STATE_HOME`, else
 * `~/.local/state`, each with `blockrelay/`; the temp directory only when
 * none of those can be made, said on stderr.
 */
export function defaultStateDir(io: CommandIo): string {
  const fromSystemd = process.env.STATE_DIRECTORY?.split(':')[0];
  const dir = fromSystemd !== undefined && fromSystemd !== ''
    ? fromSystemd
    : path.join(process.env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state'), 'blockrelay');
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    return dir;
  } catch (err) {
    io.stderr.write(`resync: cannot make ${dir} (${(err as Error).message}); saving progress in ${os.tmpdir()}, which a reboot may clear: give --state FILE\n`);
    return os.tmpdir();
  }
}

async function runNetworked(values: ParsedValues, positionals: string[], io: CommandIo): Promise<number> {
  if (positionals.length !== 1) throw new BlockrelayError('BR_USAGE', `resync with --process-server takes SOURCE only, got ${positionals.length} arguments; usage: ${USAGE}`);
  const url = values['process-server'];
  const diskId = values.disk;
  if (url === undefined || diskId === undefined) throw new BlockrelayError('BR_USAGE', `--process-server and --disk go together; usage: ${USAGE}`);
  if (!/^https?:\/\/[^\s]+$/.test(url)) throw new BlockrelayError('BR_USAGE', `--process-server must be an http:// or https:// URL, got '${url.slice(0, 80)}'`);
  validateDiskId(diskId);
  if (values.create === true) throw new BlockrelayError('BR_USAGE', '--create makes a new local TARGET; a networked resync compares with the disk\'s existing target');
  const shared = sharedOptions(values);
  const afterSeq = values['after-seq'] === undefined ? undefined : parseIntegerOption('after-seq', values['after-seq'], 0, 0, Number.MAX_SAFE_INTEGER);
  // A failed attempt (outage, hop restart, lost end) is retried after this fixed wait instead of the policy's 1, 2, 4, 8, 10 min, then every 30.
  const retryMs = values['retry-ms'] === undefined ? undefined : parseIntegerOption('retry-ms', values['retry-ms'], 0, 10, 3_600_000);
  const secret = process.env[PROCESS_SERVER_SECRET_ENV];
  if (secret === undefined || secret.length < 16) throw new BlockrelayError('BR_USAGE', `--process-server needs the process server's shared secret (16 characters or more) in ${PROCESS_SERVER_SECRET_ENV}`);
  let ca: Buffer | undefined;
  if (values.ca !== undefined) {
    try {
      ca = fs.readFileSync(values.ca);
    } catch (err) {
      throw wrapError(err, 'BR_IO', `cannot read --ca ${values.ca}`);
    }
  }
  const extents = values.extents === undefined ? undefined : readExtents(values.extents);
  const [sourceSpec] = positionals as [string];
  const statePath = values.state ?? path.join(defaultStateDir(io), `resync-${crypto.createHash('sha256').update(`${url}\n${diskId}`).digest('hex').slice(0, 16)}.state`);

  const result = await withProgress(io, (progress) =>
    networkedResync(sourceSpec, {
      peer: { url, secret, ca },
      diskId,
      statePath,
      ...shared,
      // Not a cut: S anchors the first session only, and the end taints what the hop received (see firstAnchor).
      ...(afterSeq === undefined ? {} : { firstAnchor: afterSeq }),
      ...(retryMs === undefined ? {} : { retryPolicy: { scheduleOffsetsMs: [], steadyIntervalMs: retryMs, maxRetries: RETRY_POLICY_DEFAULTS.maxRetries } }),
      ...(extents === undefined ? {} : { extents }),
      ...progress,
      onRetry: (e) => {
        if (e.nextAttemptAtMs !== undefined) io.stderr.write(`resync: attempt ${e.attempt} failed (${e.error.code}: ${e.error.message}); trying again at ${new Date(e.nextAttemptAtMs).toISOString()}, resuming from saved progress\n`);
      },
    }),
  );
  if (values.json === true) {
    writeJson(io, { source: sourceSpec, processServer: url, ...result });
  } else {
    const resumed = result.resumedFromBytes > 0 ? `, resumed at byte ${result.resumedFromBytes}` : '';
    io.stdout.write(`resync ${sourceSpec} -> ${url} disk ${diskId}: compared ${result.blocksCompared} blocks of ${result.blockSizeBytes} bytes, sent ${result.blocksSent} (${result.bytesSent} bytes sent, ${result.bytesReceived} received) in ${result.durationMs} ms, ${result.attempts} attempt(s)${resumed}\n`);
  }
  return 0;
}
