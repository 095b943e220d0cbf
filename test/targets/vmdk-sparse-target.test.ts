import * as path from 'node:path';
import { runConformanceSuite } from './conformance';
import { openDisk } from '../../src/targets/disk-spec';
import { useTempDirs } from '../helpers/tmp';

const tempDir = useTempDirs();

// 40 MiB crosses a grain-table boundary (one GT maps 32 MiB).
runConformanceSuite('vmdk monolithicSparse', {
  create: (sizeBytes) => openDisk(`vmdk:${path.join(tempDir(), 'disk.vmdk')}`, { create: { sizeBytes } }),
  reopen: (t, { readOnly }) => openDisk(t.spec, { readOnly }),
}, { sizeBytes: 40 * 1024 * 1024 });
