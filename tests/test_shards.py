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
import os
import re
import shutil

import pytest

from eft_jax import cli
from eft_jax.jobs.openai_batch import error_line
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
    return _reference_and_shards(family, tmp_path_factory.mktemp("shards"), LINES)


def _reference_and_shards(family, root, lines, **job):
    """``lines`` run unsharded (``root/ref``), as 3 shards (``root/n3``) and as 1 (``root/n1``)."""
    config = trio_config(family, root / "c.yaml", batch_size=1, **job)
    prompts = write_lines(root / "in.jsonl", lines)
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


def refusals(runs, tmp_path, capsys):
    """A copy of the 3 shard outputs, the merged path, and ``refused(*files)``: merge them, expect exit 2 and
    no output, return the message. Checks first that a missing shard is named with the command to run."""
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
    return n3, files, out, refused


def test_merge_refuses_missing_incomplete_disagreeing_and_foreign_shards(runs, tmp_path, capsys):
    root, _, prompts = runs
    n3, files, out, refused = refusals(runs, tmp_path, capsys)

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


# --- OpenAI Batch input: shards and merge ---------------------------------------------------------------------

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def oa_line(cid, text, chat=True, **body):
    prompt = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    return {"custom_id": cid, "method": "POST", "url": CHAT if chat else COMPLETIONS, "body": {**prompt, **body}}


# Short prompts: one length bucket for every model (see the module docstring), chat template included.
OA_LINES = [
    oa_line("c0", "The fox", max_tokens=5),
    oa_line("c1", "Hi there", n=2, logprobs=True),
    '{"custom_id": "broken", "body": ',                                          # malformed: reported by shard 0
    oa_line("k0", "count 0", chat=False, max_tokens=4),
    oa_line("c0", "again", chat=False),                                          # duplicate custom_id: c0's shard
    {"custom_id": "url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},  # bad url
    {"method": "POST", "url": CHAT, "body": {"messages": [{"role": "user", "content": "x"}]}},  # no custom_id
    oa_line("w2", "weights", eft={"weights": [1.0, 2.0]}),  # one fine-tune: refused by the job (merge has no config)
    oa_line("bias", "biased", logit_bias={"99999": 1}),     # refused at run time: outside the vocabulary
    *(oa_line(f"k{i}", f"count {i}", chat=i % 2 == 0, seed=i) for i in range(1, 8)),
]
OA_BAD = {3: "malformed_json", 5: "duplicate_id", 6: "invalid_field", 7: "missing_field", 8: "invalid_field",
          9: "invalid_field"}
OA_MORE = [oa_line(f"new{i}", f"new {i}", chat=i % 2 == 1) for i in (0, 1, 5, 6)] + [oa_line("nobody", "")]


@pytest.fixture(scope="module")
def oa_runs(family, tmp_path_factory):
    """OpenAI Batch input: the unsharded reference, 3 shards and 1 shard (each run once, in-process)."""
    return _reference_and_shards(family, tmp_path_factory.mktemp("oa_shards"), OA_LINES, max_new_tokens=5)


def test_openai_shards_merge_to_the_unsharded_output_and_errors_byte_for_byte(oa_runs, tmp_path, capsys):
    root, _, prompts = oa_runs
    ref, ref_errors = (root / "ref" / "out.jsonl").read_bytes(), (root / "ref" / "out.errors.jsonl").read_bytes()
    records = read_jsonl(root / "ref" / "out.jsonl")
    # The reference: one line per input line in input order, error lines at the bad lines (w2 and bias too).
    assert [r["custom_id"] for r in records] == [
        x["custom_id"] if isinstance(x, dict) and "custom_id" in x else None for x in OA_LINES]
    assert {i + 1 for i, r in enumerate(records) if r["response"] is None} == {*OA_BAD, 8, 9}
    assert {e["line"]: e["kind"] for e in read_jsonl(root / "ref" / "out.errors.jsonl")} == {
        **OA_BAD, 8: "invalid_field", 9: "invalid_field"}
    assert len(records[1]["response"]["body"]["choices"]) == 2

    seen = []
    for i in range(3):
        lines = read_jsonl(root / "n3" / f"out.shard-{i}-of-3.jsonl")
        assert any(r["response"] is not None for r in lines), "every shard should run a line"
        assert all(r["shard"] == f"{i}/3" and shard_of(r["custom_id"], 3) == i for r in lines
                   if r["custom_id"] is not None)
        assert all(e["shard"] == f"{i}/3" for e in read_jsonl(root / "n3" / f"out.shard-{i}-of-3.errors.jsonl"))
        seen += [r["custom_id"] for r in lines]
    assert sorted(map(str, seen)) == sorted(str(r["custom_id"]) for r in records)

    for n in (3, 1):
        work = tmp_path / f"n{n}"
        shutil.copytree(root / f"n{n}", work)
        out = work / "out.jsonl"
        # An error line of an earlier run whose line ran since (a shard interrupted before its final sort): it goes,
        # as the job's own sort drops it.
        stale = {**error_line("c1", "prompt_too_long", "too long"), "shard": f"{shard_of('c1', n)}/{n}"}
        with open(work / f"out.shard-{shard_of('c1', n)}-of-{n}.jsonl", "a") as f:
            f.write(json.dumps(stale) + "\n")
        assert merge(prompts, out) == 0
        assert "written" in capsys.readouterr().out
        assert out.read_bytes() == ref and (work / "out.errors.jsonl").read_bytes() == ref_errors
        assert merge(prompts, out) == 0 and "unchanged" in capsys.readouterr().out


def test_openai_shards_resume_a_grown_input_like_the_unsharded_job(oa_runs, tmp_path, capsys):
    root, config, prompts = oa_runs
    work, ref = tmp_path / "n3", tmp_path / "ref"
    shutil.copytree(root / "n3", work)
    shutil.copytree(root / "ref", ref)
    grown = write_lines(tmp_path / "grown.jsonl", OA_LINES[:4] + OA_MORE + OA_LINES[4:])
    stat = prompts.stat()
    os.utime(grown, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # "created" is the input's mtime: the same for all
    capsys.readouterr()
    for i in range(3):
        before = read_jsonl(work / f"out.shard-{i}-of-3.jsonl")
        assert generate(config, grown, work / "out.jsonl", "--shard", f"{i}/3") == 0
        counts = summary(capsys.readouterr().out)
        assert counts["run"] == sum(1 for x in OA_MORE[:-1] if shard_of(x["custom_id"], 3) == i)
        assert counts["done"] == sum(1 for r in before if r["response"] is not None)
        after = read_jsonl(work / f"out.shard-{i}-of-3.jsonl")
        assert all(r in after for r in before if r["response"] is not None)  # finished lines kept as they were
    assert merge(grown, work / "out.jsonl") == 0
    assert generate(config, grown, ref / "out.jsonl") == 0  # the unsharded job resumes over the grown input
    assert (work / "out.jsonl").read_bytes() == (ref / "out.jsonl").read_bytes()
    assert (work / "out.errors.jsonl").read_bytes() == (ref / "out.errors.jsonl").read_bytes()
    assert any(r["custom_id"] == "nobody" and r["error"]["code"] == "empty_prompt"
               for r in read_jsonl(ref / "out.jsonl"))


def test_openai_merge_refuses_missing_incomplete_disagreeing_and_duplicate_shards(oa_runs, tmp_path, capsys):
    root, _, prompts = oa_runs
    n3, files, out, refused = refusals(oa_runs, tmp_path, capsys)

    i = next(i for i, f in enumerate(files) if any(json.loads(x)["response"] is not None
                                                  for x in f.read_text().splitlines()))
    lines = files[i].read_text().splitlines(keepends=True)
    k = next(k for k, x in enumerate(lines) if json.loads(x)["response"] is not None)
    answered = json.loads(lines[k])
    files[i].write_text("".join(lines[:k] + lines[k + 1:]))  # an answered line lost
    err = refused(*files)
    assert f"shard {i}/3" in err and "is incomplete" in err and f"(id {id_key(answered['custom_id'])})" in err
    files[i].write_text("".join(lines + [lines[k]]))  # the line twice
    err = refused(*files)
    assert "is there twice" in err and id_key(answered["custom_id"]) in err
    files[i].write_text("".join(lines))

    zero = files[0].read_text().splitlines(keepends=True)
    e = next(k for k, x in enumerate(zero) if json.loads(x)["custom_id"] is None)  # shard 0's error line of a bad line
    files[0].write_text("".join(zero[:e] + zero[e + 1:]))
    err = refused(*files)
    assert "shard 0/3" in err and "is incomplete" in err and "(id null: its error line)" in err
    files[0].write_text("".join(zero))

    other = json.loads(lines[k])
    other["response"]["body"]["eft"]["fingerprint"] = "0123456789abcdef"
    files[i].write_text("".join(lines[:k]) + json.dumps(other) + "\n" + "".join(lines[k + 1:]))
    err = refused(*files)
    assert "different configs" in err and "0123456789abcdef" in err and str(files[i]) in err
    files[i].write_text("".join(lines))

    err = refused(*files, files[1])
    assert "shard 1/3 given twice" in err
    err = refused(files[0], files[1], root / "n1" / "out.shard-0-of-1.jsonl")
    assert "disagree on the number of shards N" in err
    native = write_lines(tmp_path / "native.jsonl", [{"id": "c0", "prompt": "The fox"}])
    err = refused(*files, prompts=native)
    assert "is native input, but the shard outputs hold OpenAI Batch output lines" in err
    assert merge(prompts, out, *files) == 0  # the files as they were: merged


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


class _GroupOf:
    """Stands in for ``lockstep.Peers`` of a multi-process job whose mesh has ``groups`` process groups, as
    process group ``group`` sees it (its own part; every group "agrees" with it). The engine keeps its real,
    one-process Peers: this process decodes the part alone, as that group would."""

    def __init__(self, group: int, groups: int):
        self.group, self.groups, self.writer = group, groups, True

    def ints(self, values):
        import numpy as np

        return np.asarray([values] * self.groups, np.int64)

    def gather(self, value):
        return [value] * self.groups

    def agree(self, check, error):
        return check()


def test_a_multi_process_shard_writes_its_groups_parts_as_shards_of_n_times_g(runs, tmp_path, capsys, monkeypatch):
    """``--shard i/N`` of a job with G process groups: group g runs shard i + N*g of N*G (lines of shard i/N
    only, split G ways), nothing is merged by the job, and `eft-jax merge` over all N*G parts gives the
    unsharded output byte for byte."""
    from eft_jax.jobs import runner

    root, config, prompts = runs
    out = tmp_path / "out.jsonl"
    for i in range(2):
        for g in range(2):
            monkeypatch.setattr(runner, "_job_peers", lambda config, mesh, g=g: _GroupOf(g, 2))
            assert generate(config, prompts, out, "--shard", f"{i}/2") == 0
            part = Shard(i + 2 * g, 4).path(out)
            assert f"shard {i + 2 * g}/4" in capsys.readouterr().out
            assert all(shard_of(r["id"], 2) == i and shard_of(r["id"], 4) == i + 2 * g for r in read_jsonl(part))
    assert not out.exists()
    monkeypatch.undo()
    assert merge(prompts, out) == 0
    assert out.read_bytes() == (root / "ref" / "out.jsonl").read_bytes()
    assert (tmp_path / "out.errors.jsonl").read_bytes() == (root / "ref" / "out.errors.jsonl").read_bytes()
