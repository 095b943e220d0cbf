import type xxhashWasm from 'xxhash-wasm' with { 'resolution-mode': 'import' };

/**
 * The one place xxhash-wasm is loaded. The package ships ESM-only type
 * declarations but a CommonJS build, so it is required at run time and typed
 * from its ESM declarations; importing it directly from CommonJS code does
 * not compile.
 */
// eslint-disable-next-line @typescript-eslint/no-require-imports
export const loadXxhash: typeof xxhashWasm = require('xxhash-wasm') as typeof xxhashWasm;

export type XxhashApi = Awaited<ReturnType<typeof xxhashWasm>>;
