import { describe, expect, it } from 'vitest';
import { isBlockrelayError } from '../../src/retry/blockrelay-error';
import { SequenceLedger } from '../../src/transport/sequence-ledger';
import { prng } from '../helpers/prng';
import { useTempDirs } from '../helpers/tmp';

interface ModelLog {
  readonly seq: number;
  readonly resync: boolean;
  readonly follows?: number;
}

const hashOf = (seq: number): string => seq.toString(16).padStart(16, '0');

/**
 * A model of one disk's source against a receiver's ledger, with the
 * sender free to deliver its logs in any order (several connections, a
 * proxy, a pipelining sender) and logs folded at overflows, some of them
 * still in flight and delivered late. The source names what each resync
 * log follows the way the tracker does (the log a round sealed before it,
 * or after a fold the newest log acknowledged). Whatever the order, every
 * log that was not folded is accepted exactly once and the receiver
 * accepts in increasing sequence order: no log is answered "duplicate"
 * before it was accepted (review s5, R15), none "unknown".
 */
describe('SequenceLedger against a source that folds, and a sender that reorders', () => {
  const tmp = useTempDirs();

  it('accepts every log not folded, once and in order, for thousands of random runs (restarts included)', async () => {
    const runs = 1500;
    let accepted = 0;
    let gaps = 0;
    let foldedLate = 0;
    for (let run = 0; run < runs; run++) {
      const rand = prng(1000 + run);
      const dir = tmp();
      let ledger = new SequenceLedger(dir);
      // The receiver holds the disk's log 0 already: a fresh ledger takes any first log as the
      // start (a disk joining a running stream), which is a question of its own (see the report).
      ledger.accepted('d', 0, hashOf(0));
      const restarts = run % 10 === 0;
      let next = 1;
      let acked = 0; // newest log the source had answered: what a resync log after a fold follows
      let pending: ModelLog[] = []; // sealed, not folded, not answered
      let ghosts: ModelLog[] = []; // folded while possibly in flight: may still arrive
      const folded = new Set<number>();
      const acceptedOrder: number[] = [0];
      const deliver = async (log: ModelLog): Promise<void> => {
        let answer: 'accept' | 'duplicate' | 'folded' | 'gap';
        try {
          const a = ledger.admit('d', log.seq, hashOf(log.seq), log.resync, log.follows);
          answer = a.kind === 'accept' ? 'accept' : a.folded === true ? 'folded' : 'duplicate';
        } catch (err) {
          if (isBlockrelayError(err) && err.code === 'BR_SEQ_GAP') answer = 'gap';
          else throw new Error(`run ${run}: log ${log.seq} (${JSON.stringify(log)}) refused with ${(err as Error).message}`);
        }
        if (answer === 'gap') {
          gaps++;
          return;
        }
        if (answer === 'accept') {
          ledger.accepted('d', log.seq, hashOf(log.seq));
          acceptedOrder.push(log.seq);
          accepted++;
        } else if (!folded.has(log.seq)) {
          // A log the source did not fold is a duplicate only once it was accepted here.
          expect(acceptedOrder, `run ${run}: log ${log.seq} answered ${answer} but never accepted`).toContain(log.seq);
        } else if (answer === 'folded') {
          foldedLate++;
        }
        if (!folded.has(log.seq)) {
          pending = pending.filter((l) => l.seq !== log.seq);
          acked = Math.max(acked, log.seq);
        } else if (rand() < 0.7) {
          ghosts = ghosts.filter((l) => l.seq !== log.seq);
        }
      };
      for (let step = 0; step < 60; step++) {
        const r = rand();
        if (r < 0.3) {
          pending.push({ seq: next++, resync: false });
        } else if (r < 0.4) {
          // A resync round: the active log is sealed, the resync log takes the next number and follows it.
          const sealed = next++;
          pending.push({ seq: sealed, resync: false }, { seq: next, resync: true, follows: sealed });
          next++;
        } else if (r < 0.45 && pending.length > 0) {
          // Overflow: every unanswered log is folded (any may still be in flight); the next resync log follows the newest answered.
          for (const l of pending) folded.add(l.seq);
          ghosts.push(...pending.filter(() => rand() < 0.5));
          pending = [];
          pending.push({ seq: next++, resync: true, follows: acked });
        } else if (r < 0.47 && restarts) {
          await ledger.persist('d');
          ledger = new SequenceLedger(dir);
        } else {
          const choices = [...pending, ...ghosts];
          if (choices.length > 0) await deliver(choices[Math.floor(rand() * choices.length)]!);
        }
      }
      // Drain in any order until the source has nothing left.
      for (let i = 0; pending.length > 0; i++) {
        expect(i, `run ${run}: the drain made no progress`).toBeLessThan(10_000);
        await deliver(pending[Math.floor(rand() * pending.length)]!);
      }
      expect(acceptedOrder, `run ${run}: accepted out of order`).toEqual([...acceptedOrder].sort((a, b) => a - b));
      expect(new Set(acceptedOrder).size).toBe(acceptedOrder.length);
      for (let s = 1; s < next; s++) if (!folded.has(s)) expect(acceptedOrder, `run ${run}: log ${s} was never accepted`).toContain(s);
    }
    // The runs exercised the interesting paths.
    expect(gaps).toBeGreaterThan(1000);
    expect(foldedLate).toBeGreaterThan(10);
    expect(accepted).toBeGreaterThan(runs * 10);
  }, 60_000);
});
