"""Shared pieces of the job tests: a subprocess environment, the tiny trio's config, running the CLI."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def trio_config(family, path: Path, **job) -> Path:
    def model(name, fmt):
        return {"path": str(family[name][0]), "prompt_format": fmt, "dtype": "float32", "sharding": "replicated"}

    cfg = {
        "models": {"large_base": model("large_base", "plain"), "small_base": model("small_base", "plain"),
                   "small_ft": model("small_ft", "chat")},
        "eft": {"base": "large_base", "ref": "small_base", "fine_tuned": ["small_ft"], "weights": [1.0]},
        "sampling": {"temperature": 1.0, "top_p": 0.95},
        "mesh": {"data": 1, "model": 1},
        "job": {"batch_size": 4, "max_new_tokens": 6, "seed": 0, "chunk_size": 4, **job},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(env, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eft_jax.cli", *map(str, args)], env=env, cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the output must end with a whole line"
    return [json.loads(line) for line in text.splitlines()]


def summary_counts(stdout: str) -> dict[str, int]:
    m = re.search(r"(\d+) input lines: (\d+) run, (\d+) already done, (\d+) skipped, (\d+) truncated", stdout)
    assert m, stdout
    return dict(zip(["lines", "run", "done", "skipped", "truncated"], map(int, m.groups()), strict=True))


def kill_after_lines(env, args, out: Path, lines: int, timeout: float = 240) -> None:
    """Start ``eft-jax ARGS`` and SIGKILL it as soon as ``out`` holds ``lines`` whole lines (fails if the
    job ends first: it must be killed mid-run for a resume test to mean anything)."""
    job = subprocess.Popen([sys.executable, "-m", "eft_jax.cli", *map(str, args)], env=env, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and job.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.01)
        assert job.poll() is None, "the job ended before it could be killed"
        job.send_signal(signal.SIGKILL)
        job.wait(30)
    finally:
        if job.poll() is None:
            job.kill()
