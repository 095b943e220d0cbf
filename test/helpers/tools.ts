import { execFileSync } from 'node:child_process';

/**
 * Whether an external tool (qemu-img, nbdcopy, fio, rsync ...) is on PATH.
 * In CI `.ci/run` installs them, so a missing tool there is a failure, not a
 * skip: `requireTool` throws when CI=true.
 */
export function hasTool(name: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** True when the tool is present; in CI a missing tool throws instead. */
export function requireTool(name: string): boolean {
  const present = hasTool(name);
  if (!present && process.env.CI === 'true') throw new Error(`${name} is not installed; .ci/run should install it`);
  return present;
}
