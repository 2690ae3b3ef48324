"""A small progress line on stderr: done / total, tokens, tokens/s and ETA.

On a terminal the line redraws in place after each batch; otherwise (a log file, CI) one line is
printed at most every ``interval`` seconds, plus the last one.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress over ``total`` units (samples or pairs) of one job."""

    def __init__(self, total: int, *, unit: str = "samples", stream: TextIO = sys.stderr, enabled: bool = True,
                 interval: float = 10.0, width: int = 24):
        self.total = total
        self.unit = unit
        self.stream = stream
        self.enabled = enabled and total > 0
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = interval
        self.width = width
        self.done = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self._last_print = 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = self.elapsed
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {self.unit} | "
                f"{self.tokens} tok | {rate:.1f} tok/s | elapsed {format_duration(elapsed)} | "
                f"ETA {format_duration(eta) if eta is not None else '?'}")

    def update(self, units: int, tokens: int) -> None:
        self.done += units
        self.tokens += tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        last = self.done >= self.total
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if last else ""))
            self.stream.flush()
        elif last or now - self._last_print >= self.interval:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        """End the redrawn line if the job stopped before the total."""
        if self.enabled and self.tty and self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()
