/**
 * Checks made on arguments before they cross into the C++ addon, which
 * refuses bad ones only by returning undefined: here they become a
 * RangeError that names the argument.
 */

/** Largest file descriptor the addon accepts (a C int). */
export const MAX_FD = 0x7fffffff;

/** Throws a RangeError unless `value` is a safe integer in `[min, max]`. */
export function requireInteger(name: string, value: number, min: number, max: number): void {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} must be an integer from ${min} to ${max}, got ${typeof value === 'number' ? value : typeof value}`);
  }
}
