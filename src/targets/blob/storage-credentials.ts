import { AnonymousCredential, StorageSharedKeyCredential } from '@azure/storage-blob';
import { BlockrelayError } from '../../retry/blockrelay-error';
import type { BlobLocation } from './blob-url';

/** The environment variable the DESIGN names for page-blob credentials. */
export const CONNECTION_STRING_ENV = 'AZURE_STORAGE_CONNECTION_STRING';

/** Microsoft's published development-storage account, for `UseDevelopmentStorage=true`. */
const DEVELOPMENT_ACCOUNT_NAME = 'devstoreaccount1';
const DEVELOPMENT_ACCOUNT_KEY = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';
/** Bound on the connection string we parse: real ones are a few hundred characters. */
const CONNECTION_STRING_MAX_CHARS = 8192;

/** What a storage connection string says about one account. */
export interface ConnectionStringParts {
  readonly accountName: string;
  readonly accountKey?: string;
  readonly sasToken?: string;
}

function bad(why: string): BlockrelayError {
  // Never echo the string itself: it holds the account key.
  return new BlockrelayError('BR_BLOB_CREDENTIALS', `${CONNECTION_STRING_ENV} ${why}`);
}

/**
 * Parses `Key=Value;Key=Value` storage connection strings: AccountName with
 * AccountKey or SharedAccessSignature, or `UseDevelopmentStorage=true`.
 * Endpoints in the string are ignored: the disk spec's URL says where the
 * blob is. Throws BR_BLOB_CREDENTIALS without echoing secrets.
 */
export function parseConnectionString(text: string): ConnectionStringParts {
  if (text.length > CONNECTION_STRING_MAX_CHARS) throw bad(`is longer than ${CONNECTION_STRING_MAX_CHARS} characters`);
  const fields = new Map<string, string>();
  for (const part of text.split(';')) {
    if (part.trim() === '') continue;
    const eq = part.indexOf('=');
    if (eq <= 0) throw bad('has a part that is not Key=Value');
    fields.set(part.slice(0, eq).trim().toLowerCase(), part.slice(eq + 1).trim());
  }
  if (fields.get('usedevelopmentstorage')?.toLowerCase() === 'true') {
    return { accountName: DEVELOPMENT_ACCOUNT_NAME, accountKey: DEVELOPMENT_ACCOUNT_KEY };
  }
  const accountName = fields.get('accountname');
  if (accountName === undefined || accountName === '') throw bad('has no AccountName');
  const accountKey = fields.get('accountkey');
  const sasToken = fields.get('sharedaccesssignature');
  if (accountKey !== undefined) {
    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(accountKey) || accountKey.length % 4 !== 0) throw bad('has an AccountKey that is not base64');
    return { accountName, accountKey };
  }
  if (sasToken !== undefined && sasToken !== '') return { accountName, sasToken: sasToken.replace(/^\?/, '') };
  throw bad('has neither AccountKey nor SharedAccessSignature');
}

/** The credential for a blob, and a SAS token to append to its URL ('' when none). */
export interface BlobAccess {
  readonly credential: StorageSharedKeyCredential | AnonymousCredential;
  readonly sasToken: string;
}

/**
 * Credentials for `location`: a SAS token in the URL itself wins; otherwise
 * the connection string, whose account must be the URL's account.
 */
export function blobAccess(location: BlobLocation, connectionString: string | undefined): BlobAccess {
  if (location.sasToken !== '') return { credential: new AnonymousCredential(), sasToken: location.sasToken };
  if (connectionString === undefined || connectionString.trim() === '') {
    throw new BlockrelayError('BR_BLOB_CREDENTIALS', `${CONNECTION_STRING_ENV} is not set; it must hold the key of storage account ${location.accountName}`, {
      details: { accountName: location.accountName },
    });
  }
  const parts = parseConnectionString(connectionString);
  if (parts.accountName !== location.accountName) {
    throw new BlockrelayError(
      'BR_BLOB_CREDENTIALS',
      `${CONNECTION_STRING_ENV} is for account ${parts.accountName}, but the blob is in account ${location.accountName}`,
      { details: { accountName: location.accountName, connectionAccountName: parts.accountName } },
    );
  }
  if (parts.accountKey !== undefined) {
    return { credential: new StorageSharedKeyCredential(parts.accountName, parts.accountKey), sasToken: '' };
  }
  return { credential: new AnonymousCredential(), sasToken: parts.sasToken ?? '' };
}
