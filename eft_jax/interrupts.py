"""Ctrl-C that always stops a job, at a point where nothing is lost.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be. When
that is inside a callback whose exceptions are ignored (JAX's garbage-collection callback, a
``__del__``), Python prints "Exception ignored in ..." and the interrupt is lost: the job would run to
its end and exit 0. :class:`Interrupts` records every SIGINT as well as raising it, and the job calls
:meth:`Interrupts.check` at safe points (after each model is loaded, after each batch is written), so a
swallowed interrupt is raised again there.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class Interrupts:
    """A context manager that records SIGINT (main thread only; elsewhere it does nothing).

    Re-entrant: a job entered inside the CLI's own ``with`` keeps the CLI's record of an earlier Ctrl-C.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None
        self._installed = False
        self._depth = 0

    def __enter__(self) -> Interrupts:
        if self._depth == 0 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        self._depth += 1
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._depth -= 1
        if self._depth == 0 and self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed (even if its first raise was swallowed)."""
        if self.requested:
            raise KeyboardInterrupt
