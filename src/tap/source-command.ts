import { SOURCE_ROLE_DEFAULTS, SourceRole } from './source-role';
import { parseCommandArgs, parseIntegerOption, type Command } from '../daemon/command';
import { createLogger } from '../daemon/logger';
import { StateLock } from '../daemon/state-lock';
import { createMetrics } from '../daemon/metrics';
import { resolvesWithin, systemClock } from '../platform/clock';
import { exitNow } from '../platform/exit-now';
import { SourceShipping } from '../transport/source-shipping';
import { SourceControl } from '../daemon/source-control';
import { CONTROL_SECRET_ENV } from '../daemon/tag-command';
import { ChangeTracker } from '../tracking/change-tracker';
import { BlockrelayError } from '../retry/blockrelay-error';
import type { DiskTarget } from '../targets/disk-target';
import { openDisk } from '../targets/disk-spec';
import { SourceResyncs } from '../resync/source-resyncs';
import * as path from 'node:path';
import { tellStopping, untilStopSignal } from '../daemon/stop-signals';

const usage = 'source --disk ID=SPEC [--disk ID=SPEC ...] --listen HOST:PORT --log-dir DIR [--process-server URL] [--interval-ms N] [--control HOST:PORT] [--quiesce-hook CMD] [--app-interval-minutes N] [--group G] [--stop-timeout-ms N]';

/** The environment variable holding the process server's shared secret (a secret on a command line is visible to every user). */
export const PROCESS_SERVER_SECRET_ENV = 'BLOCKRELAY_SECRET';

/** How long SIGTERM waits for sealed logs to reach the process server before exiting anyway. */
const SHIP_ON_STOP_TIMEOUT_MS = 60_000;

/**
 * After a stop that ran out of time, how long the process lingers (for its
 * error line and logs to go out) before it exits although a disk still holds
 * some of its I/O: a pending export close would keep the event loop alive,
 * and process.exit would wait for a libuv pool thread in the hung disk's
 * fdatasync. (A thread the kernel holds uninterruptibly, in a request the
 * disk already took, still delays the end until the disk answers: nothing,
 * not even SIGKILL, ends a process before that.)
 */
const EXIT_AFTER_STOP_TIMEOUT_MS = 500;

/** The line a supervisor (or a test) waits for, followed by one JSON object. */
export const SOURCE_READY_PREFIX = 'BLOCKRELAY_SOURCE_READY ';

/** The NBD port IANA reserved, used when --listen names none. */
const NBD_DEFAULT_PORT = 10809;

/**
 * Parses `--listen`: `HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT` (loopback),
 * or `HOST` alone (default port). The default host is 127.0.0.1: exposing a
 * protected disk beyond this machine must be asked for.
 */
export function parseListen(value: string | undefined): { host: string; port: number } {
  if (value === undefined || value === '') return { host: '127.0.0.1', port: NBD_DEFAULT_PORT };
  let host: string;
  let portText: string | undefined;
  const v6 = /^\[([^\]]+)\](?::(\d*))?$/.exec(value);
  if (v6) {
    host = v6[1]!;
    portText = v6[2];
  } else if (/^\d+$/.test(value)) {
    host = '';
    portText = value;
  } else {
    const colon = value.lastIndexOf(':');
    if (colon >= 0 && value.indexOf(':') !== colon) throw new BlockrelayError('BR_USAGE', `--listen '${value}': write IPv6 addresses as [ADDR]:PORT`);
    host = colon >= 0 ? value.slice(0, colon) : value;
    portText = colon >= 0 ? value.slice(colon + 1) : undefined;
  }
  const port = portText === undefined || portText === '' ? NBD_DEFAULT_PORT : parseIntegerOption('listen port', portText, NBD_DEFAULT_PORT, 0, 65535);
  return { host: host === '' ? '127.0.0.1' : host, port };
}

/** Parses the `--disk ID=SPEC` flags, refusing duplicates and empty parts. */
export function parseDiskFlags(values: readonly string[]): { id: string; spec: string }[] {
  if (values.length === 0) throw new BlockrelayError('BR_USAGE', `at least one --disk ID=SPEC is required; usage: ${usage}`);
  const seen = new Set<string>();
  return values.map((v) => {
    const eq = v.indexOf('=');
    if (eq <= 0 || eq === v.length - 1) throw new BlockrelayError('BR_USAGE', `--disk expects ID=SPEC, got '${v}'`);
    const id = v.slice(0, eq);
    if (seen.has(id)) throw new BlockrelayError('BR_USAGE', `--disk ${id} is given twice`);
    seen.add(id);
    return { id, spec: v.slice(eq + 1) };
  });
}

/**
 * `blockrelay source`: the source tap role. Serves each protected disk as an
 * NBD export named by its id, records every write in the disk's change
 * tracker, and seals all disks' logs at one cut every `--interval-ms`, or
 * sooner once any disk's active log holds SOURCE_ROLE_DEFAULTS.cutBytes (no
 * flag: the command line is DESIGN.md's contract).
 * Without `--process-server` the sealed logs stay in `--log-dir` as
 * `ID-SEQUENCE.hrl`, lexical order being apply order per disk. With it, each
 * sealed log is shipped to the process server (shared secret from
 * BLOCKRELAY_SECRET) and deleted after its durable answer, and a disk whose
 * tracker overflowed is resynced through the log stream; with `--control`
 * too, an operator can start a networked block resync of a disk
 * (`POST /v1/disks/{disk}/resync`). SIGTERM or SIGINT
 * finishes the NBD requests in flight, seals the active logs, ships them
 * (within a bound) and exits 0. A stop that takes longer than
 * `--stop-timeout-ms` (30 s by default; a disk that hangs) exits 1 with a
 * BR_TAP_STOP_TIMEOUT line naming the logs not sealed, the disks not
 * flushed and the requests not answered; unsealed logs are recovered at the
 * next start.
 */
export const sourceCommand: Command = {
  path: ['source'],
  usage,
  summary: 'serve protected disks over NBD and record every write in MS-HRL change logs',
  async run(argv, io) {
    const { values, positionals } = parseCommandArgs(
      argv,
      {
        disk: { type: 'string', multiple: true },
        listen: { type: 'string' },
        'log-dir': { type: 'string' },
        'interval-ms': { type: 'string' },
        'process-server': { type: 'string' },
        control: { type: 'string' },
        'quiesce-hook': { type: 'string' },
        'app-interval-minutes': { type: 'string' },
        group: { type: 'string' },
        'stop-timeout-ms': { type: 'string' },
      },
      usage,
    );
    if (positionals.length > 0) throw new BlockrelayError('BR_USAGE', `unexpected argument '${positionals[0]}'; usage: ${usage}`);
    const disks = parseDiskFlags(values.disk ?? []);
    const logDir = values['log-dir'];
    if (logDir === undefined || logDir === '') throw new BlockrelayError('BR_USAGE', `--log-dir is required; usage: ${usage}`);
    const listen = parseListen(values.listen);
    const intervalMs = parseIntegerOption('interval-ms', values['interval-ms'], SOURCE_ROLE_DEFAULTS.intervalMs, 10, 24 * 60 * 60 * 1000);
    const stopTimeoutMs = parseIntegerOption('stop-timeout-ms', values['stop-timeout-ms'], SOURCE_ROLE_DEFAULTS.stopTimeoutMs, 100, 24 * 60 * 60 * 1000);
    const logger = createLogger({ name: 'source' });
    const control = values.control === undefined ? undefined : parseListen(values.control);
    const appIntervalMs = parseIntegerOption('app-interval-minutes', values['app-interval-minutes'], 60, 0, 24 * 60) * 60_000;
    const group = values.group;
    if (group !== undefined && !/^[A-Za-z0-9._-]{1,64}$/.test(group)) throw new BlockrelayError('BR_USAGE', `--group must be 1 to 64 letters, digits, ".", "_" or "-", got '${group}'`);
    const processServer = values['process-server'];
    if (processServer !== undefined && !/^https?:\/\/[^\s/]+/.test(processServer)) throw new BlockrelayError('BR_USAGE', `--process-server expects an http(s) URL, got '${processServer}'`);
    const secret = process.env[PROCESS_SERVER_SECRET_ENV];
    if (processServer !== undefined && (secret === undefined || secret.length < 16)) {
      throw new BlockrelayError('BR_USAGE', `--process-server needs the process server's shared secret (16 characters or more) in ${PROCESS_SERVER_SECRET_ENV}`);
    }

    const lock = new StateLock(logDir);
    lock.acquire();
    const opened: { id: string; target: DiskTarget }[] = [];
    let role: SourceRole;
    let shipping: SourceShipping | undefined;
    let controlApi: SourceControl | undefined;
    let resyncs: SourceResyncs | undefined;
    const metrics = createMetrics();
    try {
      for (const d of disks) opened.push({ id: d.id, target: await openDisk(d.spec) });
      role = await SourceRole.start({ disks: opened, logDir, listenHost: listen.host, listenPort: listen.port, intervalMs, logger, onSealed: () => shipping?.sealed() });
      if (processServer !== undefined) {
        shipping = new SourceShipping({
          trackers: role.trackers,
          peer: { url: processServer, secret: secret! },
          clock: systemClock,
          logger,
          metrics,
          ...(group === undefined ? {} : { group }),
          readers: new Map(opened.map((o) => [o.id, (offset: number, length: number) => o.target.read(offset, length)])),
        });
        shipping.start();
      }
      if (control !== undefined) {
        const started = role;
        // With a process server, the control API also runs an operator's
        // networked resync of a disk (lost tracking, first sync onto an
        // existing target): POST /v1/disks/{disk}/resync.
        if (processServer !== undefined) {
          resyncs = new SourceResyncs({
            diskSpecs: new Map(disks.map((d) => [d.id, d.spec])),
            peer: { url: processServer, secret: secret! },
            stateDir: path.join(logDir, 'resync'),
            cut: async (id) => {
              const [sealed] = await ChangeTracker.cut([started.trackers.get(id)!]);
              shipping?.sealed();
              return sealed?.sequence;
            },
            clock: systemClock,
            logger,
          });
        }
        controlApi = new SourceControl({
          ...(resyncs === undefined ? {} : { extraRoutes: resyncs.routes() }),
          diskIds: opened.map((o) => o.id),
          group,
          // With shipping, a tagged cut ships at once; without, it stays in --log-dir like every cut.
          cut: async (ids, appTag) => {
            if (shipping !== undefined) return shipping.cutWithTag(ids, appTag);
            return ChangeTracker.cutAppConsistent(ids.map((id) => started.trackers.get(id)!), appTag);
          },
          status: () => ({ role: 'source', disks: shipping?.status() ?? [...started.trackers.values()].map((t) => trackerStatus(t)) }),
          hook: values['quiesce-hook'] === undefined ? undefined : { command: values['quiesce-hook'] },
          appIntervalMs,
          secret: process.env[CONTROL_SECRET_ENV],
          clock: systemClock,
          logger,
          metrics,
        });
        const url = await controlApi.listen(control.host, control.port);
        io.stderr.write(`source: control and status at ${url}\n`);
        // A resync interrupted by the last stop (or a crash) goes on from its
        // saved progress, or only confirms its end, now that the source
        // serves, ships and answers its status: until it ends, the hop makes
        // no recovery points for that disk.
        for (const id of resyncs?.resumeInterrupted() ?? []) io.stderr.write(`source: resuming the interrupted resync of disk ${id}\n`);
      }
    } catch (err) {
      await controlApi?.close().catch(() => undefined);
      await resyncs?.stop().catch(() => undefined);
      await shipping?.stop().catch(() => undefined);
      for (const o of opened) await o.target.close().catch(() => undefined);
      lock.release();
      throw err;
    }

    for (const [id, uri] of Object.entries(role.exportUris)) io.stderr.write(`source: disk ${id} at ${uri}\n`);
    io.stderr.write(`${SOURCE_READY_PREFIX}${JSON.stringify({ listen: `${role.address.host}:${role.address.port}`, exports: role.exportUris, logDir, ...(controlApi === undefined ? {} : { control: controlApi.url }) })}\n`);

    const signal = await untilStopSignal(tellStopping(io.stderr, 'stopping: finishing NBD requests and sealing the active logs')).signal;
    logger.info({ signal }, 'stopping: finishing NBD requests and sealing the active logs');
    // The bound starts at the signal and covers every step that can wait on
    // a disk: the resyncs' stop as well as the role's.
    const stopStartedMs = Date.now();
    // After a stop that ran out of time the process may live on (a thread
    // stuck in the hung disk) with a disk or log write in flight: the state
    // lock stays, so no second instance recovers this log dir and resyncs
    // under that write. The pid check takes the lock over once the pid is gone.
    let timedOut = false;
    try {
      // No scheduled app-consistent cut may start while the trackers close.
      controlApi?.tagger.stop();
      // A running resync stops with its progress saved; the next start
      // resumes it. One whose read (or cut) waits on a hung disk never
      // settles: it gets a third of the bound, the role's seal the rest.
      const resyncsStopped = resyncs === undefined || (await resolvesWithin(resyncs.stop().catch(() => undefined), Math.floor(stopTimeoutMs / 3)));
      const resyncsLeft = resyncsStopped ? [] : disks.map((d) => d.id).filter((id) => resyncs!.state(id).state === 'running');
      const resyncPart = resyncsLeft.length > 0 ? `the resync of disk ${resyncsLeft.join(', ')} still waits (its progress up to the last checkpoint is saved)` : undefined;
      try {
        await role.stop(SOURCE_ROLE_DEFAULTS.shutdownGraceMs, Math.max(1, stopTimeoutMs - (Date.now() - stopStartedMs)), stopTimeoutMs);
        if (resyncPart !== undefined) {
          throw new BlockrelayError('BR_TAP_STOP_TIMEOUT', `source did not stop within ${stopTimeoutMs} ms (waiting at step 'resync'): every active log sealed; ${resyncPart}`, { details: { step: 'resync', resyncsRunning: resyncsLeft.join(','), timeoutMs: stopTimeoutMs } });
        }
      } catch (err) {
        if (err instanceof BlockrelayError && err.code === 'BR_TAP_STOP_TIMEOUT') {
          timedOut = true;
          // The exit is armed first: shipping's stop waits for an upload in
          // flight, the control API's close for its connections, and neither
          // may hold the error line or the exit past the bound. Sealed logs
          // go out at the next start; an upload cut off is only an attempt.
          // The CLI prints the error line and sets the exit status from it,
          // then this timer ends the process although a thread stays stuck
          // in the hung disk.
          setTimeout(() => exitNow(typeof process.exitCode === 'number' ? process.exitCode : 1), EXIT_AFTER_STOP_TIMEOUT_MS).unref();
          void shipping?.stop().catch(() => undefined);
          void controlApi?.close().catch(() => undefined);
          if (resyncPart !== undefined && err.details.step !== 'resync') {
            throw new BlockrelayError('BR_TAP_STOP_TIMEOUT', `${err.message}; ${resyncPart}`, { cause: err, details: { ...err.details, resyncsRunning: resyncsLeft.join(',') } });
          }
        }
        throw err;
      }
      if (shipping !== undefined && !(await shipping.finish(SHIP_ON_STOP_TIMEOUT_MS))) {
        logger.warn({}, 'sealed logs not yet shipped stay in the log directory and go out at the next start');
      }
      await controlApi?.close();
    } finally {
      if (!timedOut) lock.release();
    }
    return 0;
  },
};

/** Per-disk status of a source that does not ship (its logs stay in --log-dir). */
function trackerStatus(tracker: ChangeTracker) {
  const t = tracker.status();
  return {
    diskId: t.diskId,
    health: t.resyncRequired ? 'Warning' : 'OK',
    reasons: t.resyncRequired ? [`RESYNC_PENDING: ${t.resyncBytes} bytes need a resync (${t.lastResyncReason ?? 'unknown'})`] : [],
    mode: t.mode,
    pendingBytes: t.unshippedBytes,
    sealedLogs: t.sealedLogs,
    resyncRequired: t.resyncRequired,
    resyncBytes: t.resyncBytes,
  };
}
