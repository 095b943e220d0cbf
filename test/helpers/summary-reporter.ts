import type { Reporter } from 'vitest/reporters';
import type { RunnerTestFile, RunnerTask } from 'vitest';

/**
 * Prints the plain closing line CI reads, `N passed, N failed, N skipped`,
 * alone on the last line. It hooks `onFinished`, where vitest's default
 * reporter prints its own summary, and is listed after it.
 */
export default class SummaryReporter implements Reporter {
  onFinished(files: RunnerTestFile[] = [], errors: unknown[] = []): void {
    const counts = { passed: 0, failed: 0, skipped: 0 };
    const visit = (task: RunnerTask): void => {
      if (task.type === 'suite') {
        for (const child of task.tasks) visit(child);
        return;
      }
      const state = task.result?.state;
      if (state === 'pass') counts.passed++;
      else if (state === 'fail') counts.failed++;
      else counts.skipped++;
    };
    for (const file of files) {
      // A file that failed to load has no tests but must count as a failure.
      if (file.result?.state === 'fail' && file.tasks.length === 0) counts.failed++;
      for (const task of file.tasks) visit(task);
    }
    counts.failed += errors.length;
    process.stdout.write(`\n${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped\n`);
  }
}
