import type { Metrics } from './metrics';
import { sendJson, type Route } from '../transport/http-api';

/**
 * The public, read-only routes every role serves: the status page at `/`,
 * its JSON at `/v1/status` and Prometheus metrics at `/metrics`. `status`
 * is called per request, so it may refresh gauges before they are read.
 */
export function observabilityRoutes(status: () => unknown, metrics: Metrics): Route[] {
  return [
    {
      method: 'GET',
      pattern: '/',
      public: true,
      handler: async (ctx) => {
        ctx.res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
        ctx.res.end(STATUS_PAGE_HTML);
      },
    },
    { method: 'GET', pattern: '/v1/status', public: true, handler: async (ctx) => sendJson(ctx.res, 200, status()) },
    {
      method: 'GET',
      pattern: '/metrics',
      public: true,
      handler: async (ctx) => {
        status();
        ctx.res.writeHead(200, { 'content-type': metrics.registry.contentType });
        ctx.res.end(await metrics.registry.metrics());
      },
    },
  ];
}

/**
 * The status page every role serves at `/`: one self-contained HTML document
 * (no external assets: DR sites are often offline) that polls `/v1/status`
 * every two seconds and renders replicated disks with health, RPO, pending
 * bytes per hop, throughput, resync progress, recovery points and the last
 * errors with their codes.
 */
export const STATUS_PAGE_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>blockrelay status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1b1f24; background: #f6f8fa; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  .sub { color: #57606a; margin-bottom: 1rem; }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  th, td { text-align: left; padding: .4rem .6rem; border-bottom: 1px solid #d0d7de; vertical-align: top; }
  th { background: #eaeef2; font-weight: 600; }
  .OK { color: #1a7f37; font-weight: 600; }
  .Warning { color: #9a6700; font-weight: 600; }
  .Critical { color: #cf222e; font-weight: 600; }
  .err { font-family: ui-monospace, monospace; font-size: 12px; color: #cf222e; }
  .muted { color: #57606a; }
  #stale { color: #cf222e; display: none; }
</style>
</head>
<body>
<h1>blockrelay <span id="role"></span></h1>
<div class="sub">updated <span id="updated">never</span> <span id="stale">(status unreachable)</span></div>
<table>
  <thead><tr><th>disk</th><th>health</th><th>RPO</th><th>pending</th><th>throughput</th><th>resync</th><th>recovery points</th><th>last errors</th></tr></thead>
  <tbody id="disks"><tr><td colspan="8" class="muted">loading…</td></tr></tbody>
</table>
<script>
  const previous = new Map();
  function bytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
  }
  function text(value) { const span = document.createElement('span'); span.textContent = value; return span.innerHTML; }
  function row(d, now) {
    const prev = previous.get(d.diskId);
    const done = d.appliedBytesTotal ?? d.shippedBytesTotal ?? 0;
    const rate = prev ? Math.max(0, (done - prev.done) / ((now - prev.at) / 1000)) : 0;
    previous.set(d.diskId, { done, at: now });
    const pending = d.pendingBytesByHop
      ? Object.entries(d.pendingBytesByHop).map(([hop, n]) => text(hop) + ': ' + bytes(n)).join('<br>')
      : bytes(d.pendingBytes);
    const points = d.points
      ? 'crash: ' + text(d.points.newestCrash ?? '–') + '<br>app: ' + text(d.points.newestApp ?? '–') + '<br><span class="muted">' + (d.points.count ?? 0) + ' kept</span>'
      : (d.lastPointTimeMs ? 'newest: ' + new Date(d.lastPointTimeMs).toISOString() : '–');
    const resync = d.resync ? text(d.resync.state) + (d.resync.percent !== undefined ? ' ' + d.resync.percent.toFixed(1) + '%' : '') : '–';
    const errors = (d.recentErrors || []).slice(-3).reverse().map((e) => '<div class="err">' + text(e.code) + ': ' + text(e.message) + '</div>').join('') || '<span class="muted">none</span>';
    const reasons = (d.reasons || []).map((r) => '<div class="muted">' + text(r) + '</div>').join('');
    return '<tr data-disk="' + text(d.diskId) + '"><td>' + text(d.diskId) + '<div class="muted">' + text(d.target || '') + '</div></td>' +
      '<td class="' + text(d.health) + '">' + text(d.health) + reasons + '</td>' +
      '<td>' + (d.rpoSeconds === null || d.rpoSeconds === undefined ? '–' : d.rpoSeconds.toFixed(1) + ' s') + '</td>' +
      '<td>' + pending + '</td><td>' + bytes(rate) + '/s</td><td>' + resync + '</td><td>' + points + '</td><td>' + errors + '</td></tr>';
  }
  async function refresh() {
    try {
      const res = await fetch('/v1/status', { cache: 'no-store' });
      const status = await res.json();
      const now = Date.now();
      document.getElementById('role').textContent = status.role || '';
      const disks = status.disks || [];
      document.getElementById('disks').innerHTML = disks.length ? disks.map((d) => row(d, now)).join('') : '<tr><td colspan="8" class="muted">no disks</td></tr>';
      document.getElementById('updated').textContent = new Date(now).toISOString();
      document.getElementById('stale').style.display = 'none';
    } catch (err) {
      document.getElementById('stale').style.display = 'inline';
    }
  }
  refresh();
  setInterval(refresh, 2000);
</script>
</body>
</html>
`;
