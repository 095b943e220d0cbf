import * as path from 'node:path';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  // The config lives in test/ (the repository's top level holds only what
  // the layout names); paths below are relative to the repository root.
  root: path.resolve(__dirname, '..'),
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    // Two cores on the CI machine: interoperability tests start qemu tools
    // and Azurite, so running more files at once only adds contention.
    poolOptions: { forks: { maxForks: 2, minForks: 1 } },
    testTimeout: 60_000,
    hookTimeout: 60_000,
    reporters: ['default', './test/helpers/summary-reporter.ts'],
  },
});
