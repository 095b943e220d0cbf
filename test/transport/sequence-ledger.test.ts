import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Readable } from 'node:stream';
import type { BlockrelayError } from '../../src/retry/blockrelay-error';
import { statusForError } from '../../src/transport/http-api';
import { LogReceiver } from '../../src/transport/log-receiver';
import { hashHex, LogSpool, newXxhash64 } from '../../src/transport/log-spool';
import { LEDGER_SKIPPED_MAX, SequenceLedger } from '../../src/transport/sequence-ledger';
import { useTempDirs } from '../helpers/tmp';
import { quiet } from './transport-fixture';

const H = (n: number): string => n.toString(16).padStart(16, '0');

function ledgerWith(dir: string, seqs: number[]): SequenceLedger {
  const l = new SequenceLedger(dir);
  for (const s of seqs) l.accepted('d', s, H(s));
  return l;
}

describe('SequenceLedger: a resync log names the sequence it follows', () => {
  const tmp = useTempDirs();

  it('refuses a resync log as a gap while the log it follows is not admitted', () => {
    const l = ledgerWith(tmp(), [1, 2]);
    expect(() => l.admit('d', 4, H(4), true, 3)).toThrow(expect.objectContaining({ code: 'BR_SEQ_GAP', details: { expectedSeq: 3 } }));
  });

  it('admits a resync log past folded logs once everything up to `follows` is admitted', () => {
    const l = ledgerWith(tmp(), [1]);
    expect(l.admit('d', 4, H(4), true, 1)).toEqual({ kind: 'accept' });
    l.accepted('d', 4, H(4));
    expect(l.get('d').skipped).toEqual([[2, 3]]);
    // A folded log arriving late is a duplicate (its writes are in the resync data).
    expect(l.admit('d', 3, H(3))).toEqual({ kind: 'duplicate', folded: true });
  });

  it('refuses with BR_SEQ_UNKNOWN a log below nextSeq that was neither accepted nor skipped', () => {
    const l = ledgerWith(tmp(), [1, 2, 3]);
    // Forge the state a pre-fix receiver left: 5 accepted past an unskipped 4.
    l.get('d').nextSeq = 6;
    expect(() => l.admit('d', 4, H(4))).toThrow(expect.objectContaining({ code: 'BR_SEQ_UNKNOWN' }));
    // Answered beside the other sequence refusals, not as a server fault.
    let unknown: unknown;
    try {
      l.admit('d', 4, H(4));
    } catch (err) {
      unknown = err;
    }
    expect(statusForError(unknown as BlockrelayError)).toBe(409);
    expect(l.admit('d', 2, H(2))).toEqual({ kind: 'duplicate' });
    expect(() => l.admit('d', 2, H(99))).toThrow(expect.objectContaining({ code: 'BR_SEQ_CONFLICT' }));
  });

  it('keeps admitting a resync log without `follows` past a gap, as older senders and spool files expect', () => {
    const l = ledgerWith(tmp(), [1]);
    expect(l.admit('d', 5, H(5), true)).toEqual({ kind: 'accept' });
    expect(() => l.admit('d', 5, H(5), false)).toThrow(expect.objectContaining({ code: 'BR_SEQ_GAP' }));
  });

  it('refuses with BR_SEQ_UNKNOWN a log that overtook the first log a fresh ledger took, never a silent duplicate', () => {
    const l = new SequenceLedger(tmp());
    // Log 2 arrives first at a receiver that has nothing of the disk yet: it sets the start.
    expect(l.admit('d', 2, H(2))).toEqual({ kind: 'accept' });
    l.accepted('d', 2, H(2));
    expect(() => l.admit('d', 1, H(1))).toThrow(expect.objectContaining({ code: 'BR_SEQ_UNKNOWN', details: expect.objectContaining({ startSeq: 2 }) }));
    expect(l.admit('d', 2, H(2))).toEqual({ kind: 'duplicate' });
  });

  it('persists the skipped ranges across a restart', async () => {
    const dir = tmp();
    const l = ledgerWith(dir, [1]);
    l.accepted('d', 4, H(4));
    await l.persist('d');
    const again = new SequenceLedger(dir);
    expect(again.admit('d', 2, H(2))).toEqual({ kind: 'duplicate', folded: true });
    expect(again.get('d')).toMatchObject({ version: 2, nextSeq: 5, skipped: [[2, 3]], knownFrom: 1, startSeq: 1 });
  });

  it('reads a version 1 ledger, remembering nothing below its nextSeq', () => {
    const dir = tmp();
    fs.mkdirSync(path.join(dir, 'disks'));
    fs.writeFileSync(path.join(dir, 'disks', 'd.json'), JSON.stringify({ version: 1, nextSeq: 7, appliedSeq: 6, recent: [[6, H(6)]] }));
    const l = new SequenceLedger(dir);
    expect(l.get('d')).toEqual({ version: 2, nextSeq: 7, appliedSeq: 6, recent: [[6, H(6)]], skipped: [], knownFrom: 7, startSeq: null });
    expect(l.admit('d', 3, H(3))).toEqual({ kind: 'duplicate' });
    expect(() => l.admit('d', 9, H(9), true, 7)).toThrow(expect.objectContaining({ code: 'BR_SEQ_GAP' }));
    // A version 2 file from before startSeq was kept reads it as unknown.
    fs.writeFileSync(path.join(dir, 'disks', 'd.json'), JSON.stringify({ version: 2, nextSeq: 7, appliedSeq: 6, recent: [[6, H(6)]], skipped: [[3, 4]], knownFrom: 2 }));
    expect(new SequenceLedger(dir).get('d')).toMatchObject({ skipped: [[3, 4]], knownFrom: 2, startSeq: null });
  });

  it('refuses a damaged or unknown ledger file with BR_APPLY_STATE_CORRUPT naming the file', () => {
    const dir = tmp();
    fs.mkdirSync(path.join(dir, 'disks'));
    for (const text of ['{', JSON.stringify({ version: 3, nextSeq: 1, appliedSeq: null, recent: [] }), JSON.stringify({ version: 2, nextSeq: 1, appliedSeq: null, recent: [], skipped: [[5, 2]], knownFrom: 1 })]) {
      fs.writeFileSync(path.join(dir, 'disks', 'd.json'), text);
      expect(() => new SequenceLedger(dir).get('d')).toThrow(expect.objectContaining({ code: 'BR_APPLY_STATE_CORRUPT', details: { file: path.join(dir, 'disks', 'd.json') } }));
    }
  });

  it('bounds the skipped ranges, raising knownFrom past the ones it forgets', () => {
    const l = ledgerWith(tmp(), [1]);
    let seq = 1;
    for (let i = 0; i < LEDGER_SKIPPED_MAX + 5; i++) {
      seq += 3;
      l.accepted('d', seq, H(seq));
    }
    const ledger = l.get('d');
    expect(ledger.skipped).toHaveLength(LEDGER_SKIPPED_MAX);
    expect(ledger.knownFrom).toBe(ledger.skipped[0]![0] - 1);
    expect(l.admit('d', 2, H(2))).toEqual({ kind: 'duplicate' });
  });
});

describe('LogReceiver.reconcile: a spooled resync log after a restart', () => {
  const tmp = useTempDirs();

  it('keeps its follows in the spool envelope and records the range it skipped again', async () => {
    const dir = tmp();
    const ledger = new SequenceLedger(path.join(dir, 'state'));
    ledger.accepted('disk0', 1, H(1));
    await ledger.persist('disk0');
    // Resync log 4 (following 1, logs 2 and 3 folded) was spooled and answered; the ledger was not saved before the crash.
    const body = Buffer.alloc(4096, 7);
    const spool = new LogSpool(path.join(dir, 'spool'), 1 << 30);
    await spool.open();
    const envelope = { diskId: 'disk0', seq: 4, xxhash64: hashHex((await newXxhash64()).update(body)), logLength: body.length, cutTimeMs: 1, cutId: 'c4', diskSizeBytes: 1 << 20, group: undefined, appTag: undefined, resync: true, follows: 1 };
    await spool.receive(envelope, Readable.from([body]), { lz4: false, verify: async () => undefined });

    const restartedSpool = new LogSpool(path.join(dir, 'spool'), 1 << 30);
    await restartedSpool.open();
    expect(restartedSpool.list('disk0')[0]!.envelope).toMatchObject({ resync: true, follows: 1 });
    const restarted = new SequenceLedger(path.join(dir, 'state'));
    const receiver = new LogReceiver({ spool: restartedSpool, ledger: restarted, verify: async () => undefined, acceptsDisk: () => true, onAccepted: () => undefined, hop: 'test', ...quiet() });
    receiver.reconcile();
    expect(restarted.get('disk0')).toMatchObject({ nextSeq: 5, skipped: [[2, 3]] });
    expect(restarted.admit('disk0', 3, H(3))).toEqual({ kind: 'duplicate', folded: true });
  });
});
