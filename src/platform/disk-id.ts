/**
 * Disk ids name files (logs, spools, journals), NBD exports and URL path
 * segments, so every role accepts the same ones: 1 to 64 letters, digits,
 * ".", "_" or "-", starting with a letter or digit (no separators, no "..").
 */
export const DISK_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
