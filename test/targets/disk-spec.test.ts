import { describe, expect, it } from 'vitest';
import { openDisk, parseDiskSpec } from '../../src/targets/disk-spec';

describe('disk spec parsing', () => {
  it('parses every kind DESIGN.md lists', () => {
    expect(parseDiskSpec('raw:/dev/sdb')).toEqual({ kind: 'raw', spec: 'raw:/dev/sdb', path: '/dev/sdb' });
    expect(parseDiskSpec('vmdk:/data/d0.vmdk')).toMatchObject({ kind: 'vmdk', path: '/data/d0.vmdk' });
    expect(parseDiskSpec('vmdk-flat:rel/d0.vmdk')).toMatchObject({ kind: 'vmdk-flat', path: 'rel/d0.vmdk' });
    expect(parseDiskSpec('vhd:C:/x.vhd')).toMatchObject({ kind: 'vhd', path: 'C:/x.vhd' });
    expect(parseDiskSpec('blob:http://127.0.0.1:10000/devstoreaccount1/c/d.vhd')).toMatchObject({ kind: 'blob', url: 'http://127.0.0.1:10000/devstoreaccount1/c/d.vhd' });
    expect(parseDiskSpec('nbd://localhost:10810/disk0')).toMatchObject({ kind: 'nbd', host: 'localhost', port: 10810, exportName: 'disk0' });
    expect(parseDiskSpec('nbd://[::1]/')).toMatchObject({ kind: 'nbd', host: '::1', port: 10809, exportName: '' });
  });

  it('refuses malformed specs with BR_TARGET_SPEC_INVALID', () => {
    for (const bad of ['', '/plain/path', 'raw:', 'qcow2:/x', 'blob:ftp://h/a', 'blob:/local', ':x', 'nbd://', 'nbd://host/%zz']) {
      expect(() => parseDiskSpec(bad), bad).toThrow(expect.objectContaining({ code: 'BR_TARGET_SPEC_INVALID' }));
    }
  });

  it('refuses to open a kind this build does not wire with a coded error', async () => {
    await expect(openDisk('qcow2:/x')).rejects.toMatchObject({ code: 'BR_TARGET_SPEC_INVALID' });
  });
});
