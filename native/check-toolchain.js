'use strict';
// Runs before node-gyp during `npm install` so that a machine without a C++
// toolchain fails with a sentence saying what to install, instead of a page
// of node-gyp output.
const { execFileSync } = require('node:child_process');

function has(cmd, args) {
  try {
    execFileSync(cmd, args, { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

const missing = [];
if (!has('python3', ['--version'])) missing.push('python3');
if (!has('make', ['--version'])) missing.push('make');
if (!has(process.env.CXX || 'g++', ['--version'])) missing.push('g++ (or set CXX)');
if (missing.length > 0) {
  console.error(
    `blockrelay: cannot build the native addon, missing: ${missing.join(', ')}.\n` +
      'On Debian/Ubuntu run: apt-get install -y python3 make g++',
  );
  process.exit(1);
}
