"""Sharded independent jobs: ``generate --shard i/N`` and ``eft-jax merge`` (docs/scale-out.md).

In-process ``cli.main`` runs of the tiny trio at temperature 1 (no subprocess: the compiled programs are
reused from one run to the next). The unsharded run is the reference: N = 1 and N = 3 shards merged must
give its output and errors file byte for byte; a grown input re-runs only the new lines of each shard;
every refusal of a mismatched resume or merge says what is wrong.

Byte for byte needs each row to run the same arithmetic in the shard as in the unsharded job: batch size 1
and prompts of one length bucket (the cache size and the prompt padding of a call come from its longest
prompt, and a batch's attention window from its longest live row; XLA rounds a float32 reduction over
another length differently). With batches of mixed lines the samples are still the same - they depend
on (seed, id, sample) only - and the log-probabilities differ in the last float32 bits
(``test_batch_neighbours_change_only_the_rounding_of_logprob``).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from eft_jax import cli
from eft_jax.jobs.records import JobError, Shard, id_key, select_shard, shard_of
from job_helpers import read_jsonl, trio_config

# Every prompt within the first length bucket (16 tokens) for every model, the chat template included.
LINES = [
    {"id": "q0", "prompt": "The quick fox"},
    {"id": 1, "messages": [{"role": "user", "content": "Hi there"}], "n": 2},
    '{"id": "broken", "prompt": ',                                   # malformed: reported by shard 0
    {"id": "q0", "prompt": "again"},                                  # duplicate id: the shard of q0
    {"id": "empty", "prompt": "   "},                                 # empty prompt
    *({"id": f"q{i}", "prompt": f"count {i}"} for i in range(2, 9)),
    {"id": "s", "prompt": "Short one", "seed": 5},
]
MORE = [{"id": f"new{i}", "prompt": f"a new line {i}"} for i in range(5)] + ['{"no": "id"}']


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def summary(stdout: str) -> dict[str, int]:
    m = re.search(r"(\d+) input lines: (\d+) run, (\d+) already done, (\d+) skipped", stdout)
    assert m, stdout
    return dict(zip(["lines", "run", "done", "skipped"], map(int, m.groups()), strict=True))


def generate(config, prompts, out, *extra):
    return cli.main(["generate", "--config", str(config), "--prompts", str(prompts), "--out", str(out),
                     "--no-progress", *map(str, extra)])


def merge(prompts, out, *files):
    return cli.main(["merge", "--prompts", str(prompts), "--out", str(out), *map(str, files)])


# --- Shard membership (no models) --------------------------------------------------------------------------


def test_shard_parsing_and_membership():
    assert Shard.parse("2/3") == Shard(2, 3) and Shard.parse(" 0 / 1 ").label == "0/1"
    for text, message in (("3/3", "must be in 0..2"), ("1/0", "at least 1"), ("-1/3", "expected i/N"),
                          ("a/b", "expected i/N"), ("3", "expected i/N")):
        with pytest.raises(JobError, match=re.escape(message)):
            Shard.parse(text)
    # Membership is a function of the id alone (sha256 of its JSON form): fixed values, 1 != "1".
    # (fixed values: a change of the hash would move finished lines of existing shard outputs)
    assert [shard_of(i, 3) for i in ("q0", "q1", "q2", 1, "1")] == [2, 0, 0, 1, 0]
    assert [shard_of(i, 1000) for i in ("q0", 1, "1")] == [956, 913, 521]
    assert {shard_of(f"id{i}", 4) for i in range(100)} == {0, 1, 2, 3}
    assert all(shard_of(i, 1) == 0 for i in ("a", 7, ""))
    import hashlib
    assert shard_of("q0", 7) == int.from_bytes(hashlib.sha256(id_key("q0").encode()).digest()[:8], "big") % 7
    # Every input line is in exactly one shard; a line without an id is shard 0's.
    from eft_jax.jobs.records import Issue, Request
    reqs = [Request(i + 1, f"id{i}", "p") for i in range(30)]
    issues = [Issue(31, None, "malformed_json", "x"), Issue(32, "id3", "duplicate_id", "x")]
    parts = [select_shard(reqs, issues, Shard(i, 3)) for i in range(3)]
    assert sorted(r.line for p in parts for r in p[0]) == list(range(1, 31))
    assert sum(p[2] for p in parts) == 32 and parts[0][1][0].line == 31
    assert [i.line for p in parts for i in p[1] if i.line == 32] == [32]
    assert any(i.line == 32 for i in parts[shard_of("id3", 3)][1])  # a duplicate goes with its first line


# --- Sharded runs + merge = the unsharded run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(family, tmp_path_factory):
    """The unsharded reference, 3 shards, and 1 shard of the same input (each run once, in-process)."""
    root = tmp_path_factory.mktemp("shards")
    config = trio_config(family, root / "c.yaml", batch_size=1)
    prompts = write_lines(root / "in.jsonl", LINES)
    assert generate(config, prompts, root / "ref" / "out.jsonl") == 0
    for n in (3, 1):
        for i in range(n):
            assert generate(config, prompts, root / f"n{n}" / "out.jsonl", "--shard", f"{i}/{n}") == 0
    return root, config, prompts


def test_sharded_runs_merge_to_the_unsharded_output_byte_for_byte(runs, tmp_path, capsys):
    root, _, prompts = runs
    ref, ref_errors = (root / "ref" / "out.jsonl").read_bytes(), (root / "ref" / "out.errors.jsonl").read_bytes()
    records = read_jsonl(root / "ref" / "out.jsonl")
    assert [(r["id"], r["sample"]) for r in records][:3] == [("q0", 0), (1, 0), (1, 1)]
    assert [e["kind"] for e in read_jsonl(root / "ref" / "out.errors.jsonl")] == [
        "malformed_json", "duplicate_id", "empty_prompt"]

    shards = sorted((root / "n3").glob("out.shard-*-of-3.jsonl"))
    assert [p.name for p in shards] == [f"out.shard-{i}-of-3.jsonl" for i in range(3)]
    seen = []
    for i, path in enumerate(shards):
        lines = read_jsonl(path)
        assert lines and all(r["shard"] == f"{i}/3" and shard_of(r["id"], 3) == i for r in lines)
        assert all(e["shard"] == f"{i}/3" for e in read_jsonl(root / "n3" / f"out.shard-{i}-of-3.errors.jsonl"))
        seen += [(r["id"], r["sample"]) for r in lines]
    assert sorted(map(str, seen)) == sorted(str((r["id"], r["sample"])) for r in records)

    for n in (3, 1):
        work = tmp_path / f"n{n}"
        shutil.copytree(root / f"n{n}", work)
        out = work / "out.jsonl"
        assert merge(prompts, out) == 0  # finds the shard outputs beside --out
        assert "written" in capsys.readouterr().out
        # temperature 1: each sample depends on (seed, id, sample) only, not on which lines ran beside it
        assert out.read_bytes() == ref and (work / "out.errors.jsonl").read_bytes() == ref_errors
        assert merge(prompts, out, *(work / f"out.shard-{i}-of-{n}.jsonl" for i in range(n))) == 0  # again: the same files
        assert "unchanged" in capsys.readouterr().out and out.read_bytes() == ref


def test_a_shard_resumes_and_a_grown_input_runs_only_its_new_lines(runs, tmp_path, capsys):
    root, config, prompts = runs
    work = tmp_path / "n3"
    shutil.copytree(root / "n3", work)
    capsys.readouterr()
    assert generate(config, prompts, work / "out.jsonl", "--shard", "1/3") == 0  # finished: nothing to do
    captured = capsys.readouterr()
    assert "nothing to do" in captured.err and summary(captured.out)["run"] == 0

    grown = write_lines(tmp_path / "grown.jsonl", LINES[:4] + MORE + LINES[4:])
    new_in = [sum(1 for x in MORE if isinstance(x, dict) and shard_of(x["id"], 3) == i) for i in range(3)]
    assert sum(new_in) == 5 and max(new_in) < 5
    for i in range(3):
        before = read_jsonl(work / f"out.shard-{i}-of-3.jsonl")
        assert generate(config, grown, work / "out.jsonl", "--shard", f"{i}/3") == 0
        counts = summary(capsys.readouterr().out)
        assert counts["run"] == new_in[i] and counts["done"] == len({r["id"] for r in before})
        after = read_jsonl(work / f"out.shard-{i}-of-3.jsonl")
        assert [r for r in after if r in before] == before  # the finished lines are kept as they were
    assert merge(grown, work / "out.jsonl") == 0

    ref = tmp_path / "ref"
    shutil.copytree(root / "ref", ref)  # the unsharded job on the grown input: resumes, runs the new lines
    assert generate(config, grown, ref / "out.jsonl") == 0
    assert (work / "out.jsonl").read_bytes() == (ref / "out.jsonl").read_bytes()
    assert (work / "out.errors.jsonl").read_bytes() == (ref / "out.errors.jsonl").read_bytes()


# --- Refusals -------------------------------------------------------------------------------------------------


def test_a_shard_refuses_the_output_of_another_shard_or_another_n(runs, tmp_path, capsys):
    root, config, prompts = runs
    shutil.copy(root / "n3" / "out.shard-0-of-3.jsonl", tmp_path / "out.shard-1-of-3.jsonl")
    shutil.copy(root / "n3" / "out.shard-0-of-3.jsonl", tmp_path / "out.shard-0-of-2.jsonl")
    shutil.copy(root / "n3" / "out.shard-0-of-3.jsonl", tmp_path / "plain.jsonl")
    shutil.copy(root / "ref" / "out.jsonl", tmp_path / "ref.shard-0-of-1.jsonl")
    capsys.readouterr()
    for shard, out, found, this in (("1/3", "out", "shard 0/3", "shard 1/3"), ("0/2", "out", "shard 0/3", "shard 0/2"),
                                    (None, "plain", "shard 0/3", "an unsharded job"),
                                    ("0/1", "ref", "no shard (an unsharded job)", "shard 0/1")):
        before = (tmp_path / (f"{out}.shard-{shard.replace('/', '-of-')}.jsonl" if shard else f"{out}.jsonl")).read_bytes()
        code = generate(config, prompts, tmp_path / f"{out}.jsonl", *(["--shard", shard] if shard else []))
        err = capsys.readouterr().err
        assert code == 2 and f"holds output of {found}" in err and f"this is {this}" in err, err
        assert "loaded models" not in err  # refused before any weights are read
        after = tmp_path / (f"{out}.shard-{shard.replace('/', '-of-')}.jsonl" if shard else f"{out}.jsonl")
        assert after.read_bytes() == before
    for bad, message in (("3/3", "must be in 0..2 (0 <= i < N)"), ("two", "expected i/N")):
        assert generate(config, prompts, tmp_path / "x.jsonl", "--shard", bad) == 2
        assert message in capsys.readouterr().err


def test_merge_refuses_missing_incomplete_disagreeing_and_foreign_shards(runs, tmp_path, capsys):
    root, _, prompts = runs
    n3 = tmp_path / "n3"
    shutil.copytree(root / "n3", n3)
    files = [n3 / f"out.shard-{i}-of-3.jsonl" for i in range(3)]
    out = tmp_path / "merged.jsonl"

    def refused(*args, prompts=prompts) -> str:
        capsys.readouterr()
        assert merge(prompts, out, *args) == 2
        assert not out.exists()
        return capsys.readouterr().err

    err = refused(files[0], files[2])
    assert "shard 1/3 is missing" in err and "out.shard-1-of-3.jsonl" in err and "--shard 1/3" in err

    lines = files[1].read_text().splitlines(keepends=True)
    files[1].write_text("".join(lines[1:]))  # its first line lost
    first = json.loads(lines[0])
    err = refused(*files)
    assert "shard 1/3" in err and "is incomplete" in err and f"id {id_key(first['id'])}" in err
    files[1].write_text("".join(lines))

    err = refused(*files, files[1])
    assert "shard 1/3 given twice" in err
    err = refused(files[0], files[1], root / "n1" / "out.shard-0-of-1.jsonl")
    assert "disagree on the number of shards N" in err

    other = json.loads(lines[0])
    other["fingerprint"] = "0123456789abcdef"
    files[1].write_text(json.dumps(other) + "\n" + "".join(lines[1:]))
    err = refused(*files)
    assert "different configs" in err and "0123456789abcdef" in err and str(files[1]) in err
    files[1].write_text("".join(lines))

    fewer = write_lines(tmp_path / "fewer.jsonl", [x for x in LINES if not (isinstance(x, dict) and x["id"] == "q5")])
    err = refused(*files, prompts=fewer)
    assert "not (valid lines) in" in err and '"q5"' in err

    files[2].write_text(files[2].read_text() + '{"id": "cut')  # killed mid-write
    err = refused(*files)
    assert "partial line" in err and "re-run that shard" in err


def test_batch_neighbours_change_only_the_rounding_of_logprob(family, tmp_path):
    """Batches of 4 and prompts of several length buckets: the shards' calls have other cache sizes and
    neighbours than the unsharded one. The samples are the same; a log-probability may differ by float32
    rounding (this is why the byte-for-byte tests above run one row at a time)."""
    config = trio_config(family, tmp_path / "c.yaml", batch_size=4)
    prompts = write_lines(tmp_path / "in.jsonl", LINES + [{"id": "long", "prompt": "a longer prompt " * 3},
                                                          {"id": "t", "prompt": "three", "max_new_tokens": 3}])
    assert generate(config, prompts, tmp_path / "ref.jsonl") == 0
    for i in range(3):
        assert generate(config, prompts, tmp_path / "out.jsonl", "--shard", f"{i}/3") == 0
    assert merge(prompts, tmp_path / "out.jsonl") == 0
    ref, merged = read_jsonl(tmp_path / "ref.jsonl"), read_jsonl(tmp_path / "out.jsonl")
    assert [{k: v for k, v in r.items() if k != "logprob"} for r in merged] == [
        {k: v for k, v in r.items() if k != "logprob"} for r in ref]
    assert [r["logprob"] for r in merged] == pytest.approx([r["logprob"] for r in ref], rel=1e-5)
    assert (tmp_path / "out.errors.jsonl").read_bytes() == (tmp_path / "ref.errors.jsonl").read_bytes()


def test_score_shards_merge_to_the_unsharded_scores(family, tmp_path):
    config = trio_config(family, tmp_path / "c.yaml", batch_size=1)
    pairs = write_lines(tmp_path / "pairs.jsonl", [
        {"id": f"p{i}", "prompt": f"count {i}", "response": f" {i + 1}"} for i in range(5)] + [
        {"id": "nr", "prompt": "no response"}])

    def score(*extra):
        return cli.main(["score", "--config", str(config), "--pairs", str(pairs), "--no-progress", *extra])

    assert score("--out", str(tmp_path / "ref.jsonl")) == 0
    for i in range(2):
        assert score("--out", str(tmp_path / "out.jsonl"), "--shard", f"{i}/2") == 0
    assert cli.main(["merge", "--pairs", str(pairs), "--out", str(tmp_path / "out.jsonl")]) == 0
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert (tmp_path / "out.errors.jsonl").read_bytes() == (tmp_path / "ref.errors.jsonl").read_bytes()
