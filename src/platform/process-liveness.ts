/**
 * Whether a process with this id is running: signal 0 checks without
 * signalling. EPERM means it runs, as another user. Used to tell a lock or a
 * temporary file left by a dead process from one a live process still owns.
 */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
