"""Per-step analysis output (``top_logprobs``): each step's K most likely tokens of the reported EFT distribution,
computed on device, with their EFT log-prob and each model's, in plain, EFT (mixture), conservative and speculative
decoding, through the engine, ``LLM.generate``, the OpenAI Batch output and native job lines.

References: the same run's full distributions (``return_distributions``: a stable descending numpy argsort of
them gives the ids, exactly), and independent transformers forwards of each model over the tokens it saw,
combined by the EFT formula in float64 (``tests/eft_reference.py``), within the float32 rounding bound
(``tests/tolerances.py``: a model's log-softmax moves by twice its logits' bound, the EFT log-probs by
``eft_logprob_tolerance``).
"""

from __future__ import annotations

import io
import json

import jax.numpy as jnp
import numpy as np
import pytest

import eft_jax
from eft_jax import decode
from eft_jax.engine import Engine
from eft_jax.prompts import render_tokens
from eft_jax.sampling import SamplingParams
from eft_jax.spec import EFTSpec
from eft_reference import eft_reference, next_token_logprobs
from tiny import TOKENIZER_SIZE, tiny_tokenizer
from tolerances import eft_logprob_tolerance

PROMPTS = ["The quick brown fox", [{"role": "user", "content": "Say something."}], "a"]


@pytest.fixture(scope="module")
def m(family):
    return {name: eft_jax.load_model(path) for name, (path, _) in family.items()}


def test_top_k_order_is_a_stable_descending_argsort():
    """Ties (finite, -inf, and 0.0 vs -0.0) come lower id first, as a stable descending argsort orders them."""
    rng = np.random.default_rng(0)
    x = rng.choice(np.array([-np.inf, -3.0, -2.0, -1.5, -0.0, 0.0], np.float32), size=(4, 3, 50))
    x[0, 0] = -np.inf  # a row of ties only
    for k in (1, 7, 50):
        values, ids = decode.top_logprobs(jnp.asarray(x), k)
        want = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        np.testing.assert_array_equal(np.asarray(ids), want)
        np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(x, want, axis=-1))


# name: (roles: base, ref, fine-tunes; weights; base_top_p; speculative k; K)
CASES = {
    "plain": (("large_base", None, []), [], None, 0, 5),
    "mixture": (("large_base", "small_base", ["small_ft", "small_ft2"]), [0.3, 0.7], None, 0, 5),
    # A narrow base nucleus leaves fewer finite ids than K: the top K end with -inf ties, lower id first.
    "conservative": (("large_base", "small_base", ["small_ft"]), [1.0], 0.05, 0, 20),
    "speculative": (("large_base", "small_base", ["small_ft"]), [1.0], None, 3, 5),
}


def _spec(m, roles, weights, base_top_p):
    base, ref, fts = roles
    if ref is None:
        return EFTSpec.single(m[base])
    return EFTSpec.up_scaling(m[base], m[ref], [m[f] for f in fts], weights, base_top_p=base_top_p)


@pytest.mark.parametrize("name", sorted(CASES))
def test_top_logprobs_equal_the_full_distribution_and_each_models_forward(family, m, name, family_logit_tol):
    roles, weights, base_top_p, k_spec, K = CASES[name]
    spec = _spec(m, roles, weights, base_top_p)
    engine = Engine(spec, chunk_size=4, speculative_k=k_spec)
    # Filters and a logit_bias shape the samples; the reported distribution is the one before them.
    sampling = SamplingParams(temperature=0.8, top_k=12, logit_bias=((101, 3.0),))
    results = engine.generate(PROMPTS, sampling, max_new_tokens=6, batch_size=2, seed=3, return_distributions=True,
                              top_logprobs=K)
    # Recording changes nothing about the samples.
    bare = engine.generate(PROMPTS, sampling, max_new_tokens=6, batch_size=2, seed=3)
    assert [r.tokens for r in results] == [r.tokens for r in bare]

    torch_of = {k: v[1] for k, v in family.items()}
    members = [roles[0]] if roles[1] is None else [roles[0], roles[1], *roles[2]]
    tol = eft_logprob_tolerance(family_logit_tol, weights or [0.0])
    saw_inf_ties = False
    for prompt, r in zip(PROMPTS, results, strict=True):
        n = len(r.tokens)
        assert r.top_ids.shape == r.top_logprobs.shape == (n, K) and r.top_ids.dtype == np.int32
        assert list(r.top_component_logprobs) == engine.labels
        # The same run's full distribution: its stable descending argsort, exactly.
        want = np.argsort(-r.distributions, axis=-1, kind="stable")[:, :K]
        np.testing.assert_array_equal(r.top_ids, want)
        np.testing.assert_array_equal(r.top_logprobs, np.take_along_axis(r.distributions, want, axis=-1))
        saw_inf_ties |= bool(np.isneginf(r.top_logprobs).any())
        # Independent: each model's transformers forward over the tokens it saw, and the EFT formula.
        prompt_ids = [render_tokens(c.model.tokenizer, prompt, c.prompt_format) for c in spec.components]
        for j in range(n):
            lps = [next_token_logprobs(torch_of[role], prompt_ids[i] + r.tokens[:j], TOKENIZER_SIZE)
                   for i, role in enumerate(members)]
            ids = r.top_ids[j]
            for label, lp in zip(engine.labels, lps, strict=True):
                np.testing.assert_allclose(r.top_component_logprobs[label][j], lp[ids], atol=2 * family_logit_tol,
                                           rtol=0)
            expected = (lps[0] if len(lps) == 1
                        else eft_reference(lps[0], lps[1], lps[2:], list(spec.weights), spec.base_top_p))[ids]
            got = r.top_logprobs[j].astype(np.float64)
            assert np.array_equal(np.isneginf(got), np.isneginf(expected))
            finite = np.isfinite(expected)
            np.testing.assert_allclose(got[finite], expected[finite], atol=tol if len(lps) > 1 else 2 * family_logit_tol,
                                       rtol=0)
            # The sampled token's reported log-prob belongs to the same distribution.
            assert r.token_logprobs[j] == r.distributions[j, r.tokens[j]]
    assert saw_inf_ties == (name == "conservative")


def test_bad_top_logprobs_is_refused(m):
    engine = Engine(EFTSpec.single(m["small_base"]))
    for bad in (-1, TOKENIZER_SIZE + 1, 2.0, True):
        with pytest.raises(ValueError, match="top_logprobs must be an integer"):
            engine.generate(["a"], max_new_tokens=2, top_logprobs=bad)


def test_llm_logprobs_use_the_on_device_top_k(family, tmp_path, monkeypatch):
    from eft_jax.llm import LLM, SamplingParams as VllmParams
    from job_helpers import trio_config

    llm = LLM(str(trio_config(family, tmp_path / "c.yaml")))
    seen = []
    real = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self, *a, **kw: seen.append(kw) or real(self, *a, **kw))
    params = [VllmParams(max_tokens=4, logprobs=3, seed=1), VllmParams(max_tokens=4, logprobs=1, seed=1),
              VllmParams(max_tokens=4, seed=1)]
    out = llm.generate(["hello", "a b", "zz"], params, use_tqdm=False)
    assert sorted(kw["top_logprobs"] for kw in seen) == [0, 3]  # one run K = 3 for both, one without
    assert not any(kw.get("return_distributions") for kw in seen)
    for o, k in zip(out[:2], (3, 1), strict=True):
        c = o.outputs[0]
        for j, entry in enumerate(c.logprobs):
            # The sampled token first, then the top k in descending order (the sampled one once if among them).
            items = list(entry.items())
            assert items[0][0] == c.token_ids[j] and len(entry) in (k, k + 1)
            rest = [v for _, v in items[1:]]
            assert rest == sorted(rest, reverse=True)
            if len(entry) == k + 1:
                assert items[0][1] <= rest[-1]
    assert out[2].outputs[0].logprobs is None


def _job_config(family, tmp_path):
    from eft_jax.config import load_config
    from job_helpers import trio_config

    return load_config(trio_config(family, tmp_path / "c.yaml", batch_size=2, max_new_tokens=5))


def _run_job(family, tmp_path, monkeypatch, lines):
    """``lines`` as a job's input file, run; the job's summary, the keyword arguments of each ``Engine.run``
    call it made, and its config."""
    from eft_jax.jobs.runner import run_generate

    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seen = []
    real = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self, *a, **kw: seen.append(kw) or real(self, *a, **kw))
    config = _job_config(family, tmp_path)
    return run_generate(config, inputs, tmp_path / "out.jsonl", progress=False, log=io.StringIO()), seen, config


def test_native_top_logprobs_lines_round_trip_and_bad_values_are_refused(family, tmp_path, monkeypatch,
                                                                          family_logit_tol):
    from job_helpers import read_jsonl

    lines = [{"id": "a", "prompt": "hello", "top_logprobs": 3}, {"id": "b", "prompt": "a b c"},
             {"id": "c", "prompt": "zz", "top_logprobs": 1, "seed": 4}, {"id": "bad", "prompt": "x", "top_logprobs": 21},
             {"id": "bad2", "prompt": "x", "top_logprobs": True}, {"id": "z", "prompt": "x", "top_logprobs": 0}]
    summary, seen, config = _run_job(family, tmp_path, monkeypatch, lines)
    assert summary.skipped == 2
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [(e["line"], e["kind"]) for e in errors] == [(4, "invalid_field"), (5, "invalid_field")]
    assert all("field 'top_logprobs' must be an integer in [0, 20]" in e["error"] for e in errors)
    # Lines asking for top log-probs run apart, K = the most any of them asks for; the full distributions never.
    assert sorted(kw["top_logprobs"] for kw in seen) == [0, 3]
    assert not any(kw.get("return_distributions") for kw in seen)

    records = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert "top_logprobs" not in records["b"] and "top_logprobs" not in records["z"]
    roles = [role for role, _ in config.roles()]
    for ident, k in (("a", 3), ("c", 1)):
        rec = records[ident]
        steps = rec["top_logprobs"]
        assert len(steps) == rec["tokens"]
        assert sum(s["logprob"] for s in steps) == pytest.approx(rec["logprob"], abs=1e-4)
        for s in steps:
            assert set(s) == {"id", "token", "logprob", "logprobs", "top_logprobs"} and list(s["logprobs"]) == roles
            alts = s["top_logprobs"]
            assert len(alts) == k and all(set(a) == {"id", "token", "logprob", "logprobs"} for a in alts)
            assert [a["logprob"] for a in alts] == sorted((a["logprob"] for a in alts), reverse=True)
            assert s["logprob"] <= alts[0]["logprob"]
            assert all(list(a["logprobs"]) == roles for a in alts)
        assert "".join(s["token"] for s in steps).startswith(rec["response"])

    # Line a's alternatives against each model's transformers forward and the EFT formula (w = 1).
    tok = tiny_tokenizer()
    formats = {"base": "plain", "ref": "plain", "ft0": "chat"}
    names = {"base": "large_base", "ref": "small_base", "ft0": "small_ft"}
    steps = records["a"]["top_logprobs"]
    generated = [s["id"] for s in steps]
    for j, s in enumerate(steps):
        lps = {role: next_token_logprobs(family[names[role]][1], render_tokens(tok, "hello", formats[role])
                                         + generated[:j], TOKENIZER_SIZE) for role in roles}
        eft = eft_reference(lps["base"], lps["ref"], [lps["ft0"]], [1.0])
        for a in s["top_logprobs"]:
            assert abs(a["logprob"] - eft[a["id"]]) <= eft_logprob_tolerance(family_logit_tol, [1.0])
            assert a["token"] == tok.decode([a["id"]], skip_special_tokens=False)
            for role in roles:
                assert abs(a["logprobs"][role] - lps[role][a["id"]]) <= 2 * family_logit_tol


def test_openai_top_logprobs_come_from_the_device_and_carry_each_models_values(family, tmp_path, monkeypatch):
    import openai.types as openai_types
    import openai.types.chat as chat_types

    from job_helpers import read_jsonl

    def line(cid, url, **body):
        return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "m", **body}}

    lines = [line("chat", "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                  logprobs=True, top_logprobs=2),
             line("cmpl", "/v1/completions", prompt="abc", max_tokens=4, logprobs=3),
             line("none", "/v1/chat/completions", messages=[{"role": "user", "content": "x"}], max_tokens=3)]
    summary, seen, config = _run_job(family, tmp_path, monkeypatch, lines)
    assert summary.exit_status == 0
    assert sorted(kw["top_logprobs"] for kw in seen) == [0, 3]
    assert not any(kw.get("return_distributions") for kw in seen)
    bodies = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(tmp_path / "out.jsonl")}
    roles = [role for role, _ in config.roles()]

    chat = bodies["chat"]
    chat_types.ChatCompletion.model_validate(chat)
    content = chat["choices"][0]["logprobs"]["content"]
    extension = chat["eft"]["choices"][0]["top_logprobs"]
    assert len(extension) == len(content) > 0
    for entry, alts in zip(content, extension, strict=True):
        tops = entry["top_logprobs"]
        assert len(tops) == len(alts) == 2
        assert [t["token"] for t in tops] == [a["token"] for a in alts]
        assert [t["logprob"] for t in tops] == [a["logprob"] for a in alts]
        assert tops[0]["logprob"] >= tops[1]["logprob"] and entry["logprob"] <= tops[0]["logprob"]
        assert all(list(a["logprobs"]) == roles for a in alts)

    cmpl = bodies["cmpl"]
    openai_types.Completion.model_validate(cmpl)
    lp = cmpl["choices"][0]["logprobs"]
    extension = cmpl["eft"]["choices"][0]["top_logprobs"]
    assert len(extension) == len(lp["tokens"])
    for top, alts in zip(lp["top_logprobs"], extension, strict=True):
        assert len(alts) == 3 and {a["token"]: a["logprob"] for a in alts} == top
        assert all(list(a["logprobs"]) == roles for a in alts)
    assert bodies["none"]["choices"][0]["logprobs"] is None and "top_logprobs" not in bodies["none"]["eft"]["choices"][0]
