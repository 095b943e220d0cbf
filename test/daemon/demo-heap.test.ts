import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { DEMO_INITIAL_OLD_SPACE_MB } from '../../src/daemon/demo';
import { REPO_ROOT } from '../helpers/cli';

describe('npm start heap setting', () => {
  it('passes node the starting old generation the demo documents, and node takes it', () => {
    const start = (JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { scripts: { start: string } }).scripts.start;
    const flag = /--initial-old-space-size=(\d+)/.exec(start);
    expect(flag, start).not.toBeNull();
    expect(Number(flag![1])).toBe(DEMO_INITIAL_OLD_SPACE_MB);
    // Spelled as node accepts it (an unknown option makes node exit 9 before running anything).
    expect(execFileSync(process.execPath, [flag![0], '-e', 'process.stdout.write("ok")']).toString()).toBe('ok');
  });
});
