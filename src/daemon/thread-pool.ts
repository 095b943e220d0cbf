/**
 * Sizes libuv's thread pool for a blockrelay role. Imported first by the
 * CLI entry (src/daemon/cli.ts), for its side effect only.
 *
 * Every asynchronous file call of a role (fsyncs of logs, spool and ledger
 * files, target reads and writes, the native positioned writes and hashed
 * reads) runs on this pool, which Node starts with 4 threads per process,
 * shared by the hop worker threads too. A target on a device that stops
 * answering (a dead NFS datastore, a stuck disk) keeps one pool thread per
 * call it has in flight; with 4 threads a single hung disk can hold them
 * all, and then no other disk's fsync ever completes.
 *
 * libuv reads `UV_THREADPOOL_SIZE` once, when the pool first starts (the
 * first queued job), so setting it here works only because nothing before
 * this module has used the pool: loading modules reads files synchronously.
 * test/daemon/pool-isolation.test.ts checks that it takes effect.
 */

/**
 * Pool threads a role starts with when the operator set none. A sparse
 * VMDK target has at most one call running at a time, and within it at
 * most 4 pool jobs (the parallel pre-image reads of `readMany`) plus one
 * background writeback sync: 5 threads held by one hung disk. 16 leaves 11
 * for every other disk with one disk hung, and 6 with two (more than the 4
 * the whole process had before). Idle threads cost an address-space
 * reservation for their stacks, little memory; the bound stays well under
 * libuv's own cap of 1024.
 */
export const ROLE_THREADPOOL_SIZE = 16;

/**
 * Sets `UV_THREADPOOL_SIZE` in `env` unless the operator set it (any value:
 * theirs wins, libuv clamps it to 1..1024). Returns the value in force.
 */
export function defaultThreadPoolSize(env: NodeJS.ProcessEnv = process.env): string {
  const set = env.UV_THREADPOOL_SIZE;
  if (set !== undefined && set.trim() !== '') return set;
  env.UV_THREADPOOL_SIZE = String(ROLE_THREADPOOL_SIZE);
  return env.UV_THREADPOOL_SIZE;
}

defaultThreadPoolSize();
