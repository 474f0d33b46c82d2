"""The one progress display of long jobs (BPE training, sharding, HellaSwag): a status line on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """`label [######·····] 120/1000 12.3/s 9.8s note`, on stderr.

    On a terminal the line is redrawn in place, at most every `every` seconds. Into a log file (not a
    terminal) it writes one line per 10% of a known total, so logs stay short; with no total (a stream
    of unknown length) it writes nothing there. enabled=False (or rank != 0) silences it.
    """

    def __init__(self, label: str, total: int | None = None, enabled: bool = True, every: float = 0.25):
        self.label, self.total, self.every = label, total, every
        self.enabled = enabled and (total is None or total > 0)
        self.tty = self.enabled and sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()
        self.next_decile, self.drawn = 1, False

    def line(self, done: int, note: str = "") -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        bar = ""
        if self.total:
            filled = min(20, 20 * done // self.total)
            bar = f" [{'#' * filled}{'·' * (20 - filled)}] {done:,}/{self.total:,}"
        else:
            bar = f" {done:,}"
        return f"{self.label}{bar} {done / elapsed:,.1f}/s {elapsed:.1f}s{' ' + note if note else ''}"

    def update(self, done: int, note: str = "") -> None:
        """Report `done` items finished so far (and an optional note, e.g. throughput)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self.last >= self.every or done == self.total:
                self.last, self.drawn = now, True
                print(f"\r{self.line(done, note)}\033[K", end="", file=sys.stderr, flush=True)
        elif self.total and done * 10 >= self.next_decile * self.total:
            self.next_decile = done * 10 // self.total + 1
            print(self.line(done, note), file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the in-place line (the last state stays visible)."""
        if self.drawn:
            print(file=sys.stderr, flush=True)
            self.drawn = False
