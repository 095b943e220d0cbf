import { spawn } from 'node:child_process';
import { BlockrelayError } from '../retry/blockrelay-error';

/**
 * Runs the operator's quiesce hook around an app-consistent cut: the hook is
 * called with `freeze` before the cut and `thaw` after it, e.g. a script
 * that runs `fsfreeze -f /data` / `fsfreeze -u /data` or puts a database in
 * backup mode. `BLOCKRELAY_DISKS` and `BLOCKRELAY_TAG` tell it what is being
 * tagged. Each phase is bounded in time; thaw always runs once freeze
 * started, even when the cut fails, so an application is never left frozen
 * by us.
 */
export const QUIESCE_DEFAULTS = {
  freezeTimeoutMs: 60_000,
  thawTimeoutMs: 60_000,
  /** Output kept from the hook for error messages. */
  outputBytesMax: 4096,
} as const;

export interface QuiesceHook {
  readonly command: string;
  readonly freezeTimeoutMs?: number;
  readonly thawTimeoutMs?: number;
}

function runPhase(hook: QuiesceHook, phase: 'freeze' | 'thaw', env: Record<string, string>, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('/bin/sh', ['-c', `${hook.command} ${phase}`], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    const keep = (d: Buffer): void => {
      if (output.length < QUIESCE_DEFAULTS.outputBytesMax) output += d.toString('utf8');
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new BlockrelayError('BR_QUIESCE_FAILED', `quiesce hook '${hook.command} ${phase}' did not finish within ${timeoutMs} ms`));
    }, timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(new BlockrelayError('BR_QUIESCE_FAILED', `quiesce hook '${hook.command}' could not start: ${err.message}`, { cause: err }));
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve();
      else reject(new BlockrelayError('BR_QUIESCE_FAILED', `quiesce hook '${hook.command} ${phase}' exited with ${code ?? signal}: ${output.trim().slice(0, 500)}`));
    });
  });
}

/**
 * freeze → `cut()` → thaw. Returns what the cut returned. Without a hook the
 * cut alone runs (the tag still marks the point the operator asked for).
 */
export async function withQuiesce<T>(hook: QuiesceHook | undefined, env: Record<string, string>, cut: () => Promise<T>): Promise<T> {
  if (hook === undefined) return cut();
  await runPhase(hook, 'freeze', env, hook.freezeTimeoutMs ?? QUIESCE_DEFAULTS.freezeTimeoutMs);
  let result: T;
  try {
    result = await cut();
  } catch (err) {
    await runPhase(hook, 'thaw', env, hook.thawTimeoutMs ?? QUIESCE_DEFAULTS.thawTimeoutMs).catch(() => undefined);
    throw err;
  }
  await runPhase(hook, 'thaw', env, hook.thawTimeoutMs ?? QUIESCE_DEFAULTS.thawTimeoutMs);
  return result;
}
