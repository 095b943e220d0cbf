import * as fsp from 'node:fs/promises';
import { systemClock, type Clock } from '../platform/clock';
import { isBlockrelayError, wrapError } from '../retry/blockrelay-error';
import {
  HRL_HEADER_SIZE,
  HRL_ME_CHECKSUM_OFFSET,
  HRL_ME_DATA_CHECKSUM_OFFSET,
  HRL_MH_PREVIOUS_LOCATION_OFFSET,
  computeHrlMetadataEntryChecksum,
  encodeHrlHeader,
  encodeHrlMetadataHeader,
  hrlTimestampFromMs,
  type HrlHeader,
} from './hrl-format';
import { HrlLogFile, checkBlockEntries, type HrlBlockInfo, type HrlTornEntry } from './hrl-reader';

/** How much of the file the forward scan reads at once. */
const SCAN_WINDOW_BYTES = 1024 * 1024;

export interface HrlRecoveryScan {
  readonly header: HrlHeader;
  /** Durable, fully valid blocks in file order (the anchor first). Empty when even the anchor is damaged. */
  readonly blocks: readonly HrlBlockInfo[];
  readonly entryCount: number;
  /** End of the last valid block: everything after it is the torn tail. */
  readonly durableEndBytes: number;
  readonly fileSizeBytes: number;
  /**
   * Entries of accepted blocks below `rewritableBelowBytes` whose payload
   * fails its DataChecksum: in-place rewrites a power loss tore. In file order.
   */
  readonly tornEntries: readonly HrlTornEntry[];
}

/** How to scan an unsealed log. */
export interface HrlScanOptions {
  /** Remembered block ends tried first (see scanUnsealedHrlLog). */
  readonly hintEndBytes?: readonly number[];
  /**
   * End of the part of the log a flush once made durable (the tracker's
   * persisted `durableLogEndBytes`; 0, the default, is strict everywhere).
   * A block ending at or below it is accepted when its structure and entry
   * checksums hold, even if payloads fail their DataChecksum: the writer
   * rewrites an entry and its payload in place when the same extent is
   * written again, and a power loss can tear that rewrite long after the
   * block was durable. Past it a bad payload is a torn append and ends the log.
   */
  readonly rewritableBelowBytes?: number;
}

export interface HrlRecoveredLog extends HrlRecoveryScan {
  /** Bytes cut off the end (the torn tail). */
  readonly discardedBytes: number;
  /** False when the log was already sealed and left as it was. */
  readonly wasUnsealed: boolean;
}

/**
 * Finds the durable part of an unsealed log (EOLLocation 0).
 *
 * blockrelay's writer starts every log with an empty anchor block at 4096,
 * and every later block stores in PreviousMetadataLocation its distance from
 * the block before. So, starting from a block at `b`, the next block is the
 * first position `q` after `b + MetadataSize` whose first 8 bytes equal
 * `q − b` and whose block passes every check the reader makes: header and
 * entry checksums, fields, payload lengths filling `[b + MetadataSize, q)`
 * exactly, and every payload's DataChecksum. The scan stops at the first
 * block it cannot find; what follows is the torn tail.
 *
 * `hintEndBytes`, ends remembered elsewhere (the change tracker keeps the
 * end its last flush made durable and the end the next one will), are tried
 * first, in order: if the chain ending at one verifies back to the anchor,
 * only what follows it is scanned.
 *
 * Below `rewritableBelowBytes` (both in the hint chain and in the forward
 * scan) a payload failing its DataChecksum does not reject its block; the
 * entry is reported in `tornEntries` instead.
 */
export async function scanUnsealedHrlLog(filePath: string, options: HrlScanOptions = {}): Promise<HrlRecoveryScan> {
  const rewritableBelow = options.rewritableBelowBytes ?? 0;
  const log = await HrlLogFile.open(filePath);
  try {
    const header = await log.readHeader();
    const ms = header.metadataSize;
    const blocks: HrlBlockInfo[] = [];
    const block = Buffer.alloc(ms);
    let entryCount = 0;
    let tornEntries: HrlTornEntry[] = [];

    const tryBlock = async (q: number, payloadStart: number): Promise<HrlBlockInfo | undefined> => {
      if (q + ms > log.fileSizeBytes) return undefined;
      await log.readExact(q, ms, 'metadata block', block);
      try {
        const checked = checkBlockEntries(block, q, payloadStart, filePath, {});
        // Torn entries count only once their block is accepted.
        const torn: HrlTornEntry[] | undefined = q + ms <= rewritableBelow ? [] : undefined;
        await log.verifyPayloads(block, q, payloadStart, checked.validEntries, torn);
        if (torn !== undefined) for (const t of torn) tornEntries.push(t);
        return { offset: q, previousMetadataLocation: checked.previousMetadataLocation, validEntries: checked.validEntries, payloadStart };
      } catch (err) {
        if (isBlockrelayError(err) && err.code.startsWith('BR_HRL_')) return undefined;
        throw err;
      }
    };

    // A remembered durable end (the tracker records one with its maps) lets
    // the proven part be checked with the backward walk instead of scanned.
    for (const hint of options.hintEndBytes ?? []) {
      if (blocks.length > 0) break;
      if (!Number.isSafeInteger(hint) || hint < HRL_HEADER_SIZE + 2 * ms || hint > log.fileSizeBytes) continue;
      try {
        const torn: HrlTornEntry[] = [];
        const chain = await log.verifyChain(hint - ms, ms, {}, undefined, { rewritableBelowBytes: rewritableBelow, torn });
        if (chain.blocks[0]?.offset === HRL_HEADER_SIZE) {
          tornEntries = torn;
          // One push per block: a spread of a long chain (~120 000 blocks, a
          // flush-per-write log) overflows V8's stack as call arguments.
          for (const b of chain.blocks) blocks.push(b);
          entryCount = chain.entryCount;
        }
      } catch (err) {
        if (!(isBlockrelayError(err) && err.code.startsWith('BR_HRL_'))) throw err;
      }
    }
    const anchor = blocks.length > 0 ? blocks[0] : await tryBlock(HRL_HEADER_SIZE, HRL_HEADER_SIZE);
    if (anchor !== undefined && anchor.previousMetadataLocation === 0) {
      if (blocks.length === 0) blocks.push(anchor);
      let b = blocks[blocks.length - 1]!.offset;
      const window = Buffer.alloc(SCAN_WINDOW_BYTES + 8);
      let q = b + ms;
      while (q + ms <= log.fileSizeBytes) {
        const n = Math.min(window.length, log.fileSizeBytes - q);
        await log.readExact(q, n, 'tail', window);
        let found: HrlBlockInfo | undefined;
        let i = 0;
        // The low byte of the distance, advanced with i: one byte compare per
        // position rejects 255 of 256 positions before any wider read.
        let low = (q - b) & 0xff;
        for (; i + 8 <= n; i++, low = (low + 1) & 0xff) {
          if (window[i + HRL_MH_PREVIOUS_LOCATION_OFFSET] !== low) continue;
          const distance = q + i - b;
          if (window.readUInt32LE(i + HRL_MH_PREVIOUS_LOCATION_OFFSET) !== distance % 0x1_0000_0000) continue;
          if (window.readUInt32LE(i + HRL_MH_PREVIOUS_LOCATION_OFFSET + 4) !== Math.floor(distance / 0x1_0000_0000)) continue;
          found = await tryBlock(q + i, b + ms);
          if (found !== undefined) break;
        }
        if (found !== undefined) {
          blocks.push(found);
          entryCount += found.validEntries;
          b = found.offset;
          q = b + ms;
          continue;
        }
        // Every position up to q + i − 1 was checked; the last 7 bytes of a
        // window are checked again at the start of the next one.
        if (n < window.length) break;
        q += i;
      }
    }
    const last = blocks[blocks.length - 1];
    return { header, blocks, entryCount, durableEndBytes: last === undefined ? HRL_HEADER_SIZE : last.offset + ms, fileSizeBytes: log.fileSizeBytes, tornEntries };
  } finally {
    await log.close();
  }
}

/**
 * Recovers a log left unsealed by a crash: keeps the durable blocks, cuts
 * the torn tail, and seals it (EOLLocation, CurrentSize,
 * TotalMetadataEntries, LastModifiedTimeStamp, checksum; UniqueId and the
 * other identity fields kept). A log whose anchor block is damaged gets a
 * fresh anchor and is sealed empty. A sealed log is left untouched.
 *
 * Each torn rewrite found below `rewritableBelowBytes` gets a DataChecksum
 * over the bytes present and a new entry Checksum before the seal, so the
 * sealed log verifies. Those bytes are a state the disk itself could show
 * for a write not yet acknowledged durable (the previous version was), and
 * the caller resyncs the extent anyway (`tornEntries`).
 */
export async function recoverHrlLog(filePath: string, options: HrlScanOptions & { clock?: Clock } = {}): Promise<HrlRecoveredLog> {
  const clock = options.clock ?? systemClock;
  const scan = await scanUnsealedHrlLog(filePath, options);
  if (scan.header.eolLocation !== 0) return { ...scan, discardedBytes: 0, wasUnsealed: false };
  const ms = scan.header.metadataSize;
  let end = scan.durableEndBytes;
  try {
    const fh = await fsp.open(filePath, 'r+');
    try {
      if (scan.blocks.length === 0) {
        const anchor = Buffer.alloc(ms);
        encodeHrlMetadataHeader({ previousMetadataLocation: 0, validMetadataEntries: 0 }, anchor, 0);
        await fh.write(anchor, 0, ms, HRL_HEADER_SIZE);
        end = HRL_HEADER_SIZE + ms;
      }
      for (const t of scan.tornEntries) {
        const entry = Buffer.from(t.entry);
        entry.writeUInt32LE(t.actualChecksum, HRL_ME_DATA_CHECKSUM_OFFSET);
        entry.writeUInt32LE(computeHrlMetadataEntryChecksum(entry), HRL_ME_CHECKSUM_OFFSET);
        // One 32-byte write inside one sector: a crash leaves the old entry
        // or the new one, and a second recovery finds the same torn entries.
        await fh.write(entry, 0, entry.length, t.entryFileOffset);
      }
      await fh.truncate(end);
      await fh.datasync();
      const h = scan.header;
      const header = encodeHrlHeader({
        timestamp: h.timestamp,
        creatorApplication: h.creatorApplication,
        creatorVersion: h.creatorVersion,
        errorCode: h.errorCode,
        originalSize: h.originalSize,
        currentSize: end,
        eolLocation: end,
        metadataSize: ms,
        uniqueId: h.uniqueId,
        previousUniqueId: h.previousUniqueId,
        lastModifiedTimestamp: hrlTimestampFromMs(clock.now()),
        totalMetadataEntries: scan.entryCount,
        vhd2DataWriteGuid: h.vhd2DataWriteGuid,
      });
      await fh.write(header, 0, header.length, 0);
      await fh.datasync();
    } finally {
      await fh.close();
    }
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot seal recovered HRL log ${filePath}`);
  }
  return { ...scan, durableEndBytes: end, discardedBytes: scan.fileSizeBytes - end, wasUnsealed: true };
}
