import { describe, expect, it } from 'vitest';
import * as P from '../../src/tap/nbd-protocol';

describe('NBD protocol codecs', () => {
  it('encodes the fixed newstyle greeting as NBDMAGIC, IHAVEOPT and the handshake flags', () => {
    const g = P.encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
    expect(g.length).toBe(P.GREETING_BYTES);
    expect(g.toString('hex')).toBe('4e42444d41474943' + '49484156454f5054' + '0003');
  });

  it('encodes an option reply with the reply magic 0x3e889045565a9', () => {
    const r = P.encodeOptionReply(P.NBD_OPT_GO, P.NBD_REP_ACK);
    expect(r.toString('hex')).toBe('0003e889045565a9' + '00000007' + '00000001' + '00000000');
    const e = P.encodeOptionError(P.NBD_OPT_STRUCTURED_REPLY, P.NBD_REP_ERR_UNSUP, 'no');
    expect(e.readUInt32BE(12)).toBe(0x80000001);
    expect(e.readUInt32BE(16)).toBe(2);
    expect(e.subarray(20).toString()).toBe('no');
    expect(P.isOptionReplyError(P.NBD_REP_ERR_UNKNOWN)).toBe(true);
    expect(P.isOptionReplyError(P.NBD_REP_INFO)).toBe(false);
  });

  it('encodes NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE with their fixed lengths', () => {
    const exp = P.encodeInfoExport(2 ** 40 + 5, 0x012d);
    expect(exp.toString('hex')).toBe('0000' + '0000010000000005' + '012d');
    const bs = P.encodeInfoBlockSize(1, 4096, 32 * 1024 * 1024);
    expect(bs.toString('hex')).toBe('0003' + '00000001' + '00001000' + '02000000');
  });

  it('pads the NBD_OPT_EXPORT_NAME reply with 124 zeroes unless NO_ZEROES was agreed', () => {
    expect(P.encodeExportNameReply(1024, 1, false).length).toBe(134);
    expect(P.encodeExportNameReply(1024, 1, true).toString('hex')).toBe('0000000000000400' + '0001');
  });

  it('round-trips NBD_OPT_GO data and refuses lengths that do not add up', () => {
    const data = P.encodeGoRequest('disk0', [P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME]);
    expect(data.toString('hex')).toBe('00000005' + Buffer.from('disk0').toString('hex') + '0002' + '0003' + '0001');
    expect(P.decodeGoRequest(data)).toEqual({ name: 'disk0', infoRequests: [3, 1] });
    expect(P.decodeGoRequest(data.subarray(0, data.length - 1))).toBeUndefined();
    expect(P.decodeGoRequest(Buffer.concat([data, Buffer.alloc(1)]))).toBeUndefined();
    const lying = Buffer.from(data);
    lying.writeUInt32BE(0xffffffff, 0);
    expect(P.decodeGoRequest(lying)).toBeUndefined();
    expect(P.decodeGoRequest(Buffer.alloc(5))).toBeUndefined();
  });

  it('decodes a 28-byte request header with a 64-bit offset and echoes the handle in the reply', () => {
    const buf = Buffer.from('25609513' + '0001' + '0001' + 'deadbeefcafef00d' + '0000000100000200' + '00010000', 'hex');
    const h = P.decodeRequestHeader(buf, 0, { magic: 0, flags: 0, type: 0, handleHi: 0, handleLo: 0, offset: 0, length: 0 });
    expect(h).toEqual({ magic: P.NBD_REQUEST_MAGIC, flags: P.NBD_CMD_FLAG_FUA, type: P.NBD_CMD_WRITE, handleHi: 0xdeadbeef, handleLo: 0xcafef00d, offset: 2 ** 32 + 512, length: 65536 });
    const out = Buffer.alloc(28);
    P.encodeRequestHeader(out, 0, h);
    expect(out.equals(buf)).toBe(true);
    expect(P.encodeSimpleReply(P.NBD_EINVAL, h.handleHi, h.handleLo).toString('hex')).toBe('67446698' + '00000016' + 'deadbeefcafef00d');
  });

  it('reads offsets beyond 2^53 as numbers larger than any export', () => {
    const buf = Buffer.from('ffffffffffffffff', 'hex');
    expect(P.readU64(buf, 0)).toBeGreaterThan(Number.MAX_SAFE_INTEGER);
  });
});
