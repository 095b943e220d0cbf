import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { NbdServer, type NbdServerOptions } from '../../src/tap/nbd-server';
import type { NbdWriteSource, WriteRecorder } from '../../src/tap/nbd-export';
import { RawTarget } from '../../src/targets/raw/raw-target';
import * as P from '../../src/tap/nbd-protocol';

/** One record a ListRecorder saw. */
export type Record =
  | { readonly kind: 'write'; readonly offset: number; readonly data: Buffer }
  | { readonly kind: 'zero'; readonly offset: number; readonly length: number };

/**
 * A WriteRecorder for protocol tests: keeps every record in call order (with
 * a copy of the data, as a real log would) and counts flushes. The
 * end-to-end tests use the real ChangeTracker instead.
 */
export class ListRecorder implements WriteRecorder {
  readonly records: Record[] = [];
  flushes = 0;

  recordWrite(offset: number, data: Uint8Array): void {
    this.records.push({ kind: 'write', offset, data: Buffer.from(data) });
  }

  recordZeroes(offset: number, length: number): void {
    this.records.push({ kind: 'zero', offset, length });
  }

  async flush(): Promise<void> {
    this.flushes++;
  }

  /** Applies every record in order onto `base` (a copy of the disk before the writes). */
  replayOnto(base: Buffer): Buffer {
    const out = Buffer.from(base);
    for (const r of this.records) {
      if (r.kind === 'write') r.data.copy(out, r.offset);
      else out.fill(0, r.offset, r.offset + r.length);
    }
    return out;
  }
}

export interface TapFixture {
  readonly server: NbdServer;
  readonly target: RawTarget;
  readonly imagePath: string;
  readonly port: number;
  readonly uri: string;
  readonly recorder: ListRecorder;
  readonly warnings: string[];
  close(): Promise<void>;
}

/** A raw image of `sizeBytes` served as export `name` on 127.0.0.1 with a ListRecorder. */
export async function startTap(
  dir: string,
  options: {
    sizeBytes?: number;
    name?: string;
    readOnly?: boolean;
    fill?: number;
    /** Holds each write for a random 0-2 ms before it reaches the disk, so concurrent writes finish out of order. */
    jitterWrites?: boolean;
    server?: Partial<NbdServerOptions>;
  } = {},
): Promise<TapFixture> {
  const sizeBytes = options.sizeBytes ?? 16 * 1024 * 1024;
  const name = options.name ?? 'disk0';
  const imagePath = path.join(dir, `${name}.img`);
  if (options.fill !== undefined) fs.writeFileSync(imagePath, Buffer.alloc(sizeBytes, options.fill));
  const target = options.fill !== undefined
    ? await RawTarget.open(imagePath, { readOnly: options.readOnly })
    : await RawTarget.open(imagePath, { create: { sizeBytes } });
  const recorder = new ListRecorder();
  const warnings: string[] = [];
  const source: NbdWriteSource = options.jitterWrites
    ? {
        sizeBytes: target.sizeBytes,
        capabilities: target.capabilities,
        read: (o, l) => target.read(o, l),
        write: async (o, d) => {
          await new Promise((r) => setTimeout(r, Math.floor(Math.random() * 3)));
          await target.write(o, d);
        },
        writeZeroes: (o, l) => target.writeZeroes(o, l),
        discard: (o, l) => target.discard(o, l),
        flush: () => target.flush(),
      }
    : target;
  const server = new NbdServer({
    exports: [{ name, readOnly: options.readOnly ?? false, source, recorder }],
    warn: (message) => warnings.push(message),
    ...options.server,
  });
  const { port } = await server.listen('127.0.0.1', 0);
  return {
    server,
    target,
    imagePath,
    port,
    uri: `nbd://127.0.0.1:${port}/${name}`,
    recorder,
    warnings,
    async close() {
      await server.close(2000);
      await target.close();
    },
  };
}

/** Runs a tool and resolves with its output; rejects with stderr on a non-zero exit. */
export function run(cmd: string, args: string[], timeoutMs = 60_000): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) reject(Object.assign(err, { stdout, stderr }));
      else resolve({ stdout, stderr });
    });
  });
}

/**
 * A raw TCP peer for byte-level protocol tests: send arbitrary bytes, read
 * exact byte counts, observe the server closing.
 */
export class RawPeer {
  private buffered = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  closed = false;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, d]);
      this.waiter?.();
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
  }

  static connect(port: number): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: '127.0.0.1', port }, () => resolve(new RawPeer(socket)));
      socket.once('error', reject);
    });
  }

  send(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /** Reads exactly n bytes; rejects if the server closes first or after `timeoutMs`. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buffered.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.buffered.length}/${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out with ${this.buffered.length}/${n} bytes`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
    const out = this.buffered.subarray(0, n);
    this.buffered = this.buffered.subarray(n);
    return out;
  }

  /** Resolves true when the server closed the connection within `timeoutMs`. */
  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    return this.closed;
  }

  /** Bytes received and not read yet. */
  get pending(): number {
    return this.buffered.length;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** Reads one option reply from a raw peer: option, reply type and data. */
export async function readOptionReply(peer: RawPeer): Promise<{ option: number; type: number; data: Buffer }> {
  const head = await peer.read(P.OPTION_REPLY_HEADER_BYTES);
  if (head.readUInt32BE(0) !== P.NBD_REP_MAGIC_HI || head.readUInt32BE(4) !== P.NBD_REP_MAGIC_LO) throw new Error('bad option reply magic');
  const data = await peer.read(head.readUInt32BE(16));
  return { option: head.readUInt32BE(8), type: head.readUInt32BE(12), data };
}

/** Greeting, client flags and NBD_OPT_GO by hand, leaving the raw peer in transmission. */
export async function rawHandshake(peer: RawPeer, exportName: string): Promise<void> {
  await peer.read(P.GREETING_BYTES);
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES);
  peer.send(flags);
  peer.send(P.encodeOption(P.NBD_OPT_GO, P.encodeGoRequest(exportName, [])));
  for (;;) {
    const r = await readOptionReply(peer);
    if (r.type === P.NBD_REP_ACK) return;
    if (r.type !== P.NBD_REP_INFO) throw new Error(`NBD_OPT_GO failed with reply type 0x${r.type.toString(16)}`);
  }
}

/** A request header (plus payload) as bytes. */
export function request(type: number, offset: number, length: number, handle: number, options: { flags?: number; payload?: Buffer } = {}): Buffer {
  const header = Buffer.alloc(P.REQUEST_HEADER_BYTES);
  P.encodeRequestHeader(header, 0, { flags: options.flags ?? 0, type, handleHi: 0, handleLo: handle, offset, length });
  return options.payload === undefined ? header : Buffer.concat([header, options.payload]);
}

/** Reads one simple reply: error and handle. */
export async function readSimpleReply(peer: RawPeer): Promise<{ error: number; handle: number }> {
  const r = await peer.read(P.SIMPLE_REPLY_BYTES);
  if (r.readUInt32BE(0) !== P.NBD_SIMPLE_REPLY_MAGIC) throw new Error('bad simple reply magic');
  return { error: r.readUInt32BE(4), handle: r.readUInt32BE(12) };
}
