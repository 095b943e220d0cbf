import * as path from 'node:path';
import { runConformanceSuite } from './conformance';
import { openDisk } from '../../src/targets/disk-spec';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();

runConformanceSuite('vmdk monolithicFlat', {
  create: (sizeBytes) => openDisk(`vmdk-flat:${path.join(tempDir(), 'disk.vmdk')}`, { create: { sizeBytes } }),
  reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
});
