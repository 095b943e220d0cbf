import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { retentionHooksFromConfig } from '../../src/retention/retention-hooks';
import { useTempDirs } from '../helpers/tmp';
import { retentionSetup, useRetentionDirs } from './retention-fixture';

describe('retention hooks', () => {
  const tmp = useTempDirs();
  const retentionTmp = useRetentionDirs();

  it('loads a disk\'s history once for callers that come while it loads', async () => {
    const setup = retentionSetup(path.join(tmp(), 'roles'), retentionTmp());
    const hooks = retentionHooksFromConfig(setup.config)!;
    // The resync journal's openSession and an apply's beforeApply can both be first.
    const [a, b, c] = await Promise.all([hooks.history('disk0'), hooks.history('disk0'), hooks.history('disk0')]);
    expect(b).toBe(a);
    expect(c).toBe(a);
    expect(await hooks.history('disk0')).toBe(a);
  });
});
