import { describe, expect, it } from 'vitest';
import { ERROR_CODES } from '../../src/retry/error-codes';
import { AttachedDisks, MAX_ATTACHED_DISKS } from '../../src/targets/attached-disks';

describe('attached disks of a master target', () => {
  it('accepts 60 disks and refuses the 61st with BR_TARGET_TOO_MANY_DISKS', () => {
    expect(MAX_ATTACHED_DISKS).toBe(60);
    const disks = new AttachedDisks();
    for (let i = 0; i < 60; i++) disks.attach(`disk${i}`, `vmdk:/datastore/disk${i}.vmdk`);
    expect(disks.size).toBe(60);
    expect(() => disks.attach('disk60', 'vmdk:/datastore/disk60.vmdk')).toThrow(expect.objectContaining({ code: 'BR_TARGET_TOO_MANY_DISKS' }));
    expect(ERROR_CODES.BR_TARGET_TOO_MANY_DISKS.recoverable).toBe(false);
    expect(disks.size).toBe(60);
    expect(disks.specOf('disk60')).toBeUndefined();
  });

  it('makes room again when a disk is detached', () => {
    const disks = new AttachedDisks();
    for (let i = 0; i < 60; i++) disks.attach(`d${i}`, `raw:/t/d${i}.img`);
    expect(disks.detach('d7')).toBe(true);
    expect(disks.detach('d7')).toBe(false);
    disks.attach('d60', 'raw:/t/d60.img');
    expect(disks.list().map((d) => d.id)).toContain('d60');
  });

  it('treats attaching the same disk again as a no-op that does not count twice', () => {
    const disks = new AttachedDisks(2);
    disks.attach('a', 'vmdk:/t/a.vmdk');
    disks.attach('a', 'vmdk:/t/a.vmdk');
    disks.attach('b', 'vmdk:/t/b.vmdk');
    expect(disks.size).toBe(2);
  });

  it('refuses one id with two specs, one spec for two ids, and bad specs', () => {
    const disks = new AttachedDisks();
    disks.attach('a', 'vmdk:/t/a.vmdk');
    expect(() => disks.attach('a', 'vmdk:/t/other.vmdk')).toThrow(expect.objectContaining({ code: 'BR_CONFIG_INVALID' }));
    expect(() => disks.attach('b', 'vmdk:/t/a.vmdk')).toThrow(expect.objectContaining({ code: 'BR_CONFIG_INVALID' }));
    expect(() => disks.attach('c', 'floppy:/x')).toThrow(expect.objectContaining({ code: 'BR_TARGET_SPEC_INVALID' }));
    expect(disks.size).toBe(1);
  });
});
