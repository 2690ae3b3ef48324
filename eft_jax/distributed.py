"""Multi-controller JAX: one job over the devices of several processes (one per host), ``mesh.distributed``.

Every process runs the same command. :func:`initialize` joins them (``jax.distributed.initialize``) before
anything touches JAX's devices; the job's ``(data, model)`` mesh then spans every process's devices. The
processes that hold different rows of a batch (one group per host, usually) each take their own slice of the
input (a shard of it, by id hash), place only their own rows, read back only their own rows and write their
own part (``out.shard-g-of-G.jsonl``); the host decisions that shape each program are agreed with a small
allgather per decode chunk (``eft_jax.lockstep``), and process 0 merges the parts into ``out`` at the end
(``jobs.runner``, ``jobs.merge``).

So the processes must agree on the job: :func:`check_same_job` compares, over all processes, the config
fingerprint, the number of processes each was told (``JAX_NUM_PROCESSES``), the mesh and the input's bytes,
and refuses (JobError, exit 2) naming the processes that differ and what differs - before any weights are
loaded. (What each has already done is its own part's business: each resumes from its own file.)

Where the processes come from (read by :func:`initialize`):

- TPU pod slices, SLURM, Open MPI, Kubernetes (GKE JobSet...): JAX finds the coordinator, the number of
  processes and this process's index itself.
- Anywhere else: ``JAX_COORDINATOR_ADDRESS=host:port`` (process 0's host, read by JAX),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (0 on the coordinator's host).
- ``EFT_JAX_HEARTBEAT_TIMEOUT_S`` (JAX's default: 100): how long a process may be silent before the others
  treat it as dead; ``EFT_JAX_INIT_TIMEOUT_S`` (default 300): how long to wait for every process to join.

When a process dies (killed, crashed, preempted) the others stop: one that is in a collective with it gets
an error, which the job reports as :func:`peer_failure` (exit 1; re-run the same command on every host to
resume), and leaves without JAX's shutdown barrier (which would abort the process, the peer being gone); any
other is terminated by JAX's coordination service ("Terminating process because the JAX distributed
service detected fatal errors ... another task died") within the heartbeat timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eft_jax.jobs.records import STDIN, JobError

ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_HEARTBEAT, ENV_INIT_TIMEOUT = "EFT_JAX_HEARTBEAT_TIMEOUT_S", "EFT_JAX_INIT_TIMEOUT_S"

# Substrings of the runtime errors a collective raises when a peer process is gone (CPU: gloo; GPU: NCCL).
_PEER_ERRORS = ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset", "heartbeat", "UNAVAILABLE",
                "coordination service")
_peer_lost = False
_declared_processes: int | None = None  # $JAX_NUM_PROCESSES as this process was given it


def _env_int(environ: Mapping[str, str], name: str, lo: int) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        value = lo - 1
    if value < lo:
        raise JobError(f"${name}={text!r}: expected an integer >= {lo}")
    return value


def initialize(environ: Mapping[str, str] | None = None) -> None:
    """Join the job's processes (see the module docstring); JobError, saying what to set, if that fails."""
    import jax

    environ = os.environ if environ is None else environ
    num = _env_int(environ, ENV_NUM_PROCESSES, 1)
    index = _env_int(environ, ENV_PROCESS_ID, 0)
    if (num is None) != (index is None):
        raise JobError(f"set both ${ENV_NUM_PROCESSES} and ${ENV_PROCESS_ID} (or neither, where JAX detects the "
                       "cluster itself: TPU pod slices, SLURM, Open MPI, Kubernetes)")
    if num is not None and index >= num:
        raise JobError(f"${ENV_PROCESS_ID}={index} must be below ${ENV_NUM_PROCESSES}={num}")
    kwargs: dict[str, Any] = {"num_processes": num, "process_id": index}
    heartbeat = _env_int(environ, ENV_HEARTBEAT, 1)
    if heartbeat is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat
    timeout = _env_int(environ, ENV_INIT_TIMEOUT, 1)
    if timeout is not None:
        kwargs["initialization_timeout"] = timeout
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:  # JAX raises both (no coordinator found, timeout, bad address)
        raise JobError(f"mesh.distributed: joining the other processes failed: {e}. Run the same command on every "
                       f"host; outside TPU pods, SLURM, MPI and Kubernetes set JAX_COORDINATOR_ADDRESS=host:port "
                       f"(process 0's host), ${ENV_NUM_PROCESSES} and ${ENV_PROCESS_ID}") from None
    global _declared_processes
    _declared_processes = num  # compared by check_same_job, where every process can refuse together


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def job_digests(fingerprint: str, mesh_shape: Mapping[str, int], inputs: bytes, processes: int) -> dict[str, bytes]:
    """What every process of a job must agree on, each as 32 bytes, by name: the config fingerprint itself
    (16 hex digits, zero-padded, so a refusal can show it), digests of the others."""
    return {
        "config fingerprint": fingerprint.encode()[:32].ljust(32, b"\0"),
        "number of processes": str(processes).encode().ljust(32, b"\0"),
        "mesh": _digest(json.dumps(dict(mesh_shape), sort_keys=True).encode()),
        "input file": _digest(inputs),
    }


def check_same_job(fingerprint: str, mesh_shape: Mapping[str, int], inputs: Path) -> None:
    """Refuse (JobError) a multi-process job whose processes disagree; nothing to do in a single process.

    One allgather of :func:`job_digests` over the processes; the message names each thing that differs and
    which processes see which version (the fingerprint, or the first 8 hex digits of a digest)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return
    if inputs == STDIN:
        raise JobError("a multi-process job (mesh.distributed) cannot read standard input: every process reads "
                       "the input, so pass a file every host can read")
    declared = _declared_processes if _declared_processes is not None else jax.process_count()
    digests = job_digests(fingerprint, mesh_shape, inputs.read_bytes(), declared)
    from jax.experimental import multihost_utils

    mine = np.frombuffer(b"".join(digests.values()), np.uint8)
    try:
        every = np.asarray(multihost_utils.process_allgather(mine, tiled=False))
    except Exception as e:  # noqa: BLE001 - a process that stopped before comparing (e.g. a bad environment)
        lost = peer_failure(e)
        if lost is None:
            raise
        raise JobError(f"cannot compare this job with the other processes': {lost}") from None
    every = every.reshape(jax.process_count(), len(digests), 32)
    problems = []
    for k, name in enumerate(digests):
        versions: dict[str, list[int]] = {}
        for process in range(every.shape[0]):
            raw = bytes(every[process, k])
            readable = name in ("config fingerprint", "number of processes")
            shown = raw.rstrip(b"\0").decode(errors="replace") if readable else raw.hex()[:8]
            versions.setdefault(shown, []).append(process)
        if len(versions) > 1:
            problems.append(f"{name}: " + "; ".join(f"processes {ps} see {v}" for v, ps in versions.items()))
    if problems:
        raise JobError("the processes of this multi-process job disagree, so they would not run the same batches: "
                       + " | ".join(problems) + ". Run the same command with the same config, input file and --out "
                       "(on a filesystem every host reads: process 0 merges every group's part there) on every host")


def peer_failure(error: BaseException) -> str | None:
    """A clear message if ``error`` is a collective failing because another process of the job is gone
    (and remember it, for :func:`leave`); None for any other error."""
    global _peer_lost
    import jax

    text = str(error)
    if jax.process_count() == 1 or not any(marker in text for marker in _PEER_ERRORS):
        return None
    _peer_lost = True
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"another process of this {jax.process_count()}-process job stopped (killed, crashed or preempted), "
            f"so this one (process {jax.process_index()}) cannot go on: {type(error).__name__}: {first[:300]}. "
            "Re-run the same command on every host: the job resumes from its output")


def leave(status: int) -> int:
    """``status``, or, after :func:`peer_failure`, exit now with it: JAX's shutdown at exit waits on a barrier
    with the dead process and aborts the process (SIGABRT and a C++ stack trace)."""
    if _peer_lost:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
