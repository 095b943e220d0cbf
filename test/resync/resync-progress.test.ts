import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { ResyncProgressPrinter } from '../../src/resync/resync-progress';

function capture(tty: boolean) {
  const out = new PassThrough();
  let text = '';
  out.on('data', (d) => { text += d; });
  return { printer: new ResyncProgressPrinter(out, tty), text: () => text };
}

const MiB = 1024 * 1024;

describe('resync progress', () => {
  it('redraws one bar in place on a terminal and ends its line', () => {
    const { printer, text } = capture(true);
    printer.report({ phase: 'compare', bytesDone: 256 * MiB, bytesTotal: 512 * MiB, bytesSent: 2 * MiB, blocksSent: 512, elapsedMs: 1000 });
    printer.report({ phase: 'compare', bytesDone: 512 * MiB, bytesTotal: 512 * MiB, bytesSent: 4 * MiB, blocksSent: 1024, elapsedMs: 2000 });
    printer.finish();
    expect(text()).toBe(
      `\r[${'#'.repeat(15)}${'.'.repeat(15)}]  50% 256.0/512.0 MiB, sent 2.0 MiB, 256 MiB/s ` +
        `\r[${'#'.repeat(30)}] 100% 512.0/512.0 MiB, sent 4.0 MiB, 256 MiB/s \n`,
    );
  });

  it('writes whole log lines elsewhere', () => {
    const { printer, text } = capture(false);
    printer.report({ phase: 'settle', bytesDone: 0, bytesTotal: 0, bytesSent: 0, blocksSent: 0, elapsedMs: 1500 });
    printer.finish();
    expect(text()).toBe('resync: settle 100% (0.0 of 0.0 MiB), 0 blocks (0.0 MiB) sent, 1.5 s\n');
  });
});
