import { describe, expect, it } from 'vitest';
import { envelopeHeaders, parseEnvelope, type LogEnvelope } from '../../src/transport/transport-protocol';
import { prng } from './transport-fixture';

const base: LogEnvelope = {
  diskId: 'disk0',
  seq: 42,
  xxhash64: '0123456789abcdef',
  logLength: 8192,
  cutTimeMs: 1_795_000_000_000,
  cutId: 'cut-1',
  group: 'sql-cluster',
  appTag: 'before upgrade / ü',
  diskSizeBytes: 1 << 30,
};

describe('transport envelope', () => {
  it('round-trips through headers, including the app tag, the group and the resync flag', () => {
    expect(parseEnvelope('disk0', '42', envelopeHeaders(base))).toEqual(base);
    const resync = { ...base, appTag: undefined, group: undefined, resync: true };
    expect(parseEnvelope('disk0', '42', envelopeHeaders(resync))).toEqual({ ...resync });
  });

  it('carries the sequence a resync log follows, and refuses it on a normal log or when not earlier', () => {
    const resync: LogEnvelope = { ...base, resync: true, follows: 39 };
    expect(parseEnvelope('disk0', '42', envelopeHeaders(resync))).toEqual(resync);
    expect(parseEnvelope('disk0', '42', envelopeHeaders({ ...resync, follows: 0 })).follows).toBe(0);
    // Only a resync log names one: a normal log's envelope drops it on the way out.
    expect(envelopeHeaders({ ...base, follows: 39 })['x-blockrelay-follows']).toBeUndefined();
    const h = envelopeHeaders(resync);
    for (const follows of ['42', '43', '-1', 'x']) {
      expect(() => parseEnvelope('disk0', '42', { ...h, 'x-blockrelay-follows': follows })).toThrow(expect.objectContaining({ code: 'BR_PROTOCOL' }));
    }
    expect(() => parseEnvelope('disk0', '42', { ...envelopeHeaders(base), 'x-blockrelay-follows': '41' })).toThrow(expect.objectContaining({ code: 'BR_PROTOCOL' }));
  });

  it('refuses malformed fields with BR_PROTOCOL or BR_DISK_ID_INVALID', () => {
    const h = envelopeHeaders(base);
    const bad: Array<[string, string, Record<string, string>]> = [
      ['disk0', '42', { ...h, 'x-blockrelay-xxhash64': 'XYZ' }],
      ['disk0', '-1', h],
      ['disk0', '1e3', h],
      ['disk0', '42', { ...h, 'x-blockrelay-log-length': '99999999999999999999' }],
      ['disk0', '42', { ...h, 'x-blockrelay-group': '../x' }],
      ['disk0', '42', { ...h, 'x-blockrelay-resync': 'yes' }],
      ['disk0', '42', { ...h, 'x-blockrelay-cut-id': 'a b' }],
      ['disk0', '42', { ...h, 'x-blockrelay-app-tag': 'x'.repeat(300) }],
    ];
    for (const [disk, seq, headers] of bad) expect(() => parseEnvelope(disk, seq, headers)).toThrow(expect.objectContaining({ code: 'BR_PROTOCOL' }));
    expect(() => parseEnvelope('../etc', '42', h)).toThrow(expect.objectContaining({ code: 'BR_DISK_ID_INVALID' }));
  });

  it('never throws anything but a coded error on random headers', () => {
    const rand = prng(99);
    const names = Object.keys(envelopeHeaders({ ...base, resync: true }));
    const junk = (): string => {
      const n = Math.floor(rand() * 30);
      let s = '';
      for (let i = 0; i < n; i++) s += String.fromCharCode(Math.floor(rand() * 0x250));
      return s;
    };
    for (let i = 0; i < 5000; i++) {
      const headers: Record<string, string> = { ...envelopeHeaders(base) };
      for (const name of names) if (rand() < 0.3) headers[name] = junk();
      try {
        parseEnvelope(rand() < 0.1 ? junk() : 'disk0', rand() < 0.2 ? junk() : '7', headers);
      } catch (err) {
        expect((err as { code?: string }).code).toMatch(/^BR_(PROTOCOL|DISK_ID_INVALID)$/);
      }
    }
  });
});
