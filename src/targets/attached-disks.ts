import { BlockrelayError } from '../retry/blockrelay-error';
import { parseDiskSpec } from './disk-spec';

/** Disks one master target may hold, as the product documents (Azure Site Recovery: 60 per master target). */
export const MAX_ATTACHED_DISKS = 60;

/**
 * The disks attached to one master target: disk id → target spec. The
 * master target attaches a disk before it opens its target and detaches it
 * when protection stops. Refuses the 61st disk, a second spec for one id,
 * and one spec for two ids (two disks would write the same target).
 */
export class AttachedDisks {
  private readonly byId = new Map<string, string>();

  constructor(readonly limit: number = MAX_ATTACHED_DISKS) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new BlockrelayError('BR_CONFIG_INVALID', `attached disk limit must be a positive whole number, got ${limit}`);
  }

  /** Attaches `id` → `spec`; attaching the same pair again is a no-op. */
  attach(id: string, spec: string): void {
    parseDiskSpec(spec);
    const held = this.byId.get(id);
    if (held === spec) return;
    if (held !== undefined) {
      throw new BlockrelayError('BR_CONFIG_INVALID', `disk ${id} is already attached as ${held}; detach it before attaching ${spec}`, { details: { id, spec, attached: held } });
    }
    for (const [otherId, otherSpec] of this.byId) {
      if (otherSpec === spec) throw new BlockrelayError('BR_CONFIG_INVALID', `target ${spec} is already attached for disk ${otherId}`, { details: { id, spec, otherId } });
    }
    if (this.byId.size >= this.limit) {
      throw new BlockrelayError('BR_TARGET_TOO_MANY_DISKS', `cannot attach disk ${id}: this master target already has ${this.byId.size} disks, the limit is ${this.limit}`, { details: { id, spec, limit: this.limit } });
    }
    this.byId.set(id, spec);
  }

  /** Detaches `id`; returns whether it was attached. */
  detach(id: string): boolean {
    return this.byId.delete(id);
  }

  specOf(id: string): string | undefined {
    return this.byId.get(id);
  }

  get size(): number {
    return this.byId.size;
  }

  /** Attached disks in attach order. */
  list(): Array<{ id: string; spec: string }> {
    return [...this.byId].map(([id, spec]) => ({ id, spec }));
  }
}
