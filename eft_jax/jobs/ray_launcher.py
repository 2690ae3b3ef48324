"""``eft-jax ray-generate`` / ``ray-score``: the N shards of a job as Ray tasks, then ``eft-jax merge``.

Each shard ``i/N`` is one Ray task that runs, in a worker process of its own, exactly what
``eft-jax generate|score ... --shard i/N`` runs (``cli.main`` with that command line), under the task's
resources (``--num-cpus``, ``--num-gpus``, ``--num-tpus``, ``--resources``): Ray sets the worker's
``CUDA_VISIBLE_DEVICES`` / TPU chip variables before JAX starts there, so a shard sees only its own
accelerators. ``max_calls=1``: the worker exits after its task, so every shard starts JAX afresh (one
JAX runtime per process; no device state carried from one shard to the next).

When every shard has exited 0 the driver merges their outputs (``jobs.merge.run_merge``) into ``--out``.
If any shard failed, nothing is merged: each failed shard is reported with its exit status (or how its
task died) and the last lines it printed, and the launcher exits non-zero. Re-running the same command
resumes: every shard skips what its output already holds (finished shards say ``nothing to do``).

Ray is imported only here, inside the functions that need it (``pip install eft-jax[ray]``); the paths
given are made absolute, and the workers must see them (one machine, or a shared filesystem).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from eft_jax.jobs.records import JobError, Shard

_TAIL_LINES = 15  # of a failed shard's output, shown in the report


@dataclasses.dataclass(frozen=True)
class TaskResources:
    """What each shard task asks Ray for: CPUs, GPUs, TPU chips and custom resources (per task)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_tpus: float = 0.0
    custom: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``RemoteFunction.options`` (TPU chips are Ray's ``"TPU"`` resource)."""
        custom = dict(self.custom)
        if self.num_tpus:
            custom["TPU"] = self.num_tpus
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": custom}


@dataclasses.dataclass
class ShardRun:
    """How one shard task ended. ``exit_status`` None: the task itself failed (worker died, ...)."""

    shard: Shard
    exit_status: int | None
    output: str  # what the shard printed (stdout and stderr), or the task's error
    host: str = ""
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def describe(self) -> str:
        where = f" on {self.host}" if self.host else ""
        if self.exit_status is None:
            return f"shard {self.shard.label}: the Ray task failed{where}"
        state = {0: "done", 1: "stopped on an error", 2: "could not start", 130: "interrupted"}.get(
            self.exit_status, "failed")
        return f"shard {self.shard.label}: {state} (exit {self.exit_status}, {self.wall_s:.1f}s{where})"


class _Tee(io.TextIOBase):
    """Writes to the worker's own stream (Ray forwards it to the driver's console) and keeps a copy."""

    def __init__(self, stream: TextIO, copy: io.StringIO):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def run_shard(argv: list[str], cwd: str | None) -> tuple[int, str, str, float]:
    """The body of a shard task, in a Ray worker: ``cli.main(argv)`` in ``cwd`` (when it exists here).
    Returns (exit status, what it printed, host name, wall seconds)."""
    from contextlib import redirect_stderr, redirect_stdout

    from eft_jax import cli

    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    start = time.perf_counter()
    copy = io.StringIO()
    with redirect_stdout(_Tee(sys.stdout, copy)), redirect_stderr(_Tee(sys.stderr, copy)):
        code = cli.main(argv)
    return code, copy.getvalue(), socket.gethostname(), time.perf_counter() - start


def shard_argv(command: str, config: Path | None, inputs: Path, out: Path, shard: Shard,
               overrides: Sequence[str], flags: Sequence[str] = ()) -> list[str]:
    """The command line of one shard: ``COMMAND [--config C] --prompts|--pairs P --out O --shard i/N``."""
    argv = [command]
    if config is not None:
        argv += ["--config", str(config)]
    argv += ["--pairs" if command == "score" else "--prompts", str(inputs), "--out", str(out),
             "--shard", shard.label, "--no-progress", *flags]
    return argv + list(overrides)


@dataclasses.dataclass
class LaunchSummary:
    """What a launch did: every shard's run, and the merge's summary (None when it was not attempted)."""

    runs: list[ShardRun]
    merge: Any = None
    wall_s: float = 0.0

    @property
    def exit_status(self) -> int:
        """0 all done and merged; else 130 if a shard was interrupted, 2 if one could not start, 1 otherwise."""
        failed = [r.exit_status for r in self.runs if not r.ok]
        if not failed:
            return 0
        for code in (130, 2):
            if code in failed:
                return code
        return 1

    def render(self, command: str) -> str:
        lines = [r.describe() for r in sorted(self.runs, key=lambda r: r.shard.index)]
        failed = [r for r in self.runs if not r.ok]
        if failed:
            lines.append(f"eft-jax ray-{command}: {len(failed)} of {len(self.runs)} shard(s) failed; nothing "
                         "merged. Fix the cause shown above and re-run the same command: every shard resumes from its "
                         "output, finished shards have nothing to do")
        elif self.merge is not None:
            lines.append(self.merge.render())
        lines.append(f"wall time: {self.wall_s:.1f}s for {len(self.runs)} shards")
        return "\n".join(lines)


def _tail(text: str) -> str:
    lines = text.rstrip().splitlines()
    return "\n".join("    " + line for line in lines[-_TAIL_LINES:])


def launch(command: str, config: Path | None, inputs: Path, out: Path, count: int, overrides: Sequence[str] = (),
           *, flags: Sequence[str] = (), resources: TaskResources = TaskResources(), address: str | None = None,
           max_retries: int = 0, timeout_s: float | None = None, log: TextIO | None = None) -> LaunchSummary:
    """Run the ``count`` shards of ``command`` ("generate" or "score") as Ray tasks, then merge into ``out``.

    Connects to Ray with ``ray.init(address=address)`` unless Ray is already initialised (a local cluster
    is started when there is none to connect to). ``flags``: more options for every shard (``--overwrite``,
    ``--rewards``...). ``max_retries``: Ray's retries of a task whose worker died (a re-run resumes the
    shard's output). ``timeout_s``: shards still running after that many seconds are cancelled and reported
    as failed. Raises JobError (nothing launched) for a bad shard count or input.
    """
    from eft_jax.jobs.merge import run_merge

    log = log or sys.stderr
    if count < 1:
        raise JobError(f"--shards {count}: the number of shards must be at least 1")
    if str(inputs) == "-":
        raise JobError("Ray shards cannot read standard input: pass the input as a file every worker can read")
    if not inputs.is_file():
        raise JobError(f"{inputs}: no such input file")
    ray = _import_ray()
    start = time.perf_counter()
    started = False
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
        started = True
    try:
        task = ray.remote(max_calls=1, max_retries=max_retries)(run_shard).options(**resources.options())
        shards = [Shard(i, count) for i in range(count)]
        pending = {task.remote(shard_argv(command, config, inputs, out, s, overrides, flags), os.getcwd()): s
                   for s in shards}
        runs = _collect(ray, pending, log, None if timeout_s is None else start + timeout_s)
    finally:
        if started:
            ray.shutdown()
    summary = LaunchSummary(runs)
    if all(r.ok for r in runs):
        summary.merge = run_merge(inputs, out, [s.path(out) for s in shards if s.path(out).exists()], log=log)
    summary.wall_s = time.perf_counter() - start
    return summary


def _collect(ray: Any, pending: dict[Any, Shard], log: TextIO, deadline: float | None) -> list[ShardRun]:
    """Wait for every shard task, reporting each as it ends. Ctrl-C, or the ``deadline`` (perf_counter
    seconds) passing, cancels the tasks still running."""
    runs = []
    try:
        while pending:
            wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if not ready:
                for ref, shard in pending.items():
                    ray.cancel(ref, force=True)
                    runs.append(ShardRun(shard, None, "cancelled: still running when the launcher's time limit "
                                         "ran out (re-run to resume it)"))
                    print(runs[-1].describe() + f": {runs[-1].output}", file=log, flush=True)
                break
            shard = pending.pop(ready[0])
            try:
                code, output, host, wall = ray.get(ready[0])
                run = ShardRun(shard, code, output, host, wall)
            except Exception as e:  # noqa: BLE001 - a dead worker, an unschedulable task...: report the shard
                run = ShardRun(shard, None, f"{type(e).__name__}: {e}")
            runs.append(run)
            print(run.describe() + ("" if run.ok else f"; its last output:\n{_tail(run.output)}"), file=log,
                  flush=True)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return runs


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise JobError("Ray is not installed: `pip install \"eft-jax[ray]\"` (or `pip install ray`) on the driver "
                       "and on every worker") from None
    return ray


def _resources(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    try:
        value = json.loads(text)
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
            raise ValueError
    except ValueError:
        raise JobError(f"--resources {text}: expected a JSON object of resource name -> amount per task, "
                       "e.g. '{\"accelerator_type:H100\": 0.001}'") from None
    return {str(k): float(v) for k, v in value.items()}


# --- the command line (registered by eft_jax.cli) ---------------------------------------------------------------


def add_parser(sub: Any, command: str) -> None:
    """Add ``ray-<command>`` to the ``eft-jax`` subcommands."""
    input_flag = "--pairs" if command == "score" else "--prompts"
    p = sub.add_parser(f"ray-{command}", help=f"run `{command} --shard i/N` for i = 0..N-1 as Ray tasks, then "
                       "merge (pip install eft-jax[ray]; docs/scale-out.md)")
    p.add_argument("--config", default=None, help="YAML job config (default: the embedded one)")
    p.add_argument(input_flag, dest="inputs", required=True, help="input JSONL, readable by every worker")
    p.add_argument("--out", required=True, help="the merged output; shard i writes OUT.shard-i-of-N.jsonl beside it")
    p.add_argument("--shards", type=int, required=True, metavar="N", help="number of shards (Ray tasks)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per task (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per task (default 0)")
    p.add_argument("--num-tpus", type=float, default=0.0, help="TPU chips per task (Ray's TPU resource; default 0)")
    p.add_argument("--resources", default=None, metavar="JSON", help="custom Ray resources per task, as JSON")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local "
                   "cluster on this machine)")
    p.add_argument("--max-retries", type=int, default=0, help="Ray retries of a shard whose worker died (default 0)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="cancel the shards still running after this long (they resume on a re-run)")
    p.add_argument("--overwrite", action="store_true", help="start every shard's output over")
    p.add_argument("--ignore-fingerprint", action="store_true", help="as for generate/score")
    if command == "score":
        p.add_argument("--rewards", action="store_true", help="as for score")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. job.batch_size=16")
    p.set_defaults(func=lambda args: main(args, command))


def main(args: argparse.Namespace, command: str) -> int:
    """``eft-jax ray-generate|ray-score``: validate the config here (exit 2 before launching), launch, merge."""
    from eft_jax.config import load_config

    load_config(args.config, args.overrides)  # a bad config or override fails here, not N times in the workers
    flags = [f for f, on in (("--overwrite", args.overwrite), ("--ignore-fingerprint", args.ignore_fingerprint),
                             ("--rewards", getattr(args, "rewards", False))) if on]
    resources = TaskResources(args.num_cpus, args.num_gpus, args.num_tpus, _resources(args.resources))
    config = Path(args.config).resolve() if args.config else None
    inputs = Path(args.inputs) if args.inputs == "-" else Path(args.inputs).resolve()  # "-": refused by launch
    summary = launch(command, config, inputs, Path(args.out).resolve(), args.shards,
                     args.overrides, flags=flags, resources=resources, address=args.address,
                     max_retries=args.max_retries, timeout_s=args.timeout)
    print(summary.render(command), flush=True)
    return summary.exit_status
