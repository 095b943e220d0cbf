import { describe, expect, it } from 'vitest';
import { BlockrelayError } from '../../src/retry/blockrelay-error';
import { blobErrorCode, wrapBlobError } from '../../src/targets/blob/blob-errors';
import { blobSpec, blobUrl, containerUrl, parseBlobUrl } from '../../src/targets/blob/blob-url';
import { blobAccess, parseConnectionString } from '../../src/targets/blob/storage-credentials';
import { parseDiskSpec } from '../../src/targets/disk-spec';
import { prng } from '../helpers/prng';

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
    return undefined;
  } catch (err) {
    if (err instanceof BlockrelayError) return err.code;
    throw err;
  }
}

describe('page blob URLs', () => {
  it('parses path-style emulator URLs, keeping slashes in blob names', () => {
    const loc = parseBlobUrl('http://127.0.0.1:10000/devstoreaccount1/disks/vm1/disk0.vhd');
    expect(loc).toEqual({
      protocol: 'http:',
      host: '127.0.0.1:10000',
      accountName: 'devstoreaccount1',
      containerName: 'disks',
      blobName: 'vm1/disk0.vhd',
      pathStyle: true,
      sasToken: '',
      snapshot: '',
    });
    expect(blobUrl(loc)).toBe('http://127.0.0.1:10000/devstoreaccount1/disks/vm1/disk0.vhd');
    expect(containerUrl(loc)).toBe('http://127.0.0.1:10000/devstoreaccount1/disks');
  });

  it('parses host-style Azure URLs and keeps a SAS token out of the spec', () => {
    const loc = parseBlobUrl('https://myacct.blob.core.windows.net/vhds/os%20disk.vhd?sv=2024&sig=abc');
    expect(loc).toMatchObject({ accountName: 'myacct', containerName: 'vhds', blobName: 'os disk.vhd', pathStyle: false, sasToken: 'sv=2024&sig=abc' });
    expect(blobSpec(loc)).toBe('blob:https://myacct.blob.core.windows.net/vhds/os%20disk.vhd');
  });

  it('reads a snapshot parameter apart from the SAS token, which stays byte for byte', () => {
    const loc = parseBlobUrl('https://acct.blob.core.windows.net/vhds/d.vhd?snapshot=2026-01-02T03%3A04%3A05.1234567Z&sv=1&sig=a%2Bb%3D');
    expect(loc).toMatchObject({ snapshot: '2026-01-02T03:04:05.1234567Z', sasToken: 'sv=1&sig=a%2Bb%3D' });
    expect(blobSpec(loc)).toBe('blob:https://acct.blob.core.windows.net/vhds/d.vhd?snapshot=2026-01-02T03%3A04%3A05.1234567Z');
    expect(parseBlobUrl(blobSpec(loc).slice('blob:'.length)).snapshot).toBe(loc.snapshot);
    expect(codeOf(() => parseBlobUrl('http://h/devstoreaccount1/disks/d.vhd?snapshot=yesterday'))).toBe('BR_BLOB_URL_INVALID');
    expect(codeOf(() => parseBlobUrl('http://h/devstoreaccount1/disks/d.vhd?snapshot=2026-01-02T03:04:05Z&snapshot=2026-01-02T03:04:06Z'))).toBe('BR_BLOB_URL_INVALID');
  });

  it('takes a container URL plus a blob name', () => {
    expect(parseBlobUrl('http://localhost:10000/devstoreaccount1/disks', 'd1.vhd').blobName).toBe('d1.vhd');
    expect(parseBlobUrl('http://localhost:10000/devstoreaccount1/disks/d1.vhd', 'd1.vhd').blobName).toBe('d1.vhd');
    expect(codeOf(() => parseBlobUrl('http://localhost:10000/devstoreaccount1/disks/d1.vhd', 'd2.vhd'))).toBe('BR_BLOB_URL_INVALID');
  });

  it('refuses malformed URLs with BR_BLOB_URL_INVALID', () => {
    for (const url of [
      'not a url',
      'ftp://h/devstoreaccount1/disks/d.vhd',
      'http://h/devstoreaccount1/disks',
      'http://h/devstoreaccount1/disks/',
      'http://h/devstoreaccount1/Disks/d.vhd',
      'http://h/devstoreaccount1/ab/d.vhd',
      'http://h/UPPER/disks/d.vhd',
      'http://h/devstoreaccount1/disks/a//b',
      'http://h/devstoreaccount1/disks/../d.vhd',
      'http://user:pw@h/devstoreaccount1/disks/d.vhd',
      'http://h/devstoreaccount1/disks/d.vhd#frag',
      'http://h/devstoreaccount1/disks/%E0%A4%A',
      `http://h/devstoreaccount1/disks/${'x'.repeat(1025)}`,
    ]) {
      expect(codeOf(() => parseBlobUrl(url)), url).toBe('BR_BLOB_URL_INVALID');
    }
  });

  it('is what openDisk receives for a blob: spec', () => {
    const spec = parseDiskSpec('blob:http://127.0.0.1:10000/devstoreaccount1/disks/d.vhd');
    expect(spec).toMatchObject({ kind: 'blob', url: 'http://127.0.0.1:10000/devstoreaccount1/disks/d.vhd' });
  });
});

describe('storage connection strings', () => {
  const key = Buffer.alloc(64, 7).toString('base64');

  it('reads account name and key, ignoring endpoints', () => {
    expect(parseConnectionString(`DefaultEndpointsProtocol=http;AccountName=acct1;AccountKey=${key};BlobEndpoint=http://x/acct1;`)).toEqual({
      accountName: 'acct1',
      accountKey: key,
    });
    expect(parseConnectionString('UseDevelopmentStorage=true').accountName).toBe('devstoreaccount1');
    expect(parseConnectionString('AccountName=acct1;SharedAccessSignature=?sv=1&sig=2')).toEqual({ accountName: 'acct1', sasToken: 'sv=1&sig=2' });
  });

  it('refuses malformed strings without echoing the key', () => {
    for (const text of ['AccountKey=abc', 'AccountName=a', `AccountName=a;AccountKey=not*base64`, 'garbage', 'x'.repeat(9000)]) {
      let message = '';
      try {
        parseConnectionString(text);
      } catch (err) {
        expect(err).toMatchObject({ code: 'BR_BLOB_CREDENTIALS' });
        message = (err as Error).message;
      }
      expect(message, text.slice(0, 40)).not.toBe('');
      expect(message).not.toContain('base64;');
    }
  });

  it('demands the connection string be for the URL\'s account', () => {
    const loc = parseBlobUrl('http://127.0.0.1:1/acct1/disks/d.vhd');
    expect(codeOf(() => blobAccess(loc, undefined))).toBe('BR_BLOB_CREDENTIALS');
    expect(codeOf(() => blobAccess(loc, `AccountName=acct2;AccountKey=${key}`))).toBe('BR_BLOB_CREDENTIALS');
    expect(codeOf(() => blobAccess(loc, `AccountName=acct1;AccountKey=${key}`))).toBeUndefined();
    // A SAS token in the URL needs no connection string.
    expect(codeOf(() => blobAccess(parseBlobUrl('http://127.0.0.1:1/acct1/disks/d.vhd?sig=x'), undefined))).toBeUndefined();
  });
});

describe('storage error classification', () => {
  it('maps answers to codes: throttling, 5xx and no answer are recoverable, the rest not', () => {
    const table: Array<[number | undefined, string | undefined, string]> = [
      [429, 'TooManyRequests', 'BR_BLOB_THROTTLED'],
      [503, 'ServerBusy', 'BR_BLOB_THROTTLED'],
      [500, 'InternalError', 'BR_BLOB_SERVER_ERROR'],
      [502, undefined, 'BR_BLOB_SERVER_ERROR'],
      [408, undefined, 'BR_BLOB_NETWORK'],
      [401, undefined, 'BR_BLOB_AUTH'],
      [403, 'AuthorizationPermissionMismatch', 'BR_BLOB_AUTH'],
      [404, 'BlobNotFound', 'BR_BLOB_NOT_FOUND'],
      [409, 'LeaseAlreadyPresent', 'BR_BLOB_LEASE_HELD'],
      [412, 'LeaseIdMismatchWithBlobOperation', 'BR_BLOB_LEASE_LOST'],
      [412, 'LeaseNotPresentWithBlobOperation', 'BR_BLOB_LEASE_LOST'],
      [400, 'InvalidPageRange', 'BR_BLOB_REQUEST_FAILED'],
      [undefined, 'ECONNREFUSED', 'BR_BLOB_NETWORK'],
    ];
    for (const [statusCode, code, expected] of table) {
      expect(blobErrorCode({ statusCode, code }), `${statusCode} ${code}`).toBe(expected);
    }
    expect(blobErrorCode({ statusCode: 409, code: 'SomethingElse' }, 'acquire')).toBe('BR_BLOB_LEASE_HELD');
  });

  it('wraps SDK errors keeping the cause, and treats an uncoded defect as internal', () => {
    const sdkError = Object.assign(new Error('Server busy'), { name: 'RestError', statusCode: 503, details: { errorCode: 'ServerBusy' } });
    const wrapped = wrapBlobError(sdkError, 'Put Page', 'blob:x');
    expect(wrapped).toMatchObject({ code: 'BR_BLOB_THROTTLED', recoverable: true, cause: sdkError });
    expect(wrapped.message).toContain('HTTP 503 ServerBusy');
    expect(wrapBlobError(new TypeError('oops'), 'Put Page', 'blob:x').code).toBe('BR_INTERNAL');
    expect(wrapBlobError(Object.assign(new Error('socket hang up'), { name: 'RestError', code: 'REQUEST_SEND_ERROR' }), 'Get Blob', 'blob:x').code).toBe('BR_BLOB_NETWORK');
  });
});

describe('parsers of outside input under seeded fuzz', () => {
  const alphabet = 'abcdefghijklmnopqrstuvwxyzABC0123456789-._~:/?#[]@!$&\'()*+,;=% \u0000\u00e9';

  function mutate(next: () => number, base: string): string {
    const chars = [...base];
    const edits = 1 + Math.floor(next() * 6);
    for (let i = 0; i < edits; i++) {
      const at = Math.floor(next() * (chars.length + 1));
      const r = next();
      const c = alphabet[Math.floor(next() * alphabet.length)]!;
      if (r < 0.4) chars.splice(at, 0, c);
      else if (r < 0.7) chars.splice(at, 1);
      else chars[at] = c;
    }
    return chars.join('');
  }

  it('answers mutated blob URLs with a location or BR_BLOB_URL_INVALID, never anything else', () => {
    const next = prng(0xb10b);
    const bases = ['http://127.0.0.1:10000/devstoreaccount1/disks/vm/disk0.vhd', 'https://acct.blob.core.windows.net/vhds/d.vhd?sv=1&sig=x'];
    let valid = 0;
    for (let i = 0; i < 5000; i++) {
      const url = mutate(next, bases[i % 2]!);
      const code = codeOf(() => {
        const loc = parseBlobUrl(url);
        // Whatever parses must round-trip through the URL we would call.
        expect(parseBlobUrl(blobUrl(loc))).toMatchObject({ accountName: loc.accountName, containerName: loc.containerName, blobName: loc.blobName });
      });
      if (code === undefined) valid++;
      else expect(code).toBe('BR_BLOB_URL_INVALID');
    }
    expect(valid).toBeGreaterThan(100);
  });

  it('answers mutated connection strings with parts or BR_BLOB_CREDENTIALS, never anything else', () => {
    const next = prng(0xc0de);
    const base = `DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=${Buffer.alloc(64, 9).toString('base64')};BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;`;
    for (let i = 0; i < 5000; i++) {
      const text = mutate(next, base);
      const code = codeOf(() => parseConnectionString(text));
      if (code !== undefined) expect(code).toBe('BR_BLOB_CREDENTIALS');
    }
  });
});
