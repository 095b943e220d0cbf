import { parseCommandArgs, parseIntegerOption, writeJson, type Command, type CommandIo } from '../daemon/command';
import { HOST_PORT_PATTERN } from '../daemon/config';
import { BlockrelayError } from '../retry/blockrelay-error';
import { NbdServer } from '../tap/nbd-server';
import { splitHostPort } from '../transport/master-target';
import { validateDiskId } from '../transport/transport-protocol';
import { commitFailover, failover, loadPoints, openPointSource, resolveDiskPoint, resolveGroupPoint, type FailoverResult } from './failover';
import { listingOf, selectablePoints } from './recovery-points';
import { retentionUsage } from './retention-pruner';
import { tellStopping, untilStopSignal } from '../daemon/stop-signals';

function required(values: Record<string, unknown>, name: string, usage: string): string {
  const v = values[name];
  if (typeof v !== 'string' || v === '') throw new BlockrelayError('BR_USAGE', `--${name} is required; usage: ${usage}`);
  return v;
}

function noPositionals(positionals: string[], usage: string): void {
  if (positionals.length > 0) throw new BlockrelayError('BR_USAGE', `unexpected argument '${positionals[0]}'; usage: ${usage}`);
}

const LIST_USAGE = 'points list --retention DIR --disk ID [--json]';

/** `blockrelay points list`: the disk's recovery points, oldest first. */
export const pointsListCommand: Command = {
  path: ['points', 'list'],
  usage: LIST_USAGE,
  summary: 'list the recovery points of a disk kept on a retention volume, oldest first',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { retention: { type: 'string' }, disk: { type: 'string' }, json: { type: 'boolean' } }, LIST_USAGE);
    noPositionals(positionals, LIST_USAGE);
    const diskId = validateDiskId(required(values, 'disk', LIST_USAGE));
    const { points } = await loadPoints(required(values, 'retention', LIST_USAGE), diskId);
    const listing = selectablePoints(points).map(listingOf);
    if (values.json === true) writeJson(io, listing);
    else {
      if (listing.length === 0) io.stderr.write(`disk ${diskId} has no recovery point\n`);
      for (const p of listing) io.stderr.write(`${p.time}  ${p.kind.padEnd(5)}  ${p.id}${p.name !== undefined ? `  ${p.name}` : ''}\n`);
    }
    return 0;
  },
};

const FAILOVER_USAGE = 'failover --retention DIR (--disk ID | --group G) --point POINT --out SPEC [--drain-timeout-ms N] [--json]';

function describe(r: FailoverResult): string {
  return `failover ${r.diskId} -> ${r.out}: point ${r.point.id} (${new Date(r.point.timeMs).toISOString()}, ${r.point.kind}${r.point.name !== undefined ? ` "${r.point.name}"` : ''}), ${r.journalSegments} journal segment(s), ${r.drainedLogs} pending log(s) applied first, ${r.copy.durationMs} ms\n`;
}

/**
 * `blockrelay failover`: writes a disk (or every disk of a group, to a
 * common point) as it was at POINT. With `--group`, SPEC must hold `{disk}`
 * when the group has several members.
 */
export const failoverCommand: Command = {
  path: ['failover'],
  usage: FAILOVER_USAGE,
  summary: 'write a disk as it was at a recovery point (latest, latest-processed, latest-app, ISO time, point id) to any disk spec',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(
      argv,
      { retention: { type: 'string' }, disk: { type: 'string' }, group: { type: 'string' }, point: { type: 'string' }, out: { type: 'string' }, 'drain-timeout-ms': { type: 'string' }, json: { type: 'boolean' } },
      FAILOVER_USAGE,
    );
    noPositionals(positionals, FAILOVER_USAGE);
    const retentionDir = required(values, 'retention', FAILOVER_USAGE);
    const point = required(values, 'point', FAILOVER_USAGE);
    const out = required(values, 'out', FAILOVER_USAGE);
    const drainTimeoutMs = parseIntegerOption('drain-timeout-ms', values['drain-timeout-ms'], 10 * 60_000, 1);
    if ((values.disk === undefined) === (values.group === undefined)) throw new BlockrelayError('BR_USAGE', `give exactly one of --disk and --group; usage: ${FAILOVER_USAGE}`);
    const results: FailoverResult[] = [];
    if (values.disk !== undefined) {
      results.push(await failover({ retentionDir, diskId: validateDiskId(values.disk), point, out, drainTimeoutMs }));
    } else {
      const group = values.group!;
      if (point === 'latest') {
        throw new BlockrelayError('BR_USAGE', 'a group fails over to latest-processed, latest-app, a time or a cut: "latest" would drain each member separately and could end on different cuts');
      }
      const { members } = await resolveGroupPoint(retentionDir, group, point);
      if (members.size > 1 && !out.includes('{disk}')) throw new BlockrelayError('BR_USAGE', `group ${group} has ${members.size} disks: --out must hold {disk}`);
      // Every member's point is resolved before the first byte is written.
      for (const [diskId, p] of members) results.push(await failover({ retentionDir, diskId, point: p.id, out: out.replaceAll('{disk}', diskId), drainTimeoutMs }));
    }
    if (values.json === true) writeJson(io, results.map((r) => ({ disk: r.diskId, out: r.out, point: listingOf(r.point), drainedLogs: r.drainedLogs, journalSegments: r.journalSegments, durationMs: r.copy.durationMs })));
    else for (const r of results) io.stderr.write(describe(r));
    return 0;
  },
};

const EXPORT_USAGE = 'export --retention DIR --disk ID --point POINT --listen HOST:PORT';

/** Resolves once SIGTERM or SIGINT arrives; later ones while the export closes are told (stop-signals.ts). */
function untilSignal(stderr: NodeJS.WritableStream): Promise<NodeJS.Signals> {
  return untilStopSignal(tellStopping(stderr, 'closing the export')).signal;
}

/**
 * `blockrelay export`: a read-only NBD export of the disk as it was at
 * POINT, built on the fly from target plus journal, while replication goes
 * on. `latest` is the newest applied point here: a drill does not wait for
 * pending logs. Prints the NBD URI on stderr when ready; SIGTERM exits 0.
 */
export const exportCommand: Command = {
  path: ['export'],
  usage: EXPORT_USAGE,
  summary: 'serve a read-only NBD view of a disk at a recovery point, without copying (drills, test failovers)',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { retention: { type: 'string' }, disk: { type: 'string' }, point: { type: 'string' }, listen: { type: 'string' } }, EXPORT_USAGE);
    noPositionals(positionals, EXPORT_USAGE);
    const retentionDir = required(values, 'retention', EXPORT_USAGE);
    const diskId = validateDiskId(required(values, 'disk', EXPORT_USAGE));
    const spec = required(values, 'point', EXPORT_USAGE);
    const listen = required(values, 'listen', EXPORT_USAGE);
    if (!HOST_PORT_PATTERN.test(listen)) throw new BlockrelayError('BR_USAGE', `--listen expects HOST:PORT, got '${listen}'`);
    const { manifest, point, newestSeq } = await resolveDiskPoint(retentionDir, diskId, spec === 'latest' ? 'latest-processed' : spec);
    // Payloads are checked on first use: the export serves at once, and a damaged pre-image fails the reads that need it.
    const view = await openPointSource(retentionDir, manifest, point, newestSeq, 'first-read');
    const server = new NbdServer({
      exports: [{ name: diskId, description: `${diskId} at ${point.id} (${new Date(point.timeMs).toISOString()})`, readOnly: true, source: view }],
      warn: (message, details) => io.stderr.write(`export ${diskId}: ${message}${details === undefined ? '' : ` ${JSON.stringify(details)}`}\n`),
    });
    try {
      const [host, port] = splitHostPort(listen);
      const signal = untilSignal(io.stderr);
      const addr = await server.listen(host.replace(/^\[(.*)\]$/, '$1'), port);
      const shownHost = addr.host.includes(':') ? `[${addr.host}]` : addr.host;
      io.stderr.write(`export ${diskId} at point ${point.id} (${new Date(point.timeMs).toISOString()}) ready: nbd://${shownHost}:${addr.port}/${diskId}\n`);
      await signal;
      await server.close();
      return 0;
    } finally {
      await view.close();
    }
  },
};

const COMMIT_USAGE = 'commit --retention DIR --disk ID [--json]';

export const commitCommand: Command = {
  path: ['commit'],
  usage: COMMIT_USAGE,
  summary: 'end a failover: keep the failed-over disk and delete the recovery points and journal of the disk',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { retention: { type: 'string' }, disk: { type: 'string' }, json: { type: 'boolean' } }, COMMIT_USAGE);
    noPositionals(positionals, COMMIT_USAGE);
    const result = await commitFailover(required(values, 'retention', COMMIT_USAGE), validateDiskId(required(values, 'disk', COMMIT_USAGE)));
    if (values.json === true) writeJson(io, result);
    else io.stderr.write(`commit ${result.diskId}: failover to ${result.pointId} on ${result.out} kept; ${result.pointsDeleted} point(s) and ${result.journalBytesFreed} journal bytes deleted\n`);
    return 0;
  },
};

const STATUS_USAGE = 'retention status --retention DIR [--json]';

export const retentionStatusCommand: Command = {
  path: ['retention', 'status'],
  usage: STATUS_USAGE,
  summary: 'report the space the history on a retention volume uses, per disk',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { retention: { type: 'string' }, json: { type: 'boolean' } }, STATUS_USAGE);
    noPositionals(positionals, STATUS_USAGE);
    const usage = await retentionUsage(required(values, 'retention', STATUS_USAGE));
    if (values.json === true) writeJson(io, usage);
    else {
      io.stderr.write(`${usage.dir}: ${usage.usedBytes} bytes of history, ${usage.volumeAvailableBytes} of ${usage.volumeTotalBytes} bytes free on the volume\n`);
      for (const d of usage.disks) io.stderr.write(`  ${d.diskId}: ${d.points} point(s) ${d.oldestPointTime ?? '-'} .. ${d.newestPointTime ?? '-'}, ${d.journalSegments} segment(s), ${d.journalBytes} bytes on the volume (${d.journalApparentBytes} long)${d.failedOver ? ', failed over' : ''}${d.failoverIncomplete ? ', failover did not finish' : ''}\n`);
    }
    return 0;
  },
};

export function retentionCommands(): Command[] {
  return [pointsListCommand, failoverCommand, exportCommand, commitCommand, retentionStatusCommand];
}
