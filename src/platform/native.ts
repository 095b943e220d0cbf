import * as path from 'node:path';
import * as fs from 'node:fs';
import { BlockrelayError } from '../retry/blockrelay-error';

/**
 * Loads the C++ addon built by node-gyp into `build/Release`. The path is
 * found by walking up to the package root, so it works from `src/` (tests,
 * tsx) and from `dist/` (installed CLI) alike.
 */
function packageRoot(): string {
  let dir = __dirname;
  for (let i = 0; i < 6; i++) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'binding.gyp'))) return dir;
    dir = path.dirname(dir);
  }
  throw new BlockrelayError('BR_NATIVE_UNAVAILABLE', `cannot find the blockrelay package root above ${__dirname}`);
}

let cached: unknown;

/** The raw addon exports; typed wrappers live next to the domain that uses them. */
export function loadNative<T>(): T {
  if (cached !== undefined) return cached as T;
  const file = path.join(packageRoot(), 'build', 'Release', 'blockrelay.node');
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    cached = require(file);
  } catch (err) {
    throw new BlockrelayError('BR_NATIVE_UNAVAILABLE', `cannot load ${file}; run npm install`, { cause: err });
  }
  return cached as T;
}
