/**
 * Constants and byte codecs of the NBD protocol (fixed newstyle handshake,
 * simple replies), as described in the NetworkBlockDevice project's
 * `doc/proto.md`. Every multi-byte field on the wire is big-endian.
 *
 * Only what blockrelay speaks lives here; the server (`nbd-connection.ts`)
 * and the client (`nbd-client.ts`) share it, so the two cannot drift apart.
 */

// --- magic numbers ---------------------------------------------------------

/** 'NBDMAGIC', the first 8 bytes the server sends. */
export const NBD_INIT_MAGIC = Buffer.from('NBDMAGIC', 'latin1');
/** 'IHAVEOPT': the second 8 bytes of the greeting, and the prefix of every option. */
export const NBD_OPTS_MAGIC = Buffer.from('IHAVEOPT', 'latin1');
/** Prefix of every option reply (0x0003e889045565a9), split into halves for fast compares. */
export const NBD_REP_MAGIC_HI = 0x0003e889;
export const NBD_REP_MAGIC_LO = 0x045565a9;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// --- sizes -----------------------------------------------------------------

/** NBDMAGIC + IHAVEOPT + 16-bit handshake flags. */
export const GREETING_BYTES = 18;
export const CLIENT_FLAGS_BYTES = 4;
/** IHAVEOPT + 32-bit option + 32-bit length. */
export const OPTION_HEADER_BYTES = 16;
/** Reply magic (8) + option (4) + reply type (4) + length (4). */
export const OPTION_REPLY_HEADER_BYTES = 20;
/** magic (4) + flags (2) + type (2) + handle (8) + offset (8) + length (4). */
export const REQUEST_HEADER_BYTES = 28;
/** magic (4) + error (4) + handle (8). */
export const SIMPLE_REPLY_BYTES = 16;
/** Reply to NBD_OPT_EXPORT_NAME: size (8) + transmission flags (2) [+ 124 zero bytes]. */
export const EXPORT_NAME_REPLY_BYTES = 10;
export const EXPORT_NAME_ZERO_PAD_BYTES = 124;
/** Longest string (export name, message) the protocol allows. */
export const NBD_MAX_STRING_BYTES = 4096;

// --- handshake flags (server, 16 bits) and client flags (32 bits) -----------

export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// --- transmission flags (16 bits) ------------------------------------------

export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// --- options ---------------------------------------------------------------

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;

// --- option reply types ----------------------------------------------------

export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = (NBD_REP_FLAG_ERROR | 1) >>> 0;
export const NBD_REP_ERR_POLICY = (NBD_REP_FLAG_ERROR | 2) >>> 0;
export const NBD_REP_ERR_INVALID = (NBD_REP_FLAG_ERROR | 3) >>> 0;
export const NBD_REP_ERR_PLATFORM = (NBD_REP_FLAG_ERROR | 4) >>> 0;
export const NBD_REP_ERR_TLS_REQD = (NBD_REP_FLAG_ERROR | 5) >>> 0;
export const NBD_REP_ERR_UNKNOWN = (NBD_REP_FLAG_ERROR | 6) >>> 0;
export const NBD_REP_ERR_SHUTDOWN = (NBD_REP_FLAG_ERROR | 7) >>> 0;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = (NBD_REP_FLAG_ERROR | 8) >>> 0;
export const NBD_REP_ERR_TOO_BIG = (NBD_REP_FLAG_ERROR | 9) >>> 0;

/** True for option reply types with bit 31 set. */
export function isOptionReplyError(replyType: number): boolean {
  return (replyType & NBD_REP_FLAG_ERROR) !== 0;
}

// --- information types (NBD_OPT_INFO / NBD_OPT_GO) -------------------------

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// --- commands and command flags --------------------------------------------

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// --- error values of simple replies ----------------------------------------

export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Human names of the error values, for messages. */
export const NBD_ERROR_NAMES: Readonly<Record<number, string>> = {
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

/** Human names of the commands, for messages. */
export const NBD_COMMAND_NAMES: Readonly<Record<number, string>> = {
  [NBD_CMD_READ]: 'READ',
  [NBD_CMD_WRITE]: 'WRITE',
  [NBD_CMD_DISC]: 'DISC',
  [NBD_CMD_FLUSH]: 'FLUSH',
  [NBD_CMD_TRIM]: 'TRIM',
  [NBD_CMD_CACHE]: 'CACHE',
  [NBD_CMD_WRITE_ZEROES]: 'WRITE_ZEROES',
  [NBD_CMD_BLOCK_STATUS]: 'BLOCK_STATUS',
};

// --- codecs ----------------------------------------------------------------

const TWO_POW_32 = 0x1_0000_0000;

/** Reads an unsigned 64-bit big-endian integer as a JS number (inexact above 2^53, which callers refuse by range). */
export function readU64(buf: Buffer, offset: number): number {
  return buf.readUInt32BE(offset) * TWO_POW_32 + buf.readUInt32BE(offset + 4);
}

/** Writes a non-negative integer below 2^53 as an unsigned 64-bit big-endian integer. */
export function writeU64(buf: Buffer, value: number, offset: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_POW_32), offset);
  buf.writeUInt32BE(value >>> 0, offset + 4);
}

/** The server greeting of fixed newstyle negotiation. */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const buf = Buffer.alloc(GREETING_BYTES);
  NBD_INIT_MAGIC.copy(buf, 0);
  NBD_OPTS_MAGIC.copy(buf, 8);
  buf.writeUInt16BE(handshakeFlags, 16);
  return buf;
}

/** One option reply: header plus optional data. */
export function encodeOptionReply(option: number, replyType: number, data?: Buffer): Buffer {
  const dataBytes = data?.length ?? 0;
  const buf = Buffer.alloc(OPTION_REPLY_HEADER_BYTES + dataBytes);
  buf.writeUInt32BE(NBD_REP_MAGIC_HI, 0);
  buf.writeUInt32BE(NBD_REP_MAGIC_LO, 4);
  buf.writeUInt32BE(option >>> 0, 8);
  buf.writeUInt32BE(replyType >>> 0, 12);
  buf.writeUInt32BE(dataBytes, 16);
  if (data !== undefined) data.copy(buf, OPTION_REPLY_HEADER_BYTES);
  return buf;
}

/** An error option reply whose data is a message for a human (truncated to the protocol's string limit). */
export function encodeOptionError(option: number, replyType: number, message: string): Buffer {
  let text = Buffer.from(message, 'utf8');
  if (text.length > NBD_MAX_STRING_BYTES) text = text.subarray(0, NBD_MAX_STRING_BYTES);
  return encodeOptionReply(option, replyType, text);
}

/** NBD_REP_SERVER data: name length, name, then an optional description. */
export function encodeServerEntry(name: string, description = ''): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  const descBytes = Buffer.from(description, 'utf8');
  const buf = Buffer.alloc(4 + nameBytes.length + descBytes.length);
  buf.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(buf, 4);
  descBytes.copy(buf, 4 + nameBytes.length);
  return buf;
}

/** NBD_REP_INFO data for NBD_INFO_EXPORT: type, size, transmission flags (12 bytes). */
export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const buf = Buffer.alloc(12);
  buf.writeUInt16BE(NBD_INFO_EXPORT, 0);
  writeU64(buf, sizeBytes, 2);
  buf.writeUInt16BE(transmissionFlags, 10);
  return buf;
}

/** NBD_REP_INFO data for NBD_INFO_BLOCK_SIZE: type, minimum, preferred, maximum (14 bytes). */
export function encodeInfoBlockSize(minimumBytes: number, preferredBytes: number, maximumBytes: number): Buffer {
  const buf = Buffer.alloc(14);
  buf.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  buf.writeUInt32BE(minimumBytes, 2);
  buf.writeUInt32BE(preferredBytes, 6);
  buf.writeUInt32BE(maximumBytes >>> 0, 10);
  return buf;
}

/** NBD_REP_INFO data carrying a string (NBD_INFO_NAME, NBD_INFO_DESCRIPTION). */
export function encodeInfoString(infoType: number, text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const buf = Buffer.alloc(2 + bytes.length);
  buf.writeUInt16BE(infoType, 0);
  bytes.copy(buf, 2);
  return buf;
}

/** The reply that ends NBD_OPT_EXPORT_NAME negotiation. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const buf = Buffer.alloc(EXPORT_NAME_REPLY_BYTES + (noZeroes ? 0 : EXPORT_NAME_ZERO_PAD_BYTES));
  writeU64(buf, sizeBytes, 0);
  buf.writeUInt16BE(transmissionFlags, 8);
  return buf;
}

/** The data of NBD_OPT_INFO / NBD_OPT_GO: export name and the information types asked for. */
export interface GoRequest {
  readonly name: string;
  readonly infoRequests: readonly number[];
}

/**
 * Decodes NBD_OPT_INFO / NBD_OPT_GO data. Returns undefined when the lengths
 * inside do not add up to the option length (the caller answers
 * NBD_REP_ERR_INVALID).
 */
export function decodeGoRequest(data: Buffer): GoRequest | undefined {
  if (data.length < 6) return undefined;
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 6 || nameBytes > NBD_MAX_STRING_BYTES) return undefined;
  const countOffset = 4 + nameBytes;
  const count = data.readUInt16BE(countOffset);
  if (data.length !== countOffset + 2 + count * 2) return undefined;
  const infoRequests: number[] = [];
  for (let i = 0; i < count; i++) infoRequests.push(data.readUInt16BE(countOffset + 2 + i * 2));
  return { name: data.toString('utf8', 4, countOffset), infoRequests };
}

/** Encodes NBD_OPT_INFO / NBD_OPT_GO data (client side). */
export function encodeGoRequest(name: string, infoRequests: readonly number[]): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  const buf = Buffer.alloc(4 + nameBytes.length + 2 + infoRequests.length * 2);
  buf.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(buf, 4);
  buf.writeUInt16BE(infoRequests.length, 4 + nameBytes.length);
  infoRequests.forEach((t, i) => buf.writeUInt16BE(t, 4 + nameBytes.length + 2 + i * 2));
  return buf;
}

/** One option as the client sends it (client side). */
export function encodeOption(option: number, data?: Buffer): Buffer {
  const dataBytes = data?.length ?? 0;
  const buf = Buffer.alloc(OPTION_HEADER_BYTES + dataBytes);
  NBD_OPTS_MAGIC.copy(buf, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(dataBytes, 12);
  if (data !== undefined) data.copy(buf, OPTION_HEADER_BYTES);
  return buf;
}

/**
 * A transmission request header. The 64-bit handle is kept as two 32-bit
 * halves: it is opaque, only echoed back, and this avoids BigInt on the hot
 * path.
 */
export interface RequestHeader {
  magic: number;
  flags: number;
  type: number;
  handleHi: number;
  handleLo: number;
  offset: number;
  length: number;
}

/** Decodes a 28-byte request header at `at` into `out` (reused by the caller to avoid allocation). */
export function decodeRequestHeader(buf: Buffer, at: number, out: RequestHeader): RequestHeader {
  out.magic = buf.readUInt32BE(at);
  out.flags = buf.readUInt16BE(at + 4);
  out.type = buf.readUInt16BE(at + 6);
  out.handleHi = buf.readUInt32BE(at + 8);
  out.handleLo = buf.readUInt32BE(at + 12);
  out.offset = readU64(buf, at + 16);
  out.length = buf.readUInt32BE(at + 24);
  return out;
}

/** Encodes a request header (client side). */
export function encodeRequestHeader(buf: Buffer, at: number, h: Omit<RequestHeader, 'magic'>): void {
  buf.writeUInt32BE(NBD_REQUEST_MAGIC, at);
  buf.writeUInt16BE(h.flags, at + 4);
  buf.writeUInt16BE(h.type, at + 6);
  buf.writeUInt32BE(h.handleHi >>> 0, at + 8);
  buf.writeUInt32BE(h.handleLo >>> 0, at + 12);
  writeU64(buf, h.offset, at + 16);
  buf.writeUInt32BE(h.length >>> 0, at + 24);
}

/** A 16-byte simple reply. */
export function encodeSimpleReply(error: number, handleHi: number, handleLo: number): Buffer {
  const buf = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES);
  buf.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  buf.writeUInt32BE(error, 4);
  buf.writeUInt32BE(handleHi, 8);
  buf.writeUInt32BE(handleLo, 12);
  return buf;
}
