import { BlockrelayError } from '../retry/blockrelay-error';

/**
 * A small typed schema for the daemon's JSON config. Each field knows its
 * type, range and default, so one validation pass can refuse a config whole,
 * with a message naming the key, what was expected and what arrived, before
 * any role starts.
 */
export interface Field<T> {
  readonly kind: string;
  /** What the field accepts, in words, for error messages. */
  readonly expected: string;
  readonly optional: boolean;
  readonly defaultValue: T | undefined;
  /** Checks and converts a JSON value; returns an error text or the value. */
  parse(value: unknown, path: string): T;
  /** Converts an environment variable's text, for scalar fields. */
  fromEnv?(text: string, path: string): T;
}

type Infer<F> = F extends Field<infer T> ? T : never;
export type Shape = Record<string, Field<unknown>>;
export type InferShape<S extends Shape> = { [K in keyof S]: Infer<S[K]> };

export function configError(path: string, expected: string, got: unknown): BlockrelayError {
  return new BlockrelayError('BR_CONFIG_INVALID', `config key '${path}': expected ${expected}, got ${describe(got)}`, { details: { key: path } });
}

function describe(value: unknown): string {
  if (value === undefined) return 'nothing (the key is required)';
  if (value === null) return 'null';
  if (Array.isArray(value)) return `an array of ${value.length}`;
  if (typeof value === 'object') return 'an object';
  const text = JSON.stringify(value);
  return `${text.length > 60 ? `${text.slice(0, 57)}...` : text} (${typeof value})`;
}

interface ScalarOptions<T> {
  default?: T;
  optional?: boolean;
}

function scalar<T>(kind: string, expected: string, check: (v: unknown) => v is T, fromText: (t: string) => unknown, options: ScalarOptions<T>): Field<T> {
  const field: Field<T> = {
    kind,
    expected,
    optional: options.optional === true || options.default !== undefined,
    defaultValue: options.default,
    parse(value, path) {
      if (!check(value)) throw configError(path, expected, value);
      return value;
    },
    fromEnv(text, path) {
      return field.parse(fromText(text), path);
    },
  };
  return field;
}

export const field = {
  integer(options: ScalarOptions<number> & { min?: number; max?: number } = {}): Field<number> {
    const min = options.min ?? 0;
    const max = options.max ?? Number.MAX_SAFE_INTEGER;
    return scalar('integer', `a whole number from ${min} to ${max}`, (v): v is number => typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max, (t) => (/^-?\d+$/.test(t.trim()) ? Number(t) : t), options);
  },
  number(options: ScalarOptions<number> & { min?: number; max?: number } = {}): Field<number> {
    const min = options.min ?? 0;
    const max = options.max ?? Number.MAX_VALUE;
    return scalar('number', `a number from ${min} to ${max}`, (v): v is number => typeof v === 'number' && Number.isFinite(v) && v >= min && v <= max, (t) => (t.trim() !== '' && Number.isFinite(Number(t)) ? Number(t) : t), options);
  },
  string(options: ScalarOptions<string> & { minLength?: number; maxLength?: number; pattern?: RegExp; what?: string } = {}): Field<string> {
    const minLength = options.minLength ?? 1;
    const maxLength = options.maxLength ?? 4096;
    const what = options.what ?? `a string of ${minLength} to ${maxLength} characters${options.pattern ? ` matching ${options.pattern}` : ''}`;
    return scalar('string', what, (v): v is string => typeof v === 'string' && v.length >= minLength && v.length <= maxLength && (options.pattern === undefined || options.pattern.test(v)), (t) => t, options);
  },
  boolean(options: ScalarOptions<boolean> = {}): Field<boolean> {
    return scalar('boolean', 'true or false', (v): v is boolean => typeof v === 'boolean', (t) => (t === 'true' ? true : t === 'false' ? false : t), options);
  },
  enumOf<const V extends string>(values: readonly V[], options: ScalarOptions<V> = {}): Field<V> {
    return scalar('enum', `one of ${values.map((v) => `"${v}"`).join(', ')}`, (v): v is V => typeof v === 'string' && (values as readonly string[]).includes(v), (t) => t, options);
  },
  object<S extends Shape>(shape: S, options: { optional?: boolean } = {}): Field<InferShape<S>> & { readonly shape: S } {
    return {
      kind: 'object',
      expected: 'an object',
      shape,
      optional: options.optional === true,
      defaultValue: undefined,
      parse(value, path) {
        if (value === undefined && options.optional !== true) value = {};
        if (typeof value !== 'object' || value === null || Array.isArray(value)) throw configError(path, 'an object', value);
        return parseShape(shape, value as Record<string, unknown>, path);
      },
    };
  },
  array<T>(item: Field<T>, options: { maxItems: number; optional?: boolean; default?: T[] }): Field<T[]> {
    return {
      kind: 'array',
      expected: `an array of at most ${options.maxItems} items`,
      optional: options.optional === true || options.default !== undefined,
      defaultValue: options.default,
      parse(value, path) {
        if (!Array.isArray(value) || value.length > options.maxItems) throw configError(path, `an array of at most ${options.maxItems} items`, value);
        return value.map((v, i) => item.parse(v, `${path}[${i}]`));
      },
    };
  },
};

/** Validates `input` against `shape`: unknown keys, missing keys and bad values are refused. */
export function parseShape<S extends Shape>(shape: S, input: Record<string, unknown>, path = ''): InferShape<S> {
  const prefix = path === '' ? '' : `${path}.`;
  for (const key of Object.keys(input)) {
    if (!Object.prototype.hasOwnProperty.call(shape, key)) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `config key '${prefix}${key}' is unknown; known keys${path === '' ? '' : ` in '${path}'`}: ${Object.keys(shape).join(', ')}`, { details: { key: `${prefix}${key}` } });
    }
  }
  const out: Record<string, unknown> = {};
  for (const [key, f] of Object.entries(shape)) {
    const value = input[key];
    if (value === undefined) {
      if (f.defaultValue !== undefined) out[key] = f.defaultValue;
      else if (f.kind === 'object' && !f.optional) out[key] = f.parse({}, `${prefix}${key}`);
      else if (!f.optional) throw configError(`${prefix}${key}`, f.expected, undefined);
      continue;
    }
    out[key] = f.parse(value, `${prefix}${key}`);
  }
  return out as InferShape<S>;
}

/** `retention.windowHours` -> `BLOCKRELAY_RETENTION__WINDOW_HOURS`. */
export function envName(path: string): string {
  return `BLOCKRELAY_${path
    .split('.')
    .map((part) => part.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase())
    .join('__')}`;
}

/** Every scalar key path of a shape, for environment overrides. */
export function scalarPaths(shape: Shape, path = ''): Array<{ path: string; field: Field<unknown> }> {
  const out: Array<{ path: string; field: Field<unknown> }> = [];
  for (const [key, f] of Object.entries(shape)) {
    const p = path === '' ? key : `${path}.${key}`;
    const nested = (f as { shape?: Shape }).shape;
    if (nested !== undefined) out.push(...scalarPaths(nested, p));
    else if (f.fromEnv !== undefined) out.push({ path: p, field: f });
  }
  return out;
}
