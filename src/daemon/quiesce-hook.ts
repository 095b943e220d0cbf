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
    // In a process group of its own, so a timeout kills what the hook started
    // too: an `fsfreeze -f` left running past it would freeze the file
    // system after we gave up and thawed.
    const child = spawn('/bin/sh', ['-c', `${hook.command} ${phase}`], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let output = '';
    const keep = (d: Buffer): void => {
      if (output.length < QUIESCE_DEFAULTS.outputBytesMax) output += d.toString('utf8');
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    const timer = setTimeout(() => {
      killGroup(child.pid);
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

/** SIGKILLs a hook's whole process group (its shell and everything it started). */
function killGroup(pid: number | undefined): void {
  if (pid === undefined) return;
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // Already gone.
  }
}

/**
 * freeze → `cut()` → thaw. Returns what the cut returned. Without a hook the
 * cut alone runs (the tag still marks the point the operator asked for).
 * A freeze that fails or times out is thawed all the same (a hook may have
 * frozen one file system before failing on the next), and its error is the
 * one reported; no cut is taken then.
 */
export async function withQuiesce<T>(hook: QuiesceHook | undefined, env: Record<string, string>, cut: () => Promise<T>): Promise<T> {
  if (hook === undefined) return cut();
  try {
    await runPhase(hook, 'freeze', env, hook.freezeTimeoutMs ?? QUIESCE_DEFAULTS.freezeTimeoutMs);
  } catch (err) {
    await runPhase(hook, 'thaw', env, hook.thawTimeoutMs ?? QUIESCE_DEFAULTS.thawTimeoutMs).catch(() => undefined);
    throw err;
  }
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
