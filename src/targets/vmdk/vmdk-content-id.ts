import * as fsp from 'node:fs/promises';
import { wrapError } from '../../retry/blockrelay-error';
import { NO_PARENT_CID, randomCid, replaceCid } from './vmdk-descriptor';

/**
 * VMware changes a disk's content ID (CID) the first time its content is
 * modified after it is opened, so a snapshot child made earlier can tell its
 * parent changed. This rewrites the CID of a text descriptor file (flat and
 * split disks): the new text goes to a temporary file that is synced and
 * renamed over the old one, so a crash leaves one whole descriptor.
 */
export async function bumpDescriptorFileCid(file: string, oldCid: number): Promise<void> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'latin1');
  } catch (err) {
    throw wrapError(err, 'BR_IO', `cannot read descriptor ${file}`);
  }
  const updated = replaceCid(text.replace(/\0+$/, ''), newCid(oldCid));
  if (updated === undefined) return;
  const temp = `${file}.blockrelay-${process.pid}.tmp`;
  try {
    const handle = await fsp.open(temp, 'w');
    try {
      await handle.writeFile(updated, 'latin1');
      await handle.datasync();
    } finally {
      await handle.close();
    }
    await fsp.rename(temp, file);
  } catch (err) {
    await fsp.rm(temp, { force: true });
    throw wrapError(err, 'BR_IO', `cannot update the content ID in ${file}`);
  }
}

/** A random CID different from the old one and from the "no parent" marker. */
export function newCid(oldCid: number): number {
  for (;;) {
    const cid = randomCid();
    if (cid !== oldCid && cid !== NO_PARENT_CID) return cid;
  }
}

/**
 * The CID bump of one open descriptor file, done once per session, before
 * the first change of content; a failed attempt is retried by the next write.
 */
export class DescriptorCidBump {
  private bump: Promise<void> | undefined;

  constructor(
    private readonly file: string,
    private readonly oldCid: number,
  ) {}

  /** Resolves once the descriptor holds a new CID (at once after the first success). */
  ensure(): Promise<void> {
    this.bump ??= bumpDescriptorFileCid(this.file, this.oldCid).catch((err: unknown) => {
      this.bump = undefined;
      throw err;
    });
    return this.bump;
  }
}
