import type { ResyncProgress } from './resync-engine';

const MiB = 1024 * 1024;
const BAR_CELLS = 30;

function mib(bytes: number): string {
  return (bytes / MiB).toFixed(1);
}

/**
 * Renders resync progress: a bar redrawn in place on a terminal, one log
 * line per report otherwise (the engine reports at most every
 * progressIntervalMs), so logs stay readable and terminals stay lively.
 */
export class ResyncProgressPrinter {
  private drewBar = false;

  constructor(
    private readonly out: NodeJS.WritableStream,
    private readonly tty: boolean,
  ) {}

  readonly report = (p: ResyncProgress): void => {
    const fraction = p.bytesTotal === 0 ? 1 : p.bytesDone / p.bytesTotal;
    const percent = Math.floor(fraction * 100);
    const rate = p.elapsedMs > 0 ? (p.bytesDone / MiB / (p.elapsedMs / 1000)).toFixed(0) : '-';
    if (this.tty) {
      const filled = Math.round(fraction * BAR_CELLS);
      const bar = `${'#'.repeat(filled)}${'.'.repeat(BAR_CELLS - filled)}`;
      this.out.write(`\r[${bar}] ${String(percent).padStart(3)}% ${mib(p.bytesDone)}/${mib(p.bytesTotal)} MiB, sent ${mib(p.bytesSent)} MiB, ${rate} MiB/s `);
      this.drewBar = true;
    } else {
      this.out.write(`resync: ${p.phase} ${percent}% (${mib(p.bytesDone)} of ${mib(p.bytesTotal)} MiB), ${p.blocksSent} blocks (${mib(p.bytesSent)} MiB) sent, ${(p.elapsedMs / 1000).toFixed(1)} s\n`);
    }
  };

  /** Ends the bar's line so later output starts on a fresh one. */
  finish(): void {
    if (this.drewBar) this.out.write('\n');
    this.drewBar = false;
  }
}
