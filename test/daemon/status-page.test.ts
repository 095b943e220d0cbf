import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { validateConfig } from '../../src/daemon/config';
import { hrlLogOps } from '../../src/transport/hrl-log-ops';
import { sendLog } from '../../src/transport/log-client';
import { masterTargetFromConfig, type ApplyingHop } from '../../src/transport/master-target';
import { requireTool } from '../helpers/tools';
import { useTempDirs } from '../helpers/tmp';
import { DISK_SIZE, FAST_RETRY, makeLog, prng, quiet, SECRET } from '../transport/transport-fixture';
import { HeadlessChromium } from './headless-chromium';

/** What the test reads off the rendered page. */
interface PageView {
  role: string;
  updated: string;
  stale: boolean;
  /** The cells of disk0's row, as text, or null while it is not drawn. */
  cells: string[] | null;
  healthClass: string | null;
}

const READ_PAGE = `(() => {
  // Until navigation commits this is still about:blank.
  if (!document.getElementById('role')) return null;
  const row = document.querySelector('tr[data-disk="disk0"]');
  return {
    role: document.getElementById('role').textContent,
    updated: document.getElementById('updated').textContent,
    stale: getComputedStyle(document.getElementById('stale')).display !== 'none',
    cells: row ? [...row.cells].map((c) => c.innerText) : null,
    healthClass: row ? row.cells[1].className : null,
  };
})()`;

/** Where the test leaves a screenshot of the page for people to look at. */
export const SCREENSHOT_FILE = path.join(os.tmpdir(), 'blockrelay-status-page.png');

// Column order of the status page's table.
const RPO = 2;
const THROUGHPUT = 4;
const POINTS = 6;
const ERRORS = 7;

describe('status page in headless Chromium', () => {
  const tmp = useTempDirs();
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  async function until(browser: HeadlessChromium, session: string, what: string, accept: (view: PageView) => boolean, timeoutMs = 15_000): Promise<PageView> {
    const deadline = Date.now() + timeoutMs;
    let view = await browser.evaluate<PageView | null>(session, READ_PAGE);
    while (view === null || !accept(view)) {
      if (Date.now() > deadline) throw new Error(`the status page did not show ${what} within ${timeoutMs} ms; last seen: ${JSON.stringify(view)}`);
      await new Promise((resolve) => setTimeout(resolve, 150));
      view = await browser.evaluate<PageView | null>(session, READ_PAGE);
    }
    return view;
  }

  it.skipIf(!requireTool('chromium'))('loads, shows disk0 healthy, and follows the master target as it applies logs', async () => {
    const dir = tmp();
    const config = validateConfig({ stateDir: path.join(dir, 'mt'), listen: '127.0.0.1:0', secret: SECRET, disks: [{ id: 'disk0', target: `raw:${path.join(dir, 'target.img')}` }] });
    const mt: ApplyingHop = masterTargetFromConfig(config, hrlLogOps, { ...quiet(), retryPolicy: FAST_RETRY });
    await mt.start();
    cleanups.push(() => mt.stop());
    const peer = { url: mt.url, secret: SECRET };
    const model = Buffer.alloc(DISK_SIZE);
    const rand = prng(9);

    const first = await makeLog(path.join(dir, 'src'), 'disk0', 1, model, rand);
    expect((await sendLog(peer, first.envelope, first.file)).status).toBe(201);
    await mt.drain();

    const browser = HeadlessChromium.launch('chromium', tmp());
    cleanups.push(() => browser.close());
    const session = await browser.open(`${mt.url}/`);

    // Loaded: the role, disk0 with health OK, no errors, the first log's point.
    const before = await until(browser, session, 'disk0', (v) => v.cells !== null);
    expect(before.role).toBe('master-target');
    expect(before.stale).toBe(false);
    expect(before.cells![0]).toContain('disk0');
    expect(before.cells![1]).toBe('OK');
    expect(before.healthClass).toBe('OK');
    expect(before.cells![RPO]).toMatch(/^\d+\.\d s$/);
    // The newest point is the last applied log's cut time (as ISO-8601).
    expect(before.cells![POINTS]).toContain(new Date(first.envelope.cutTimeMs).toISOString());
    expect(before.cells![ERRORS]).toBe('none');

    // Two more logs while the page is open: it polls and redraws by itself.
    for (let seq = 2; seq <= 3; seq++) {
      const log = await makeLog(path.join(dir, 'src'), 'disk0', seq, model, rand, 200);
      expect((await sendLog(peer, log.envelope, log.file)).status).toBe(201);
      await mt.drain();
      const shown = new Date(log.envelope.cutTimeMs).toISOString();
      await until(browser, session, `log ${seq}'s point`, (v) => v.cells?.[POINTS]?.includes(shown) === true);
    }
    // The applied bytes moved between two polls, so the page shows a rate.
    const after = await until(browser, session, 'a non-zero throughput', (v) => v.cells !== null && v.cells[THROUGHPUT] !== '0 B/s');
    expect(after.cells![THROUGHPUT]).toMatch(/^\d+(\.\d)? (B|KiB|MiB|GiB)\/s$/);
    expect(after.updated).not.toBe(before.updated);
    expect(after.cells![1]).toBe('OK');
    expect(fs.readFileSync(path.join(dir, 'target.img')).equals(model)).toBe(true);

    const png = await browser.screenshot(session);
    expect(png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))).toBe(true);
    fs.writeFileSync(SCREENSHOT_FILE, png);
  });
});
