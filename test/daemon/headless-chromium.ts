import { spawn, type ChildProcess } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';

/**
 * Debian's headless Chromium driven over the DevTools protocol for tests.
 *
 * The protocol runs over `--remote-debugging-pipe` (file descriptors 3 and
 * 4, each message a JSON document ended by a NUL byte) rather than a
 * WebSocket: Node 20 has no stable global WebSocket, and the pipe needs no
 * port and no dependency.
 */
export const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-default-apps',
  '--disable-extensions',
  // /dev/shm is small in containers; Chromium's renderers crash on it.
  '--disable-dev-shm-usage',
  '--remote-debugging-pipe',
];

/** Bound on one protocol call, so a wedged browser fails the test instead of hanging it. */
const CALL_TIMEOUT_MS = 15_000;
/** Bound on a NUL-less message from the browser, against a runaway buffer. */
const MAX_MESSAGE_CHARS = 64 * 1024 * 1024;

interface Pending {
  resolve(value: Record<string, unknown>): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

export class HeadlessChromium {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private buffer = '';
  private exited = false;
  /** Chromium's stderr, for failure messages. */
  stderr = '';

  private constructor(
    private readonly child: ChildProcess,
    private readonly toBrowser: Writable,
  ) {
    const fromBrowser = child.stdio[4] as Readable;
    fromBrowser.setEncoding('utf8');
    fromBrowser.on('data', (chunk: string) => this.receive(chunk));
    child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
      this.stderr = (this.stderr + chunk).slice(-16 * 1024);
    });
    child.on('exit', () => {
      this.exited = true;
      for (const [id, p] of this.pending) {
        clearTimeout(p.timer);
        p.reject(new Error(`chromium exited during call ${id}; stderr: ${this.stderr}`));
      }
      this.pending.clear();
    });
  }

  /** Starts Chromium with a fresh profile directory. */
  static launch(binary: string, userDataDir: string): HeadlessChromium {
    const child = spawn(binary, [...CHROMIUM_FLAGS, `--user-data-dir=${userDataDir}`, 'about:blank'], {
      stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe'],
      // Its own process group, so close() also ends the renderer and zygote.
      detached: true,
    });
    return new HeadlessChromium(child, child.stdio[3] as Writable);
  }

  private receive(chunk: string): void {
    this.buffer += chunk;
    if (this.buffer.length > MAX_MESSAGE_CHARS) {
      // Pending calls are rejected by the exit handler.
      this.stderr += '\nblockrelay test: chromium sent an unterminated message over 64 MiB';
      this.buffer = '';
      this.child.kill('SIGKILL');
      return;
    }
    let end: number;
    while ((end = this.buffer.indexOf('\0')) >= 0) {
      const message = JSON.parse(this.buffer.slice(0, end)) as { id?: number; result?: Record<string, unknown>; error?: { message: string } };
      this.buffer = this.buffer.slice(end + 1);
      if (message.id === undefined) continue; // an event; nothing here waits for events
      const p = this.pending.get(message.id);
      if (p === undefined) continue;
      this.pending.delete(message.id);
      clearTimeout(p.timer);
      if (message.error) p.reject(new Error(`DevTools call ${message.id} failed: ${message.error.message}`));
      else p.resolve(message.result ?? {});
    }
  }

  /** One DevTools protocol call; `sessionId` addresses an attached page. */
  call(method: string, params: Record<string, unknown> = {}, sessionId?: string): Promise<Record<string, unknown>> {
    if (this.exited) return Promise.reject(new Error(`chromium has exited; stderr: ${this.stderr}`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`DevTools call ${method} got no answer in ${CALL_TIMEOUT_MS} ms`));
      }, CALL_TIMEOUT_MS);
      this.pending.set(id, { resolve, reject, timer });
      this.toBrowser.write(`${JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) })}\0`);
    });
  }

  /** Opens a page at `url` and returns the session that drives it. */
  async open(url: string, widthPx = 1280, heightPx = 600): Promise<string> {
    const { targetId } = (await this.call('Target.createTarget', { url: 'about:blank' })) as { targetId: string };
    const { sessionId } = (await this.call('Target.attachToTarget', { targetId, flatten: true })) as { sessionId: string };
    await this.call('Emulation.setDeviceMetricsOverride', { width: widthPx, height: heightPx, deviceScaleFactor: 1, mobile: false }, sessionId);
    await this.call('Page.navigate', { url }, sessionId);
    return sessionId;
  }

  /** Evaluates an expression in the page and returns its (JSON-able) value. */
  async evaluate<T>(sessionId: string, expression: string): Promise<T> {
    const answer = (await this.call('Runtime.evaluate', { expression, returnByValue: true }, sessionId)) as {
      result: { value?: T };
      exceptionDetails?: { text: string };
    };
    if (answer.exceptionDetails) throw new Error(`page threw: ${answer.exceptionDetails.text}`);
    return answer.result.value as T;
  }

  /** A PNG of the page as it is drawn now. */
  async screenshot(sessionId: string): Promise<Buffer> {
    const { data } = (await this.call('Page.captureScreenshot', { format: 'png' }, sessionId)) as { data: string };
    return Buffer.from(data, 'base64');
  }

  /** Closes the browser, then ends whatever of its process group is left. */
  async close(): Promise<void> {
    if (!this.exited) {
      const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
      await Promise.race([this.call('Browser.close').catch(() => undefined), exited]);
      await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 3000))]);
    }
    try {
      if (this.child.pid !== undefined) process.kill(-this.child.pid, 'SIGKILL');
    } catch {
      // The group is gone already.
    }
  }
}
