"""OpenAI Batch JSONL in and out (``jobs.openai_batch``), through the real command line on the tiny trio.

The output is checked against independent references: the ``openai`` package's own response types
(``ChatCompletion`` / ``Completion``), the native job format (the same id and prompt give the same sample),
the byte-level tokenizer (the token strings and bytes of ``logprobs`` spell the text), teacher forcing (each
choice's per-model log-probs and implicit reward recomputed by scoring its tokens), and a config with the weights a line asks for.
"""

from __future__ import annotations

import json

import openai.types as openai_types  # the test extra; the reference schema of the responses
import openai.types.chat as chat_types
import pytest

from eft_jax.jobs.openai_batch import JobDefaults, LineProblem, parse_line
from job_helpers import kill_after_lines, read_jsonl, run, summary_counts, trio_config

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def chat_line(cid, content, **body):
    return {"custom_id": cid, "method": "POST", "url": CHAT,
            "body": {"model": "eft-toy", "messages": [{"role": "user", "content": content}], **body}}


def completion_line(cid, prompt, **body):
    return {"custom_id": cid, "method": "POST", "url": COMPLETIONS, "body": {"model": "eft-toy", "prompt": prompt, **body}}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = [  # (input line number, custom_id)
    (1, "chat-a"), (2, "cmpl-b"), (4, "chat-n2"), (5, "chat-hot"), (6, "cmpl-lp"), (8, "chat-stop"),
] + [(14 + i, f"more-{i}") for i in range(10)]
LINES = 23


def batch_lines():
    # Every good prompt renders to at most 16 tokens for every model (one prompt bucket) and the last lines ask
    # for the longest answer (8), so a resumed run decodes with the same cache shapes as the uninterrupted one
    # whichever lines the kill left: float32 sums of other shapes may round differently in their last bits,
    # and the SIGKILL test compares bytes.
    return [
        chat_line("chat-a", "Hi there", max_tokens=5, logprobs=True, top_logprobs=2),      # 1
        completion_line("cmpl-b", "A quick fox", max_completion_tokens=4),                 # 2
        '{"custom_id": "broken", "body": ',                                                # 3 malformed JSON
        chat_line("chat-n2", "Tell me", n=2, seed=11, temperature=1.0),                    # 4 n=2, job's temperature
        chat_line("chat-hot", "x", temperature=0.3),                                       # 5 per-request temperature
        completion_line("cmpl-lp", "abc", logprobs=3, max_tokens=6),                       # 6 completions logprobs
        completion_line("chat-a", "duplicate id"),                                         # 7 duplicate custom_id
        chat_line("chat-stop", "Say something", stop=["e"], max_tokens=8),                 # 8 stop string
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},  # 9
        chat_line("penalty", "x", presence_penalty=2.5),                                   # 10 out of range
        completion_line("no-prompt", None),                                                # 11 missing prompt
        {"method": "POST", "url": CHAT, "body": {"messages": [{"role": "user", "content": "x"}]}},  # 12 no custom_id
        chat_line("weights-bad", "x", eft={"weights": [1.0, 2.0]}),                        # 13 two weights, one ft
    ] + [completion_line(f"more-{i}", f"count {i}", max_tokens=8) for i in range(10)]      # 14-23



BAD = {3: "malformed_json", 7: "duplicate_id", 9: "invalid_field", 10: "invalid_field",
       11: "missing_field", 12: "missing_field", 13: "invalid_field"}


def test_openai_batch_runs_resumes_after_sigkill_and_parses_with_openai_types(family, env, tmp_path):
    config = trio_config(family, tmp_path / "c.yaml", batch_size=1, max_new_tokens=6, chunk_size=2)
    batch = write_lines(tmp_path / "batch.jsonl", batch_lines())

    reference = tmp_path / "ref.jsonl"
    proc = run(env, "generate", "--config", config, "--prompts", batch, "--out", reference, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert summary_counts(proc.stdout) == {"lines": LINES, "run": len(GOOD), "done": 0, "skipped": len(BAD),
                                           "truncated": 0}

    # Killed after its first written lines, then resumed: the same bytes as the uninterrupted run.
    out = tmp_path / "out.jsonl"
    # the 7 error lines come first
    kill_after_lines(env, ["generate", "--config", config, "--prompts", batch, "--out", out, "--no-progress"], out,
                     len(BAD) + 1)
    done_before = sum(1 for r in read_jsonl_prefix(out) if r["response"] is not None)
    assert 1 <= done_before < len(GOOD)
    resumed = run(env, "generate", "--config", config, "--prompts", batch, "--out", out, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert summary_counts(resumed.stdout)["done"] == done_before
    assert out.read_bytes() == reference.read_bytes()

    records = read_jsonl(out)
    # One line per input line, in input order: the good ones answered, the bad ones in OpenAI's error shape.
    assert len(records) == LINES
    by_id = {}
    for line, rec in zip(range(1, LINES + 1), records, strict=True):
        assert set(rec) == {"id", "custom_id", "response", "error"} and rec["id"].startswith("batch_req_")
        if line in BAD:
            assert rec["response"] is None and rec["error"]["code"] == BAD[line] and rec["error"]["message"]
            continue
        assert rec["error"] is None and rec["response"]["status_code"] == 200
        body = rec["response"]["body"]
        typed = (chat_types.ChatCompletion if body["object"] == "chat.completion" else openai_types.Completion)
        parsed = typed.model_validate(body)  # the openai package's own schema
        assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
        assert parsed.usage.completion_tokens == sum(c["tokens"] for c in body["eft"]["choices"])
        by_id[rec["custom_id"]] = body
    assert [cid for _, cid in GOOD] == list(by_id)
    assert [r["custom_id"] for r in records] == [
        "chat-a", "cmpl-b", None, "chat-n2", "chat-hot", "cmpl-lp", "chat-a", "chat-stop", "bad-url", "penalty",
        "no-prompt", None, "weights-bad"] + [f"more-{i}" for i in range(10)]
    assert "body.presence_penalty must be a number in [-2, 2]" in records[9]["error"]["message"]  # field, allowed

    errors = {e["line"]: e["kind"] for e in read_jsonl(tmp_path / "out.errors.jsonl")}
    assert errors == BAD

    # max_tokens, n, stop per line.
    assert len(by_id["chat-n2"]["choices"]) == 2
    assert by_id["cmpl-b"]["eft"]["choices"][0]["tokens"] <= 4
    assert by_id["chat-a"]["eft"]["choices"][0]["tokens"] <= 5
    stop_choice = by_id["chat-stop"]["choices"][0]
    assert "e" not in stop_choice["message"]["content"]
    if by_id["chat-stop"]["eft"]["choices"][0].get("stop") == "e":
        assert stop_choice["finish_reason"] == "stop"

    # logprobs: the byte-level tokens spell the text; each entry's top alternatives are sorted and include
    # nothing likelier than the best.
    content = by_id["chat-a"]["choices"][0]["logprobs"]["content"]
    text = by_id["chat-a"]["choices"][0]["message"]["content"]
    assert "".join(e["token"] for e in content).startswith(text)
    if by_id["chat-a"]["choices"][0]["finish_reason"] == "length":  # every token is text: the bytes spell it
        assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", errors="replace") == text
    for e in content:
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True) and e["logprob"] <= tops[0]
    lp = by_id["cmpl-lp"]["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]).startswith(by_id["cmpl-lp"]["choices"][0]["text"])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert all(len(top) <= 3 for top in lp["top_logprobs"])


def read_jsonl_prefix(path):
    """The whole lines of a file a killed job may have left with a partial last line."""
    data = path.read_bytes()
    return [json.loads(raw) for raw in data[: data.rfind(b"\n") + 1].splitlines()]


def test_openai_lines_give_the_native_samples_and_score_recomputes_their_rewards(family, env, tmp_path,
                                                                                 family_logit_tol):
    """The same id and prompt give the same sample in both formats (one stream per id and sample); each model's
    log-prob and the implicit reward of each choice equal what teacher forcing its tokens computes."""
    config = trio_config(family, tmp_path / "c.yaml", max_new_tokens=6)
    prompts = [("c1", "Hello there"), ("c2", "Why is the sky blue?"), ("c3", "One two three")]
    oa = write_lines(tmp_path / "oa.jsonl", [chat_line(cid, p, logprobs=True) for cid, p in prompts])
    native = write_lines(tmp_path / "native.jsonl",
                         [{"id": cid, "messages": [{"role": "user", "content": p}]} for cid, p in prompts])
    for src, dst in ((oa, "oa_out.jsonl"), (native, "native_out.jsonl")):
        proc = run(env, "generate", "--config", config, "--prompts", src, "--out", tmp_path / dst, "--no-progress")
        assert proc.returncode == 0, proc.stderr
    oa_out = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(tmp_path / "oa_out.jsonl")}
    native_out = {r["id"]: r for r in read_jsonl(tmp_path / "native_out.jsonl")}
    for cid, _ in prompts:
        choice, extra = oa_out[cid]["choices"][0], oa_out[cid]["eft"]["choices"][0]
        assert choice["message"]["content"] == native_out[cid]["response"]
        assert extra["logprob"] == native_out[cid]["logprob"] and extra["tokens"] == native_out[cid]["tokens"]
        assert choice["finish_reason"] == native_out[cid]["finish_reason"]

    # Teacher forcing: score each length-finished choice's tokens (the tiny tokenizer is byte-level without merges:
    # one token per byte, mapped by transformers' own byte-to-unicode table) with every model in one forward.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from eft_jax.config import load_config
    from eft_jax.jobs.runner import build_engine

    chars = bytes_to_unicode()
    jobs = build_engine(load_config(config))
    tokenizer = jobs.engine.tokenizer
    scored = 0
    for cid, p in prompts:
        choice, extra = oa_out[cid]["choices"][0], oa_out[cid]["eft"]["choices"][0]
        if choice["finish_reason"] != "length":
            continue
        ids = [tokenizer.convert_tokens_to_ids(chars[e["bytes"][0]]) for e in choice["logprobs"]["content"]]
        assert all(len(e["bytes"]) == 1 for e in choice["logprobs"]["content"]) and len(ids) == extra["tokens"]
        (result,) = jobs.engine.score([[{"role": "user", "content": p}]], [ids])
        comps = {role: result.component_logprobs[label] for role, _, label in jobs.roles}
        reward = sum(comps["ft0"]) - sum(comps["ref"])
        # Per token, each model's log-prob is within 2 * logit_tol of the decode's (log-softmax is 2-Lipschitz in
        # the max norm); the reward is a difference of two models' sums over `tokens` tokens.
        tol = 2 * 2 * family_logit_tol * extra["tokens"]
        assert extra["reward"]["small_ft"] == pytest.approx(reward, abs=tol)
        for role in ("base", "ref", "ft0"):
            assert extra["logprobs"][role] == pytest.approx(sum(comps[role]), abs=2 * family_logit_tol * len(ids))
        scored += 1
    assert scored, "every sample stopped early; pick other prompts"


def test_per_request_weights_give_the_samples_of_a_config_with_those_weights(family, env, tmp_path):
    config = trio_config(family, tmp_path / "c.yaml", max_new_tokens=6)
    prompts = [("w1", "Hello"), ("w2", "A longer prompt here"), ("w3", "z")]
    per_line = write_lines(tmp_path / "per_line.jsonl",
                           [completion_line(cid, p, eft={"weights": [2.5]}) for cid, p in prompts])
    plain = write_lines(tmp_path / "plain.jsonl", [completion_line(cid, p) for cid, p in prompts])
    outs = {}
    for name, src, extra in (("line", per_line, []), ("config", plain, ["eft.weights=[2.5]"]),
                             ("default", plain, [])):
        proc = run(env, "generate", "--config", config, "--prompts", src, "--out", tmp_path / f"{name}.jsonl",
                   "--no-progress", *extra)
        assert proc.returncode == 0, proc.stderr
        outs[name] = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(tmp_path / f"{name}.jsonl")}

    def samples(name):
        return {cid: (b["choices"][0]["text"], b["eft"]["choices"][0]["logprob"]) for cid, b in outs[name].items()}

    assert samples("line") == samples("config")
    assert samples("line") != samples("default")  # the weight matters at all for these prompts
    assert all(b["eft"]["weights"] == [2.5] for b in outs["line"].values())


def test_mixed_files_and_score_input_are_refused(family, env, tmp_path):
    config = trio_config(family, tmp_path / "c.yaml")
    mixed = write_lines(tmp_path / "mixed.jsonl", [{"id": 1, "prompt": "native"}, completion_line("x", "openai")])
    proc = run(env, "generate", "--config", config, "--prompts", mixed, "--out", tmp_path / "o.jsonl")
    assert proc.returncode == 2
    assert "mixes native lines (first on line 1" in proc.stderr and "OpenAI Batch lines (first on line 2" in proc.stderr
    oa = write_lines(tmp_path / "oa.jsonl", [completion_line("x", "openai")])
    proc = run(env, "score", "--config", config, "--pairs", oa, "--out", tmp_path / "s.jsonl")
    assert proc.returncode == 2 and "eft-jax generate` only" in proc.stderr


DEFAULTS = JobDefaults(temperature=0.7, top_p=0.9, top_k=0, min_p=0.0, fine_tuned=1)


@pytest.mark.parametrize("body, kind, words", [
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "invalid_field", r"body.top_p must be a number in \(0, 1\]"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}}, "invalid_field",
     r"body.logit_bias must be an object mapping token ids .* in \[-100, 100\]"),
    ({"messages": [{"role": "user", "content": "x"}], "min_tokens": -1}, "invalid_field", "body.min_tokens must be"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "unsupported_field", "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "unsupported_field", "unknown body field"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "invalid_field", "logprobs=true"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "unsupported_field",
     "text parts"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "max_completion_tokens": 5}, "invalid_field",
     "disagree"),
    ({"prompt": "x"}, "invalid_field", "belongs to /v1/completions"),
])
def test_chat_bodies_eft_jax_cannot_honour_are_refused_per_line(body, kind, words):
    with pytest.raises(LineProblem, match=words) as e:
        parse_line({"custom_id": "a", "method": "POST", "url": CHAT, "body": body}, DEFAULTS)
    assert e.value.kind == kind


def test_honoured_and_neutral_fields_are_accepted():
    p = parse_line({"custom_id": "a", "method": "POST", "url": CHAT, "body": {
        "model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
                                                                                                 "text": "there"}]}],
        "temperature": 0.7, "top_p": 0.9, "presence_penalty": 0, "stream": False, "n": 3, "seed": 4,
        "max_completion_tokens": 9, "stop": "END", "logprobs": True, "top_logprobs": 1, "eft": {"weights": [0.5]},
        "user": "someone", "frequency_penalty": None}}, DEFAULTS)
    assert p.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert (p.n, p.seed, p.max_new_tokens, p.stop, p.weights) == (3, 4, 9, ("END",), (0.5,))
    assert p.sampling == {"temperature": 0.7, "top_p": 0.9, "presence_penalty": 0.0}
    assert p.api.chat and p.api.logprobs and p.api.top_logprobs == 1 and p.api.model == "m"


def test_output_file_reads_openai_lines_drops_stale_error_lines_and_refuses_the_other_format(tmp_path):
    from eft_jax.jobs.openai_batch import error_key, error_line
    from eft_jax.jobs.records import NATIVE, OPENAI, JobError, OutputFile, id_key

    out = tmp_path / "out.jsonl"
    answered = {"id": "batch_req_1", "custom_id": "y", "error": None, "response": {"status_code": 200, "body": {
        "choices": [{"index": 0}, {"index": 1}], "eft": {"fingerprint": "f1", "input_sha256": "abc"}}}}
    stale = error_line("x", "prompt_too_long", "too long")
    out.write_text(json.dumps(stale) + "\n" + json.dumps(answered) + "\n")
    output = OutputFile(out, "f1", fmt=OPENAI)
    assert output.done == {(id_key("y"), 0): "abc", (id_key("y"), 1): "abc"}
    assert output.error_lines == {error_key(stale)}
    with pytest.raises(JobError, match="fingerprint f1"):
        OutputFile(out, "f2", fmt=OPENAI)
    with pytest.raises(JobError, match="OpenAI Batch output line, but this job's input is in the native format"):
        OutputFile(out, "f1", fmt=NATIVE)
    # "x" now runs (its error is not among this run's issues): its error line goes when the file is sorted.
    output.sort({id_key("x"): 1, id_key("y"): 2})
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == ["y"]


def test_native_lines_take_stop_weights_and_response_prefix(tmp_path):
    from eft_jax.jobs.records import read_requests

    path = write_lines(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "x", "stop": "END", "weights": [0.5], "response_prefix": "Answer:"},
        {"id": "b", "prompt": "x", "stop": ["A", "B"]},
        {"id": "c", "prompt": "x", "stop": [""]},
        {"id": "d", "prompt": "x", "weights": [1, 2]},
        {"id": "e", "prompt": "x", "weights": ["1"]},
        {"id": "f", "prompt": "x", "response_prefix": 3},
    ])
    requests, issues, _ = read_requests(path, defaults=DEFAULTS)
    a, b = requests
    assert (a.stop, a.weights, a.response_prefix) == (("END",), (0.5,), "Answer:")
    assert (b.stop, b.weights, b.response_prefix) == (("A", "B"), None, None)
    assert [(i.id, i.kind) for i in issues] == [("c", "invalid_field"), ("d", "invalid_field"), ("e", "invalid_field"),
                                                ("f", "invalid_field")]
    assert "one weight per fine-tune" in issues[1].message
