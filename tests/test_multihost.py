"""Multi-host JAX on this machine: two ``eft-jax generate`` processes, 4 CPU devices each, one 2x4 mesh.

The processes join through a coordinator on a free local port (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: ``eft_jax.distributed``) and run the tiny trio at temperature 1
with the large base tensor-parallel over ``model`` (4 devices) and the batch split over ``data`` (the two
processes). The reference is one process with 8 CPU devices and the same 2x4 mesh: the same programs on the
same layout. Every sample (response, tokens, finish reason) must be identical; ``logprob`` only up to
float32 rounding, because the tensor-parallel sums over ``model`` are all-reduced by gloo between processes
and in another order inside one process (with replicated models, e.g. the default toy config, the files
were byte for byte equal: docs/scale-out.md). Each process takes its own half of the input (shard g/2 by id
hash), decodes it in its own rows of the batch and writes it to ``out.shard-g-of-2.jsonl``; process 0 merges
the halves into ``out`` at the end.

SIGKILL of either process mid-job stops the other (heartbeat timeout 10 s here): process 1 killed, process 0
fails in its next collective and exits 1 with a message (or, if it runs no collective within the heartbeat
timeout, JAX's coordination service terminates it, SIGABRT, "another task died"); process 0 (the
coordinator) killed, JAX's coordination service terminates process 1. A re-run of both resumes and ends identical to the reference.
Processes that disagree on the job refuse it before loading any weights.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from eft_jax.distributed import check_same_job, initialize, job_digests, peer_failure
from eft_jax.jobs.records import STDIN, JobError, shard_of
from job_helpers import REPO, read_jsonl, trio_config
from tolerances import assert_within, eft_logprob_tolerance

MESH = ["mesh.data=2", "mesh.model=4", "models.large_base.sharding=tensor_parallel"]
HEARTBEAT_S = 10
TIMEOUT_S = 240  # any one process; a hung collective fails the test instead of hanging it



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """The trio config, a 30-line input, and how to start the job's processes."""

    def __init__(self, env, family, root):
        self.env, self.root = env, root
        self.config = trio_config(family, root / "c.yaml", batch_size=2, max_new_tokens=8)
        self.prompts = root / "in.jsonl"
        lines = [json.dumps({"id": f"q{i}", "prompt": "word " * (1 + i % 7) + str(i)}) for i in range(30)]
        self.prompts.write_text("\n".join(lines[:12] + ['{"id": "bad"'] + lines[12:]) + "\n")
        self.procs: list[subprocess.Popen] = []

    def fingerprint(self, *overrides) -> str:
        from eft_jax.config import load_config

        return load_config(self.config, [*MESH, *overrides]).fingerprint("generate")

    def argv(self, out, *overrides, task=None):
        """The command line; ``task``: the command and its input (default: generate over the 30 lines)."""
        task = task or ("generate", "--prompts", self.prompts)
        return [sys.executable, "-m", "eft_jax.cli", task[0], "--config", str(self.config), *map(str, task[1:]),
                "--out", str(out), "--no-progress", *MESH, *overrides]

    def single(self, out, task=None) -> subprocess.CompletedProcess:
        env = {**self.env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        return subprocess.run(self.argv(out, task=task), env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=TIMEOUT_S)

    def start(self, out, overrides=((), ()), envs=({}, {}), task=None) -> list[subprocess.Popen]:
        """Both processes of a 2-process job (stdout and stderr to files beside ``out``)."""
        port = free_port()
        procs = []
        for index in range(2):
            env = {**self.env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                   "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": str(index), "EFT_JAX_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S),
                   "EFT_JAX_INIT_TIMEOUT_S": "120", **envs[index]}
            log = open(out.parent / f"{out.stem}.p{index}.log", "w")
            procs.append(subprocess.Popen(self.argv(out, "mesh.distributed=true", *overrides[index], task=task), env=env,
                                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True))
            log.close()
        self.procs += procs
        return procs

    @staticmethod
    def log(out, index: int) -> str:
        return (out.parent / f"{out.stem}.p{index}.log").read_text()

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def job(env, family, tmp_path_factory):
    job = Job(env, family, tmp_path_factory.mktemp("multihost"))
    yield job
    job.stop_all()


@pytest.fixture(scope="module")
def reference(job):
    out = job.root / "ref" / "out.jsonl"
    proc = job.single(out)
    assert proc.returncode == 0, proc.stderr
    return out


def parts(out) -> list:
    """The two processes' parts of the output."""
    return [out.with_name(f"{out.stem}.shard-{g}-of-2.jsonl") for g in range(2)]


def lines_written(out) -> int:
    return sum(p.read_bytes().count(b"\n") for p in parts(out) if p.exists())


def wait_for_more_lines(out, than: int, procs) -> None:
    """Until the parts of ``out`` have more than ``than`` lines (a batch written mid-job); fail if a process
    ended first."""
    deadline = time.monotonic() + TIMEOUT_S
    while lines_written(out) <= than:
        assert all(p.poll() is None for p in procs), "a process ended before the kill"
        assert time.monotonic() < deadline, "no output line was written in time"
        time.sleep(0.05)


def assert_same_samples(out, reference, logit_tol: float) -> None:
    """Every line equal to the reference's, in the same order, except ``logprob`` within rounding: a sum of
    ``tokens`` EFT log-probs (weights [1.0]), each within ``eft_logprob_tolerance`` of the logit bound."""
    got, want = read_jsonl(out), read_jsonl(reference)
    assert [{k: v for k, v in r.items() if k != "logprob"} for r in got] == \
        [{k: v for k, v in r.items() if k != "logprob"} for r in want]
    assert_within([r["logprob"] for r in got], [r["logprob"] for r in want],
                  [r["tokens"] * eft_logprob_tolerance(logit_tol, [1.0]) for r in want], "2-process vs 1-process logprob")


@pytest.mark.slow
def test_two_processes_write_the_single_process_output(job, reference, tmp_path, family_logit_tol):
    out = tmp_path / "out.jsonl"
    procs = job.start(out)
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    assert codes == [0, 0], [job.log(out, i)[-3000:] for i in range(2)]
    assert_same_samples(out, reference, family_logit_tol)
    assert (tmp_path / "out.errors.jsonl").read_bytes() == (reference.parent / "out.errors.jsonl").read_bytes()
    assert [e["kind"] for e in read_jsonl(tmp_path / "out.errors.jsonl")] == ["malformed_json"]
    assert "30 run" in job.log(out, 0) and "samples written" not in job.log(out, 1)  # process 0 reports alone
    # Each process ran and wrote only its own lines: those whose id hashes to its group.
    for g, part in enumerate(parts(out)):
        ids = [r["id"] for r in read_jsonl(part)]
        assert ids and all(shard_of(i, 2) == g for i in ids), (g, ids)
    assert "mesh data=2 x model=4" in job.log(out, 1)


def run_both(job, root, task):
    """``task`` run by one process (the reference, in ``root/ref``) and by two; both must succeed."""
    (root / "ref").mkdir()
    reference = root / "ref" / "out.jsonl"
    single = job.single(reference, task=task)
    assert single.returncode == 0, single.stderr
    out = root / "out.jsonl"
    codes = [p.wait(timeout=TIMEOUT_S) for p in job.start(out, task=task)]
    assert codes == [0, 0], [job.log(out, i)[-3000:] for i in range(2)]
    return out, reference


@pytest.mark.slow
def test_a_process_whose_part_is_empty_still_takes_part(job, tmp_path, family_logit_tol):
    """Every line hashes to process group 0: process 1 has nothing of its own to decode, yet runs each
    program with blank rows, and the job ends as one process's."""
    prompts = tmp_path / "in.jsonl"
    ids = [i for i in (f"only{k}" for k in range(64)) if shard_of(i, 2) == 0][:5]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"word {i}"}) + "\n" for i in ids))
    task = ("generate", "--prompts", prompts)
    out, reference = run_both(job, tmp_path, task)
    assert_same_samples(out, reference, family_logit_tol)
    assert read_jsonl(parts(out)[1]) == []


@pytest.mark.slow
def test_score_in_two_processes_equals_one_process(job, tmp_path, family_logit_tol):
    """``score`` splits the pairs the same way; every pair's tokens equal the single process's, the summed
    log-probs and rewards within float32 rounding (a sum over the response's tokens)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "word " * (1 + i % 5), "response": f"{i} word"})
                             + "\n" for i in range(11)))
    task = ("score", "--pairs", pairs)
    out, reference = run_both(job, tmp_path, task)
    got, want = read_jsonl(out), read_jsonl(reference)
    assert [(r["id"], r["tokens"]) for r in got] == [(r["id"], r["tokens"]) for r in want]
    per_token = eft_logprob_tolerance(family_logit_tol, [1.0])
    bound = [r["tokens"] * per_token for r in want]
    assert_within([r["logprob"] for r in got], [r["logprob"] for r in want], bound, "2-process vs 1-process score")
    assert_within([r["reward"]["small_ft"] for r in got], [r["reward"]["small_ft"] for r in want], bound,
                  "2-process vs 1-process reward")
    assert all(read_jsonl(part) for part in parts(out))  # both processes scored a part


def assert_stopped_for_lost_peer(code: int, log: str) -> None:
    """A process whose peer was SIGKILLed stops in one of two ways: its next collective fails, and it says why
    and exits 1; or, when it is in no collective for the heartbeat timeout (compiling, or waiting on the
    coordinator), JAX's coordination service terminates it (SIGABRT)."""
    if code == 1:
        assert "another process of this 2-process job stopped" in log and "Re-run the same command" in log, log
        assert "Traceback" not in log and "Check failure" not in log  # a message, not a crash
    else:
        assert code == -6 and "another task died" in log, (code, log[-3000:])


@pytest.mark.slow
def test_sigkill_of_either_process_stops_the_other_and_a_rerun_resumes_identical(job, reference, tmp_path,
                                                                                 family_logit_tol):
    out = tmp_path / "out.jsonl"
    # Process 1 killed mid-job: process 0 stops.
    procs = job.start(out)
    wait_for_more_lines(out, 0, procs)
    procs[1].kill()
    assert_stopped_for_lost_peer(procs[0].wait(timeout=HEARTBEAT_S + 60), job.log(out, 0))
    written = lines_written(out)
    assert not out.exists()  # merged only when every part is done

    # Process 0 (the coordinator) killed: the same two ways out for process 1 (CI saw both).
    procs = job.start(out)  # the same output: it resumes, then dies again
    wait_for_more_lines(out, written, procs)
    procs[0].kill()
    assert_stopped_for_lost_peer(procs[1].wait(timeout=HEARTBEAT_S + 60), job.log(out, 1))

    # Both re-run: they resume from what is written and end with the reference output.
    procs = job.start(out)
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    assert codes == [0, 0], [job.log(out, i)[-3000:] for i in range(2)]
    done = int(job.log(out, 0).split(" already done")[0].rsplit(" ", 1)[-1])
    assert 0 < done < 30
    assert_same_samples(out, reference, family_logit_tol)
    assert (tmp_path / "out.errors.jsonl").read_bytes() == (reference.parent / "out.errors.jsonl").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("other, what", [(["sampling.temperature=0.5"], "config fingerprint"),
                                         (["mesh.data=1", "mesh.model=8"], "mesh")])
def test_processes_that_disagree_refuse_the_job(job, tmp_path, other, what):
    out = tmp_path / "out.jsonl"
    procs = job.start(out, ((), other))
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    assert codes == [2, 2], [job.log(out, i)[-3000:] for i in range(2)]
    for i in range(2):
        log = job.log(out, i)
        assert "the processes of this multi-process job disagree" in log and f"{what}: processes [0] see" in log, log
        assert "loaded models" not in log
    if what == "config fingerprint":  # the fingerprints themselves, as `eft-jax config` prints them
        assert f"processes [0] see {job.fingerprint()}" in job.log(out, 0)
    assert not out.exists()


@pytest.mark.slow
def test_processes_that_disagree_on_their_number_refuse_the_job(job, tmp_path):
    out = tmp_path / "out.jsonl"
    procs = job.start(out, envs=({}, {"JAX_NUM_PROCESSES": "3"}))  # joined as 2 (process 0 sets the number)
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    assert codes == [2, 2], [job.log(out, i)[-3000:] for i in range(2)]
    for i in range(2):
        assert "number of processes: processes [0] see 2; processes [1] see 3" in job.log(out, i)
    assert not out.exists()


# --- No processes started: the environment and the single-process cases ------------------------------------


@pytest.mark.parametrize("environ, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "set both $JAX_NUM_PROCESSES and $JAX_PROCESS_ID"),
    ({"JAX_PROCESS_ID": "0"}, "set both $JAX_NUM_PROCESSES and $JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "$JAX_PROCESS_ID=2 must be below $JAX_NUM_PROCESSES=2"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "$JAX_NUM_PROCESSES='two': expected an integer >= 1"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "EFT_JAX_HEARTBEAT_TIMEOUT_S": "0"},
     "$EFT_JAX_HEARTBEAT_TIMEOUT_S='0': expected an integer >= 1"),
])
def test_a_bad_process_environment_is_refused_before_joining(environ, message):
    with pytest.raises(JobError) as e:
        initialize(environ)
    assert message in str(e.value)


def test_one_process_has_nothing_to_agree_on_and_no_peer_to_lose(tmp_path):
    check_same_job("f", {"data": 1, "model": 1}, STDIN)  # returns at once: not even the input is read
    assert peer_failure(RuntimeError("Gloo AllGather failed: Connection closed by peer")) is None
    # The digests tell apart exactly what must agree: a change in any one moves only its own digest.
    args = ("f", {"data": 2, "model": 4}, b"line\n", 2)
    base = job_digests(*args)
    for i, value, name in ((0, "g", "config fingerprint"), (1, {"data": 1, "model": 8}, "mesh"),
                           (2, b"line2\n", "input file"), (3, 3, "number of processes")):
        changed = job_digests(*args[:i], value, *args[i + 1:])
        assert [k for k in base if base[k] != changed[k]] == [name]
