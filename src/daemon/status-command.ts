import { BlockrelayError } from '../retry/blockrelay-error';
import { parseCommandArgs, writeJson, type Command } from './command';

interface StatusDisk {
  diskId: string;
  health?: string;
  rpoSeconds?: number | null;
  pendingBytes?: number;
  reasons?: string[];
  recentErrors?: Array<{ code: string; message: string }>;
  state?: string;
}

function formatBytes(n: number | undefined): string {
  if (n === undefined) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

/** Renders a role's status document as terminal text. */
export function renderStatus(status: { role?: string; disks?: StatusDisk[] }): string {
  const lines = [`${status.role ?? 'blockrelay'}: ${status.disks?.length ?? 0} disk(s)`];
  for (const d of status.disks ?? []) {
    const rpo = typeof d.rpoSeconds === 'number' ? `${d.rpoSeconds.toFixed(1)} s` : '-';
    lines.push(`  ${String(d.diskId).padEnd(16)} ${String(d.health ?? '-').padEnd(8)} RPO ${rpo.padEnd(10)} pending ${formatBytes(d.pendingBytes).padEnd(10)} ${d.state ?? ''}`);
    for (const r of d.reasons ?? []) lines.push(`      ${r}`);
    const last = d.recentErrors?.[d.recentErrors.length - 1];
    if (last !== undefined) lines.push(`      last error ${last.code}: ${last.message}`);
  }
  return `${lines.join('\n')}\n`;
}

/** How long `status --url` waits for the role's answer. */
export const STATUS_FETCH_TIMEOUT_MS = 15_000;

export const statusCommand: Command = {
  path: ['status'],
  usage: 'status --url URL [--json]',
  summary: "print a role's replicated disks, health, RPO, pending bytes and last errors",
  async run(argv, io) {
    const usage = this.usage;
    const { values } = parseCommandArgs(argv, { url: { type: 'string' }, json: { type: 'boolean' } }, usage);
    if (values.url === undefined) throw new BlockrelayError('BR_USAGE', `--url is required; usage: ${usage}`);
    let status: { role?: string; disks?: StatusDisk[] };
    try {
      // A role that accepts the connection and never answers must not hang the CLI.
      const res = await fetch(new URL('/v1/status', values.url), { signal: AbortSignal.timeout(STATUS_FETCH_TIMEOUT_MS) });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      status = (await res.json()) as typeof status;
    } catch (err) {
      throw new BlockrelayError('BR_NET_UNREACHABLE', `cannot read status from ${values.url}: ${(err as Error).message}`, { cause: err });
    }
    if (values.json) writeJson(io, status);
    else io.stdout.write(renderStatus(status));
    return status.disks?.some((d) => d.health === 'Critical') ? 3 : 0;
  },
};
