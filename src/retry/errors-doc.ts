import { ERROR_CODES, type ErrorSpec } from './error-codes';

/**
 * Renders docs/errors.md from the registry, so the document can never drift
 * from the codes the program really raises. Run: `npm run errors:doc`.
 */
export function renderErrorsDoc(): string {
  const rows = Object.entries(ERROR_CODES as Record<string, ErrorSpec>).map(
    ([code, spec]) => `| \`${code}\` | ${spec.recoverable ? 'yes: retried at 1, 2, 4, 8, 10 min, then every 30' : 'no: the disk goes Critical'} | ${spec.asrCode ?? ''} | ${spec.description.replace(/\|/g, '\\|')} |`,
  );
  return [
    '# blockrelay error codes',
    '',
    'Generated from `src/retry/error-codes.ts` by `npm run errors:doc`; do not edit by hand.',
    '',
    'Every failure blockrelay reports carries one of these codes. Commands print',
    '`CODE: message` on one line and exit non-zero; logs, metrics',
    '(`blockrelay_errors_total{code}`) and the status page use the same codes.',
    'Codes never change meaning; messages may.',
    '',
    '| code | recoverable | ASR error | meaning |',
    '|---|---|---|---|',
    ...rows,
    '',
  ].join('\n');
}

if (require.main === module) process.stdout.write(renderErrorsDoc());
