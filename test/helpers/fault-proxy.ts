import * as net from 'node:net';

/**
 * A TCP proxy on loopback between two roles that can misbehave on command:
 * reset connections after some bytes, stall them (accept and never
 * forward), or drop them at once. Used by the fault tests of the transport.
 */
export type FaultMode =
  | { kind: 'pass' }
  | { kind: 'reset-after'; bytes: number }
  | { kind: 'stall' }
  | { kind: 'drop' };

export class FaultProxy {
  mode: FaultMode = { kind: 'pass' };
  connections = 0;
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();

  constructor(private readonly targetPort: number) {
    this.server = net.createServer((client) => this.accept(client));
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return (this.server.address() as net.AddressInfo).port;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as net.AddressInfo).port}`;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private track(s: net.Socket): void {
    this.sockets.add(s);
    s.on('close', () => this.sockets.delete(s));
    s.on('error', () => undefined);
  }

  private accept(client: net.Socket): void {
    this.connections++;
    this.track(client);
    const mode = this.mode;
    if (mode.kind === 'drop') {
      client.resetAndDestroy();
      return;
    }
    if (mode.kind === 'stall') {
      client.pause();
      return;
    }
    const upstream = net.connect(this.targetPort, '127.0.0.1');
    this.track(upstream);
    let forwarded = 0;
    client.on('data', (chunk: Buffer) => {
      if (mode.kind === 'reset-after') {
        forwarded += chunk.length;
        if (forwarded > mode.bytes) {
          upstream.resetAndDestroy();
          client.resetAndDestroy();
          return;
        }
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => client.write(chunk));
    client.on('end', () => upstream.end());
    upstream.on('end', () => client.end());
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  }
}
