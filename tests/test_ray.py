"""``eft-jax ray-generate``: the shards of a job as Ray tasks on a local Ray cluster, then the merge.

The reference is the unsharded ``eft-jax generate`` run as a user runs it (a subprocess, one CPU device).
The launcher runs in this process (``cli.main``) against a local cluster of 2 CPUs started by the
fixture, so 3 shard tasks need two rounds of workers; each task is a fresh worker process (one CPU
device, the session's compile cache) running ``generate --shard i/3``. As in ``tests/test_shards.py``,
batch size 1 and prompts of one length bucket make every row's arithmetic the same in a shard as in
the unsharded job, so the merged files must equal the unsharded ones byte for byte.
"""

from __future__ import annotations

import json

import pytest

from eft_jax import cli
from eft_jax.jobs.records import shard_of
from job_helpers import read_jsonl, run, trio_config

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' (or '.[ray]')")

# Ray starts its processes from this (JAX-threaded) one with fork + exec, which is safe; JAX warns about any fork.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

TIMEOUT_S = 600  # every launch in this file; a hung worker fails the test instead of hanging it

LINES = [
    {"id": "q0", "prompt": "The quick fox"},
    {"id": 1, "messages": [{"role": "user", "content": "Hi there"}], "n": 2},
    '{"id": "broken", "prompt": ',                      # malformed: reported by shard 0
    {"id": "empty", "prompt": "   "},                   # empty prompt: skipped by its shard
    *({"id": f"q{i}", "prompt": f"count {i}"} for i in range(2, 7)),
]


@pytest.fixture(scope="module")
def cluster(env):
    """A local Ray cluster with 2 CPUs; its workers get the CLI subprocesses' environment. Shut down after."""
    worker_env = {k: env[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "EFT_JAX_COMPILE_CACHE")}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env}, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(family, env, tmp_path_factory):
    """The config, the input and the unsharded reference output (a subprocess ``eft-jax generate``)."""
    root = tmp_path_factory.mktemp("ray")
    config = trio_config(family, root / "c.yaml", batch_size=1)
    prompts = root / "in.jsonl"
    prompts.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in LINES))
    assert {shard_of(x["id"], 3) for x in LINES if isinstance(x, dict)} == {0, 1, 2}  # every shard has lines
    ref = root / "ref" / "out.jsonl"
    proc = run(env, "generate", "--config", config, "--prompts", prompts, "--out", ref, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return config, prompts, ref


def ray_generate(config, prompts, out, *extra) -> int:
    return cli.main(["ray-generate", "--config", str(config), "--prompts", str(prompts), "--out", str(out),
                     "--shards", "3", "--timeout", str(TIMEOUT_S), *map(str, extra)])


@pytest.mark.slow
def test_three_ray_shards_merge_to_the_unsharded_output_and_resume(cluster, job, tmp_path, capsys):
    config, prompts, ref = job
    out = tmp_path / "out.jsonl"
    assert ray_generate(config, prompts, out) == 0
    printed = capsys.readouterr().out
    assert all(f"shard {i}/3: done (exit 0" in printed for i in range(3)) and "written" in printed, printed
    assert out.read_bytes() == ref.read_bytes()
    assert (tmp_path / "out.errors.jsonl").read_bytes() == (ref.parent / "out.errors.jsonl").read_bytes()
    assert [e["kind"] for e in read_jsonl(tmp_path / "out.errors.jsonl")] == ["malformed_json", "empty_prompt"]
    for i in range(3):  # each task ran its own shard, in its own worker process
        assert {r["shard"] for r in read_jsonl(tmp_path / f"out.shard-{i}-of-3.jsonl")} == {f"{i}/3"}

    # Re-run: every shard finds its lines done, and the merge leaves the files as they are.
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert ray_generate(config, prompts, out) == 0
    captured = capsys.readouterr()
    assert "unchanged" in captured.out and captured.err.count("nothing to do") == 0  # (workers' logs not forwarded)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.slow
def test_a_failed_shard_is_reported_and_nothing_is_merged_until_it_is_done(cluster, job, tmp_path, capsys):
    config, prompts, ref = job
    out = tmp_path / "out.jsonl"
    for i in (0, 2):  # two shards already finished (from an unsharded-equivalent run of each)
        assert cli.main(["generate", "--config", str(config), "--prompts", str(prompts), "--out", str(out),
                         "--shard", f"{i}/3", "--no-progress"]) == 0
    blocker = tmp_path / "out.shard-1-of-3.jsonl"
    blocker.mkdir()  # shard 1 cannot write its output
    capsys.readouterr()
    assert ray_generate(config, prompts, out) == 2
    captured = capsys.readouterr()
    report = captured.out + captured.err
    assert "shard 1/3: could not start (exit 2" in report and "is a directory" in report, report
    assert "shard 0/3: done" in report and "shard 2/3: done" in report
    assert "1 of 3 shard(s) failed; nothing merged" in report
    assert not out.exists()

    blocker.rmdir()  # fixed: the re-run runs shard 1 only (0 and 2 have nothing to do) and merges
    assert ray_generate(config, prompts, out) == 0
    assert out.read_bytes() == ref.read_bytes()


def test_bad_launches_are_refused_before_anything_runs(job, tmp_path, capsys):
    config, prompts, _ = job
    for args, message in ((["--prompts", "-"], "cannot read standard input"),
                          (["--prompts", tmp_path / "none.jsonl"], "no such input file"),
                          (["--prompts", prompts, "--shards", "0"], "at least 1"),
                          (["--prompts", prompts, "--resources", "[1]"], "expected a JSON object"),
                          (["--prompts", prompts, "job.batch_size=0"], "job.batch_size")):
        argv = ["ray-generate", "--config", str(config), "--out", str(tmp_path / "o.jsonl"), *map(str, args)]
        if "--shards" not in argv:
            argv += ["--shards", "2"]
        capsys.readouterr()
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ray_score_merges_to_the_unsharded_scores(cluster, job, env, tmp_path, capsys):
    config, _, _ = job
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"count {i}", "response": f"{i} and {i + 1}"}) + "\n"
                             for i in range(6)))
    ref = tmp_path / "ref" / "scores.jsonl"
    proc = run(env, "score", "--config", config, "--pairs", pairs, "--out", ref, "--rewards", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "scores.jsonl"
    assert cli.main(["ray-score", "--config", str(config), "--pairs", str(pairs), "--out", str(out), "--shards", "3",
                     "--rewards", "--timeout", str(TIMEOUT_S)]) == 0
    assert "written" in capsys.readouterr().out
    assert out.read_bytes() == ref.read_bytes()  # one forward per pair, batch size 1, one length bucket
    assert len(read_jsonl(out)) == 6 and "token_rewards" in read_jsonl(out)[0]
