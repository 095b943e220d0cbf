import * as fsp from 'node:fs/promises';
import type { Command, CommandIo } from '../daemon/command';
import { parseCommandArgs, parseIntegerOption, writeJson } from '../daemon/command';
import { BlockrelayError, isBlockrelayError, wrapError } from '../retry/blockrelay-error';
import { openDisk } from '../targets/disk-spec';
import { applyHrlLogs } from './hrl-apply';
import { HRL_HEADER_SIZE, decodeHrlHeader, hrlTimestampToIso, type HrlHeader } from './hrl-format';
import { HrlLogFile, type HrlVerifiedLog } from './hrl-reader';
import { recoverHrlLog } from './hrl-recovery';

/** Entries `hrl inspect` lists unless `--limit` says otherwise (the count is always complete). */
export const HRL_INSPECT_DEFAULT_LIMIT = 10_000;

function headerJson(h: HrlHeader): Record<string, unknown> {
  return {
    cookie: h.cookie.toString('latin1').replace(/\0+$/, ''),
    logFormatVersion: `0x${h.logFormatVersion.toString(16).padStart(8, '0')}`,
    timestamp: h.timestamp,
    time: hrlTimestampToIso(h.timestamp),
    creatorApplication: h.creatorApplication.toString('latin1').replace(/\0+$/, ''),
    creatorVersion: `0x${h.creatorVersion.toString(16).padStart(8, '0')}`,
    originalSize: h.originalSize,
    currentSize: h.currentSize,
    checksum: `0x${h.checksum.toString(16).padStart(8, '0')}`,
    eolLocation: h.eolLocation,
    errorCode: h.errorCode,
    metadataSize: h.metadataSize,
    uniqueId: h.uniqueId,
    previousUniqueId: h.previousUniqueId,
    lastModifiedTimestamp: h.lastModifiedTimestamp,
    lastModifiedTime: hrlTimestampToIso(h.lastModifiedTimestamp),
    totalMetadataEntries: h.totalMetadataEntries,
    fileType: h.fileType,
    flags: h.flags,
    vhd2DataWriteGuid: h.vhd2DataWriteGuid,
  };
}

interface InspectEntry {
  index: number;
  byteOffset: number;
  dataLength: number;
  timestamp: number;
  dataChecksum: string;
  payloadFileOffset: number;
}

/** Reads the raw header for display even when verification refuses it. */
async function rawHeader(file: string): Promise<HrlHeader | undefined> {
  try {
    const fh = await fsp.open(file, 'r');
    try {
      const buf = Buffer.alloc(HRL_HEADER_SIZE);
      const { bytesRead } = await fh.read(buf, 0, HRL_HEADER_SIZE, 0);
      return bytesRead === HRL_HEADER_SIZE ? decodeHrlHeader(buf) : undefined;
    } finally {
      await fh.close();
    }
  } catch {
    return undefined;
  }
}

const inspectUsage = 'hrl inspect FILE [--json] [--limit N] [--disk-size BYTES]';

const inspect: Command = {
  path: ['hrl', 'inspect'],
  usage: inspectUsage,
  summary: 'validate an [MS-HRL] log fully; print header, metadata blocks, entries and the verdict',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { json: { type: 'boolean' }, limit: { type: 'string' }, 'disk-size': { type: 'string' } }, inspectUsage);
    if (positionals.length !== 1) throw new BlockrelayError('BR_USAGE', `expected one FILE; usage: ${inspectUsage}`);
    const file = positionals[0]!;
    const limit = parseIntegerOption('limit', values.limit, HRL_INSPECT_DEFAULT_LIMIT);
    const diskSize = values['disk-size'] === undefined ? undefined : parseIntegerOption('disk-size', values['disk-size'], 0, 1);
    let verified: HrlVerifiedLog | undefined;
    let failure: BlockrelayError | undefined;
    const entries: InspectEntry[] = [];
    let log: HrlLogFile | undefined;
    try {
      log = await HrlLogFile.open(file);
      verified = await log.verify({ diskSizeBytes: diskSize });
      for await (const e of log.entries(verified)) {
        if (entries.length >= limit) break;
        entries.push({ index: e.index, byteOffset: e.byteOffset, dataLength: e.dataLength, timestamp: e.timestamp, dataChecksum: `0x${e.dataChecksum.toString(16).padStart(8, '0')}`, payloadFileOffset: e.payloadFileOffset });
      }
    } catch (err) {
      if (!isBlockrelayError(err)) throw wrapError(err, 'BR_INTERNAL', `inspecting ${file}`);
      if (!err.code.startsWith('BR_HRL_')) throw err;
      failure = err;
    } finally {
      await log?.close();
    }
    const header = verified?.header ?? (await rawHeader(file));
    if (values.json === true) {
      writeJson(io, {
        file,
        verdict: failure === undefined ? 'valid' : 'damaged',
        error: failure === undefined ? null : { code: failure.code, message: failure.message, offset: failure.details.offset ?? null },
        header: header === undefined ? null : headerJson(header),
        blocks: verified?.blocks.map((b) => ({ offset: b.offset, previousMetadataLocation: b.previousMetadataLocation, validEntries: b.validEntries, payloadStart: b.payloadStart })) ?? null,
        entryCount: verified?.entryCount ?? null,
        payloadBytes: verified?.payloadBytes ?? null,
        unverifiedPayloads: verified?.unverifiedPayloads ?? null,
        entries: verified === undefined ? null : entries,
        entriesTruncated: verified !== undefined && entries.length < verified.entryCount,
      });
    } else {
      const out: string[] = [`file: ${file}`];
      if (header !== undefined) {
        for (const [k, v] of Object.entries(headerJson(header))) out.push(`  ${k}: ${String(v)}`);
      }
      if (verified !== undefined) {
        out.push(`metadata blocks: ${verified.blocks.length}`);
        for (const b of verified.blocks) out.push(`  block at ${b.offset}: ${b.validEntries} entries, payloads from ${b.payloadStart}`);
        out.push(`entries: ${verified.entryCount} (${verified.payloadBytes} payload bytes, ${verified.unverifiedPayloads} without DataChecksum)`);
        for (const e of entries) out.push(`  #${e.index} offset ${e.byteOffset} length ${e.dataLength} at ${hrlTimestampToIso(e.timestamp)} data checksum ${e.dataChecksum}`);
        if (entries.length < verified.entryCount) out.push(`  ... ${verified.entryCount - entries.length} more (raise --limit)`);
      }
      out.push(`verdict: ${failure === undefined ? 'valid' : `damaged (${failure.code})`}`);
      io.stdout.write(`${out.join('\n')}\n`);
    }
    if (failure !== undefined) throw failure;
    return 0;
  },
};

const applyUsage = 'hrl apply TARGET FILE... [--no-chain-check] [--json]';

const apply: Command = {
  path: ['hrl', 'apply'],
  usage: applyUsage,
  summary: 'validate every log fully, then apply them in the given order to a disk spec (target untouched on any failure)',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { json: { type: 'boolean' }, 'no-chain-check': { type: 'boolean' } }, applyUsage);
    if (positionals.length < 2) throw new BlockrelayError('BR_USAGE', `expected TARGET and at least one FILE; usage: ${applyUsage}`);
    const [spec, ...files] = positionals as [string, ...string[]];
    const target = await openDisk(spec);
    let result;
    try {
      result = await applyHrlLogs(target, files, { checkChain: values['no-chain-check'] !== true });
    } finally {
      await target.close();
    }
    const logs = result.logs.map((l) => ({ file: l.path, uniqueId: l.header.uniqueId, entryCount: l.entryCount, payloadBytes: l.payloadBytes }));
    if (values.json === true) {
      writeJson(io, { target: spec, logs, entriesApplied: result.entriesApplied, bytesApplied: result.bytesApplied });
    } else {
      io.stderr.write(`applied ${files.length} log(s), ${result.entriesApplied} entries, ${result.bytesApplied} bytes to ${spec}\n`);
    }
    return 0;
  },
};

const recoverUsage = 'hrl recover FILE [--json]';

const recover: Command = {
  path: ['hrl', 'recover'],
  usage: recoverUsage,
  // Strict: a payload that fails its checksum ends the log. A source's open
  // log may hold an in-place rewrite torn by a power loss below blocks a
  // FLUSH made durable; only the tracker knows that bound (its maps), so a
  // tracker directory is recovered by starting the source, not by this.
  summary: 'seal a log left open by a crash: keep its durable metadata blocks, cut the torn tail (a sealed log is left as it is). Strict: for a source\'s tracker directory start the source instead, which knows where a torn in-place rewrite may lie',
  async run(argv: string[], io: CommandIo): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { json: { type: 'boolean' } }, recoverUsage);
    if (positionals.length !== 1) throw new BlockrelayError('BR_USAGE', `expected one FILE; usage: ${recoverUsage}`);
    const file = positionals[0]!;
    const r = await recoverHrlLog(file);
    const doc = { file, wasUnsealed: r.wasUnsealed, entryCount: r.entryCount, blocks: r.blocks.length, eolLocation: r.durableEndBytes, discardedBytes: r.discardedBytes, uniqueId: r.header.uniqueId };
    if (values.json === true) writeJson(io, doc);
    else if (r.wasUnsealed) io.stderr.write(`sealed ${file}: ${r.entryCount} entries in ${r.blocks.length} blocks kept, ${r.discardedBytes} torn bytes cut\n`);
    else io.stderr.write(`${file} was already sealed; left as it is\n`);
    return 0;
  },
};

/** The `blockrelay hrl …` commands. */
export function hrlCommands(): Command[] {
  return [inspect, apply, recover];
}
