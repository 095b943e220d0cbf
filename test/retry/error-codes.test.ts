import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ERROR_CODES } from '../../src/retry/error-codes';
import { BlockrelayError, wrapError } from '../../src/retry/blockrelay-error';
import { renderErrorsDoc } from '../../src/retry/errors-doc';

describe('error registry', () => {
  it('names every code BR_ in capitals with a one-line description', () => {
    for (const [code, spec] of Object.entries(ERROR_CODES)) {
      expect(code).toMatch(/^BR_[A-Z0-9_]+$/);
      expect(spec.description.length).toBeGreaterThan(10);
      expect(spec.description).not.toContain('\n');
    }
  });

  it('carries the code, recoverability and cause on each error', () => {
    const cause = new Error('root');
    const err = new BlockrelayError('BR_IO', 'read failed', { cause, details: { offset: 4096 } });
    expect(err.recoverable).toBe(true);
    expect(err.cause).toBe(cause);
    expect(err.toLine()).toBe('BR_IO: read failed');
    expect(wrapError(err, 'BR_INTERNAL', 'x')).toBe(err);
  });

  it('keeps docs/errors.md generated from the registry', () => {
    const doc = fs.readFileSync(path.join(__dirname, '..', '..', 'docs', 'errors.md'), 'utf8');
    expect(doc).toBe(renderErrorsDoc());
  });
});
