import { BlockrelayError } from '../../retry/blockrelay-error';

/**
 * Where a page blob lives, from a `blob:URL` disk spec (DESIGN.md):
 * `http(s)://host[:port]/account/container/blob` (path style, as Azurite and
 * other emulators serve accounts), or a container URL
 * `http(s)://host[:port]/account/container` plus a blob name given beside it.
 * Hosts of the form `ACCOUNT.blob.<suffix>` (the public Azure endpoints) are
 * read host style: `https://ACCOUNT.blob.core.windows.net/container/blob`.
 * A `snapshot=` query parameter names a blob snapshot (read-only); any
 * other query string is kept as a shared access signature.
 */
export interface BlobLocation {
  /** `http:` or `https:`. */
  readonly protocol: 'http:' | 'https:';
  /** Host and optional port, as in the URL. */
  readonly host: string;
  readonly accountName: string;
  readonly containerName: string;
  readonly blobName: string;
  /** True when the account is the first path segment (emulator style). */
  readonly pathStyle: boolean;
  /** The query string without `?` and without `snapshot=` (a SAS token), or empty. */
  readonly sasToken: string;
  /** The snapshot time stamp (e.g. `2026-01-01T00:00:00.1234567Z`), or empty for the base blob. */
  readonly snapshot: string;
}

/** Storage limits on names (Azure "Naming and referencing containers, blobs, and metadata"). */
const ACCOUNT_NAME_PATTERN = /^[a-z0-9]{3,24}$/;
const CONTAINER_NAME_PATTERN = /^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$/;
const BLOB_NAME_MAX_CHARS = 1024;
const HOST_STYLE_PATTERN = /^([a-z0-9]{3,24})\.blob\./;
/** Snapshot ids are ISO-8601 UTC time stamps with up to 7 fractional digits. */
const SNAPSHOT_PATTERN = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,7})?Z$/;

function invalid(url: string, why: string): BlockrelayError {
  return new BlockrelayError('BR_BLOB_URL_INVALID', `bad page blob URL '${url}': ${why}; expected http(s)://host[:port]/account/container/blob`, {
    details: { url },
  });
}

/**
 * Parses a page blob URL. With `blobName`, `url` may be a container URL (or
 * must be, when it names a blob already the two must agree). Throws
 * BR_BLOB_URL_INVALID naming what is wrong.
 */
export function parseBlobUrl(url: string, blobName?: string): BlobLocation {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw invalid(url, 'not a URL');
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw invalid(url, `protocol ${parsed.protocol} is not http: or https:`);
  if (parsed.username !== '' || parsed.password !== '') throw invalid(url, 'credentials belong in AZURE_STORAGE_CONNECTION_STRING, not in the URL');
  if (parsed.hash !== '') throw invalid(url, 'a fragment has no meaning here');
  const segments = parsed.pathname.split('/').slice(1);
  let decoded: string[];
  try {
    decoded = segments.map((s) => decodeURIComponent(s));
  } catch {
    throw invalid(url, 'the path holds a malformed %-escape');
  }
  const hostStyle = HOST_STYLE_PATTERN.exec(parsed.hostname);
  let accountName: string;
  let rest: string[];
  if (hostStyle !== null) {
    accountName = hostStyle[1]!;
    rest = decoded;
  } else {
    accountName = decoded[0] ?? '';
    rest = decoded.slice(1);
  }
  const containerName = rest[0] ?? '';
  let name = rest.slice(1).join('/');
  if (blobName !== undefined) {
    if (name !== '' && name !== blobName) throw invalid(url, `it names blob '${name}' but blob '${blobName}' was asked for`);
    name = blobName;
  }
  if (!ACCOUNT_NAME_PATTERN.test(accountName)) throw invalid(url, `account name '${accountName}' is not 3-24 lowercase letters and digits`);
  if (!CONTAINER_NAME_PATTERN.test(containerName)) {
    throw invalid(url, `container name '${containerName}' is not 3-63 lowercase letters, digits and single hyphens`);
  }
  if (name === '') throw invalid(url, 'no blob name after the container');
  if (name.length > BLOB_NAME_MAX_CHARS) throw invalid(url, `blob name is longer than ${BLOB_NAME_MAX_CHARS} characters`);
  if (name.endsWith('/') || name.split('/').some((s) => s === '' || s === '.' || s === '..')) {
    throw invalid(url, `blob name '${name}' has an empty, '.' or '..' path segment`);
  }
  // The SAS part is kept byte for byte (re-encoding could change its signature).
  const params = parsed.search.replace(/^\?/, '').split('&').filter((p) => p !== '');
  const snapshots = params.filter((p) => p.startsWith('snapshot='));
  const sasParams = params.filter((p) => !p.startsWith('snapshot='));
  let snapshot = '';
  if (snapshots.length > 0) {
    try {
      snapshot = decodeURIComponent(snapshots[0]!.slice('snapshot='.length));
    } catch {
      throw invalid(url, 'the snapshot holds a malformed %-escape');
    }
    if (snapshots.length > 1 || !SNAPSHOT_PATTERN.test(snapshot)) throw invalid(url, `snapshot '${snapshot}' is not one ISO-8601 UTC time stamp`);
  }
  return {
    protocol: parsed.protocol,
    host: parsed.host,
    accountName,
    containerName,
    blobName: name,
    pathStyle: hostStyle === null,
    sasToken: sasParams.join('&'),
    snapshot,
  };
}

/** The service endpoint URL of the account, e.g. `http://127.0.0.1:10000/devstoreaccount1`. */
export function accountUrl(location: BlobLocation): string {
  const base = `${location.protocol}//${location.host}`;
  return location.pathStyle ? `${base}/${location.accountName}` : base;
}

/** The container's URL without a SAS token. */
export function containerUrl(location: BlobLocation): string {
  return `${accountUrl(location)}/${location.containerName}`;
}

/** The blob's URL without a SAS token, each path segment escaped. */
export function blobUrl(location: BlobLocation): string {
  const blobPath = location.blobName.split('/').map(encodeURIComponent).join('/');
  return `${containerUrl(location)}/${blobPath}`;
}

/** The canonical `blob:` spec for a location (SAS token left out, so it is safe to log; snapshot kept). */
export function blobSpec(location: BlobLocation): string {
  const snapshot = location.snapshot === '' ? '' : `?snapshot=${encodeURIComponent(location.snapshot)}`;
  return `blob:${blobUrl(location)}${snapshot}`;
}
