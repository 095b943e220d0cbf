import { BlockrelayError } from '../retry/blockrelay-error';
import { callJson } from '../transport/log-client';
import { parseCommandArgs, writeJson, type Command } from './command';

/**
 * The environment variable holding the source control API's shared secret,
 * read by `blockrelay tag` (the command line contract has no secret flag, and
 * a secret on a command line is visible to every user of the machine).
 */
export const CONTROL_SECRET_ENV = 'BLOCKRELAY_CONTROL_SECRET';

export const tagCommand: Command = {
  path: ['tag'],
  usage: 'tag --url CONTROL_URL [--disk ID | --group G] --app [--name TEXT] [--json]',
  summary: 'take an app-consistent recovery point now: quiesce, cut, resume',
  async run(argv, io) {
    const usage = this.usage;
    const { values } = parseCommandArgs(argv, { url: { type: 'string' }, disk: { type: 'string' }, group: { type: 'string' }, app: { type: 'boolean' }, name: { type: 'string' }, json: { type: 'boolean' } }, usage);
    if (values.url === undefined) throw new BlockrelayError('BR_USAGE', `--url is required; usage: ${usage}`);
    if (!values.app) throw new BlockrelayError('BR_USAGE', `--app is required (only app-consistent tags can be taken on demand); usage: ${usage}`);
    if (values.disk !== undefined && values.group !== undefined) throw new BlockrelayError('BR_USAGE', `give --disk or --group, not both; usage: ${usage}`);
    const result = (await callJson({ url: values.url, secret: process.env[CONTROL_SECRET_ENV] ?? '' }, 'POST', '/v1/tags', {
      diskId: values.disk,
      group: values.group,
      app: true,
      name: values.name,
    })) as { name: string; cutTimeMs: number; disks: string[] };
    if (values.json) writeJson(io, result);
    else io.stderr.write(`app-consistent point '${result.name}' taken at ${new Date(result.cutTimeMs).toISOString()} on ${result.disks.join(', ')}\n`);
    return 0;
  },
};
