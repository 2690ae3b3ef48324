"""Job progress: tqdm's bar on a terminal, whole plain lines in a log file."""

from __future__ import annotations

import io

from eft_jax.jobs.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_whole_lines_and_the_last_one():
    log = io.StringIO()
    bar = Progress(3, stream=log, interval=3600.0)
    for _ in range(3):
        bar.update(1, 10)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the first update prints (no line yet), the middle one is within the interval, the last always prints
    assert len(lines) == 2 and lines[-1].startswith("3/3 samples | 30 tok | ")


def test_the_first_update_prints_soon_after_boot(monkeypatch):
    """Regression: the first line waited until perf_counter() passed ``interval``; perf_counter counts
    from boot on Linux, so in a fresh VM (CI, Colab) the first line came up to ``interval`` late."""
    from eft_jax.jobs import progress

    clock = iter([100.0, 100.5, 101.0, 101.5, 102.0, 102.5, 103.0])  # a machine up for 100 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    log = io.StringIO()
    bar = Progress(3, stream=log, interval=3600.0)
    bar.update(1, 10)
    assert log.getvalue().startswith("1/3 samples | 10 tok | ")


def test_a_terminal_gets_the_tqdm_bar_with_tokens_per_second():
    term = _Terminal()
    bar = Progress(4, unit="pairs", stream=term)
    bar.update(4, 7)
    bar.close()
    text = term.getvalue()
    assert "\r" in text and "4/4" in text and "pairs" in text and "7 tok" in text and "tok/s" in text


def test_disabled_progress_writes_nothing():
    log = _Terminal()
    bar = Progress(2, stream=log, enabled=False)
    bar.update(2, 5)
    bar.close()
    assert log.getvalue() == "" and bar.done == 2 and bar.tokens == 5
