"""Job progress on stderr: done / total, tokens, tokens/s and ETA.

On a terminal (and in a notebook, where stderr is not a terminal but the cell shows widgets) the bar is
``tqdm``'s, redrawn in place, with the token count and tokens/s as its postfix. In a log file or CI
(``stream`` is not a terminal) tqdm would write every redraw into the file, separated by carriage returns,
so there one plain line is printed at most every ``interval`` seconds, plus the last one: that line is the
only hand-written part, kept because ``grep``/``tail`` on a job log should see whole lines.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _in_notebook() -> bool:
    """True inside a Jupyter/Colab kernel (where tqdm.auto draws a widget)."""
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and type(ip).__name__ != "TerminalInteractiveShell"


class Progress:
    """Progress over ``total`` units (samples or pairs) of one job; ``update`` after each batch."""

    def __init__(self, total: int, *, unit: str = "samples", stream: TextIO = sys.stderr, enabled: bool = True,
                 interval: float = 10.0):
        self.total = total
        self.unit = unit
        self.stream = stream
        self.enabled = enabled and total > 0
        self.interval = interval
        self.done = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self._last_print = -math.inf  # the first update prints (perf_counter's zero is arbitrary, e.g. boot)
        self._bar: Any = None
        tty = bool(getattr(stream, "isatty", lambda: False)())
        if self.enabled and (tty or (stream is sys.stderr and _in_notebook())):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit=f" {unit}", file=stream if tty else None, desc="eft-jax",
                             smoothing=0.1, mininterval=0.5, dynamic_ncols=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _rate(self) -> float:
        elapsed = self.elapsed
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The plain progress line of a log file."""
        eta = self.elapsed / self.done * (self.total - self.done) if self.done else None
        return (f"{self.done}/{self.total} {self.unit} | {self.tokens} tok | {self._rate():.1f} tok/s | "
                f"elapsed {format_duration(self.elapsed)} | ETA {format_duration(eta) if eta is not None else '?'}")

    def update(self, units: int, tokens: int) -> None:
        self.done += units
        self.tokens += tokens
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tokens} tok, {self._rate():.1f} tok/s", refresh=False)
            self._bar.update(units)
            return
        now = time.perf_counter()
        if self.done >= self.total or now - self._last_print >= self.interval:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        """End the bar (also when the job stopped before the total)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
