"""Per-request sampling (issue 15): per-row filters, logit_bias, penalties, min_tokens, ignore_eos and reward
weights, traced per row in one batch; against numpy references and against each row run alone."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import eft_jax
from eft_jax import decode
from eft_jax.engine import Engine
from eft_jax.sampling import Features, RowValues, SamplingParams, check_logit_bias, filter_rows, process_rows
from eft_jax.spec import EFTSpec
from test_sampling import assert_same_distribution, np_final

# --------------------------------------------------------------------------- (a) per-row filters vs numpy

ROWS = [dict(), dict(temperature=0.7, top_k=3), dict(top_p=0.8), dict(min_p=0.3, temperature=1.3),
        dict(temperature=0.0), dict(top_k=10, top_p=0.9, min_p=0.1, temperature=0.5)]


@pytest.mark.parametrize("full_sort", [True, False], ids=["full-sort", "top-k-only"])
def test_filter_rows_match_the_numpy_reference_row_by_row(full_sort):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((len(ROWS), 50)) * 2.5).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = -np.inf
    x[1] = np.round(x[1])  # ties at the k-th value
    rows = [dict(r) for r in ROWS]
    if not full_sort:  # every top-p row has a top-k: one lax.top_k with the largest k serves all
        rows[2]["top_k"] = 7
    params = [SamplingParams(**r) for r in rows]
    features = Features.of(params, 50)
    assert features.row_filters and features.full_sort == full_sort and features.greedy
    values = RowValues(**RowValues.host(params, features))
    got = np.asarray(jax.jit(filter_rows, static_argnums=2)(x, values, features))
    for i, r in enumerate(rows):
        if r.get("temperature") == 0.0:
            want = np.full(50, -np.inf)
            want[np.argmax(x[i])] = 0.0
            np.testing.assert_array_equal(got[i], want)
        else:
            assert_same_distribution(got[i: i + 1], np_final(x[i: i + 1], **r), x[i: i + 1], **r)


# --------------------------------------------------------------------------- (b) processors vs numpy


def np_process(x, bias=(), min_tokens=0, out_index=0, stop=(), prompt=(), generated=(), rep=1.0, pres=0.0,
               freq=0.0):
    """The documented steps 1-4 on one float64 row."""
    x = np.array(x, np.float64)
    for t, b in bias:
        x[t] += b
    if out_index < min_tokens:
        x[list(stop)] = -np.inf
    counts = np.bincount(np.asarray(generated, int), minlength=len(x))
    seen = counts > 0
    seen[list(prompt)] = True
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    return x - pres * (counts > 0) - freq * counts


def test_process_rows_match_the_numpy_reference():
    rng = np.random.default_rng(2)
    x = np.log(rng.dirichlet(np.ones(30), size=3)).astype(np.float32)
    params = [SamplingParams(logit_bias={"3": 5.0, 7: -100}, min_tokens=2),
              SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams()]
    features = Features.of(params, 30)
    values = RowValues(**RowValues.host(params, features))
    prompt = [[1, 2], [4, 5, 4], [6]]
    generated = [[3, 3], [5, 9, 9, 9], []]
    counts = np.stack([np.bincount(np.asarray(g, int), minlength=30) for g in generated]).astype(np.int32)
    seen = np.zeros((3, 30), bool)
    for i, p in enumerate(prompt):
        seen[i, p] = True
    stop = np.zeros((3, 30), bool)
    stop[:, [0, 29]] = True
    out_index = np.array([1, 4, 0], np.int32)
    got = np.asarray(process_rows(x, values, features, out_index, stop, counts, seen))
    want = [np_process(x[0], ((3, 5.0), (7, -100.0)), 2, 1, (0, 29), prompt[0], generated[0]),
            np_process(x[1], prompt=prompt[1], generated=generated[1], rep=1.3, pres=0.5, freq=0.25),
            np_process(x[2], prompt=prompt[2])]
    for g, w, xi in zip(got, want, x, strict=True):
        np.testing.assert_array_equal(np.isfinite(g), np.isfinite(w))
        ok = np.isfinite(w)
        # A handful of float32 operations on values of size |x| + 100: a few roundings of that size.
        np.testing.assert_allclose(g[ok], w[ok], rtol=0, atol=8 * 2.0**-23 * (np.abs(xi).max() + 100))


def test_logit_bias_check():
    assert check_logit_bias({"5": 1, 2: -100.0}) == ((2, -100.0), (5, 1.0))
    for bad in ({"x": 1}, {1: 101}, {-1: 0}, [1, 2], {True: 1}):
        with pytest.raises(ValueError, match="must be an object mapping token ids"):
            check_logit_bias(bad)


# --------------------------------------------------------------------------- engine: mixed batch == alone


@pytest.fixture(scope="module")
def trio(family):
    m = {name: eft_jax.load_model(family[name][0]) for name in ("large_base", "small_base", "small_ft")}
    return EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 1.5)


MIXED = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5), SamplingParams(top_p=0.7),
         SamplingParams(min_p=0.2, logit_bias={7: 3.0}), SamplingParams(temperature=0.0, logit_bias={9: 100}),
         SamplingParams(min_tokens=4, ignore_eos=True), SamplingParams(top_k=2, top_p=0.9, temperature=1.2)]
PENALTIES = [SamplingParams(repetition_penalty=1.5), SamplingParams(presence_penalty=1.0, frequency_penalty=0.5,
                                                                    temperature=0.0)]
PROMPTS = ["a", "bb bb", "the third prompt is the longest", "x", "yy", "zzz zzz zzz", "q", "last one", "m"]
LIMITS = [3, 9, 5, 7, 2, 6, 8, 4, 5]


def _run(engine, params, weights=None, batch_size=3):
    reqs = []
    for i, (prompt, limit) in enumerate(zip(PROMPTS, LIMITS, strict=False)):
        if i >= len(params):
            break
        r = engine.render(prompt, limit, stream=i)
        reqs.append(dataclasses.replace(r, sampling=params[i], weights=None if weights is None else weights[i]))
    results = [None] * len(reqs)
    for update in engine.run(reqs, batch_size=batch_size, seed=4):
        for r in update.finished:
            results[r.index] = r
    return results


@pytest.mark.parametrize("k", [0, 2], ids=["eft", "speculative"])
def test_mixed_batch_gives_each_row_its_sample_alone(trio, k):
    engine = Engine(trio, speculative_k=k, chunk_size=3)
    params = MIXED + ([] if k else PENALTIES)
    weights = [(1.5,), (0.5,), None, (2.0,), (1.5,), (0.0,), (1.0,), (1.5,), (0.7,)][: len(params)]
    mixed = _run(engine, params, weights)  # batch 3: continuous batching refills rows with other settings
    for i, p in enumerate(params):
        alone = _run(engine, params[: i + 1], weights[: i + 1], batch_size=1)[i]
        assert mixed[i].tokens == alone.tokens, (i, p)
        np.testing.assert_allclose(mixed[i].token_logprobs, alone.token_logprobs, rtol=0, atol=1e-5)
    assert mixed[4].tokens[0] == 9  # +100 on a greedy row
    assert len(mixed[5].tokens) == LIMITS[5]  # ignore_eos: runs to its limit


def test_per_row_weights_equal_the_run_weights(trio):
    engine = Engine(trio, chunk_size=4)
    got = _run(engine, [SamplingParams(temperature=0.0)] * 4, [(0.5,), (2.0,), (0.5,), (2.0,)])
    for w in (0.5, 2.0):
        reqs = [engine.render(p, n, stream=i) for i, (p, n) in enumerate(zip(PROMPTS[:4], LIMITS[:4], strict=True))]
        want = engine.generate([r.prompt for r in reqs], SamplingParams(temperature=0.0), max_new_tokens=LIMITS[:4],
                               ids=range(4), seed=4, weights=[w], batch_size=3)
        for i in range(4):
            if (0.5 if i % 2 == 0 else 2.0) == w:
                assert got[i].tokens == want[i].tokens


def test_penalties_are_refused_with_speculative_decoding(trio):
    engine = Engine(trio, speculative_k=2)
    with pytest.raises(ValueError, match="request 0: repetition/presence/frequency penalties are not supported"):
        _run(engine, [SamplingParams(presence_penalty=0.5)])
    with pytest.raises(ValueError, match="outside the shared vocabulary"):
        _run(Engine(trio), [SamplingParams(logit_bias={10**6: 1})])


def test_default_settings_compile_as_before(trio):
    """All-default rows: no per-row feature, so the same programs (start, chunk, refill) as before issue 15."""
    engine = Engine(trio, chunk_size=2)
    programs = (decode.start, decode.refill, decode.decode_chunk)
    before = [f._cache_size() for f in programs]
    _run(engine, [SamplingParams()] * 6)
    after = [f._cache_size() - b for f, b in zip(programs, before, strict=True)]
    _run(engine, [SamplingParams()] * 6)  # the same run again compiles nothing
    assert [f._cache_size() - b for f, b in zip(programs, before, strict=True)] == after
    assert after[0] == 1 and after[2] <= 3


# --------------------------------------------------------------------------- (e) per-line fields in JSONL


def test_native_lines_take_sampling_fields_and_report_bad_ones_with_line_and_field(tmp_path):
    import json

    from eft_jax.jobs.openai_batch import JobDefaults
    from eft_jax.jobs.records import read_requests

    lines = [
        {"id": "a", "prompt": "x", "temperature": 0, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "min_tokens": 3,
         "ignore_eos": True, "logit_bias": {"7": -100, "3": 2.5}, "repetition_penalty": 1.2,
         "presence_penalty": -0.5, "frequency_penalty": 2},
        {"id": "b", "prompt": "x"},
        {"id": "c", "prompt": "x", "top_p": 0},
        {"id": "d", "prompt": "x", "ignore_eos": 1},
        {"id": "e", "prompt": "x", "logit_bias": {"x": 1}},
        {"id": "f", "prompt": "x", "frequency_penalty": 3},
        {"id": "g", "prompt": "x", "top_k": 1.5},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    reqs, issues, _ = read_requests(path, defaults=JobDefaults(1.0, 1.0, 0, 0.0, 1))
    a, b = reqs
    assert a.sampling == {"temperature": 0.0, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "min_tokens": 3,
                          "ignore_eos": True, "logit_bias": ((3, 2.5), (7, -100.0)), "repetition_penalty": 1.2,
                          "presence_penalty": -0.5, "frequency_penalty": 2.0}
    assert b.sampling == {}
    SamplingParams(**a.sampling)  # what the runner builds from it
    got = {i.line: (i.kind, i.message) for i in issues}
    assert got == {
        3: ("invalid_field", "field 'top_p' must be a number in (0, 1] (1 = off), got 0"),
        4: ("invalid_field", "field 'ignore_eos' must be true or false, got 1"),
        5: ("invalid_field", "field 'logit_bias' must be an object mapping token ids (integers >= 0) to numbers in "
                             "[-100, 100], got {'x': 1}"),
        6: ("invalid_field", "field 'frequency_penalty' must be a number in [-2, 2] (0 = off), got 3"),
        7: ("invalid_field", "field 'top_k' must be an integer >= 0 (0 = off), got 1.5"),
    }


def test_llm_generate_takes_one_sampling_params_per_prompt(trio):
    from eft_jax.llm import LLM
    from eft_jax.llm import SamplingParams as VParams

    llm = LLM(spec=trio, chunk_size=4, batch_size=4)
    params = [VParams(temperature=0.0, max_tokens=4), VParams(top_k=3, max_tokens=5, n=2, logit_bias={5: 2.0}),
              VParams(max_tokens=3, min_tokens=3, repetition_penalty=1.2, presence_penalty=0.3)]
    prompts = ["a", "bb bb", "zzz"]
    together = llm.generate(prompts, params, use_tqdm=False)
    # Alone: the same prompt index (its random stream) with its own params, the other prompts greedy fillers.
    for i, p in enumerate(params):
        alone = llm.generate(prompts, [p if j == i else VParams(temperature=0.0, max_tokens=1) for j in range(3)],
                             use_tqdm=False)
        assert [o.token_ids for o in together[i].outputs] == [o.token_ids for o in alone[i].outputs]
    assert [len(o.token_ids) for o in together[1].outputs] and len(together[1].outputs) == 2
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(prompts, params[:2], use_tqdm=False)


# --------------------------------------------------------------------------- jobs: one run, line == config


def test_job_lines_with_their_own_settings_run_in_one_engine_run_and_match_a_config(family, tmp_path, monkeypatch):
    import io
    import json

    from eft_jax.config import load_config
    from eft_jax.jobs.records import JobError
    from eft_jax.jobs.runner import run_generate
    from job_helpers import read_jsonl, trio_config

    settings = {"temperature": 0.5, "top_k": 4, "presence_penalty": 0.5, "logit_bias": {"9": 2.0}, "min_tokens": 2}
    prompts = ["hello", "a b c", "zz"]
    lines = tmp_path / "in.jsonl"
    lines.write_text("".join(json.dumps({"id": i, "prompt": p, **(settings if i != 1 else {"temperature": 0})})
                             + "\n" for i, p in enumerate(prompts)))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    cfg = trio_config(family, tmp_path / "c.yaml")
    runs = []
    real = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self, *a, **kw: runs.append(1) or real(self, *a, **kw))
    summary = run_generate(load_config(cfg), lines, tmp_path / "lines.jsonl", progress=False, log=io.StringIO())
    assert summary.exit_status == 0 and len(runs) == 1  # mixed settings: one Engine.run
    overrides = ["sampling.temperature=0.5", "sampling.top_k=4", "sampling.presence_penalty=0.5",
                 "sampling.logit_bias={9: 2.0}", "sampling.min_tokens=2"]
    run_generate(load_config(cfg, overrides), plain, tmp_path / "config.jsonl", progress=False, log=io.StringIO())
    by_line, by_config = read_jsonl(tmp_path / "lines.jsonl"), read_jsonl(tmp_path / "config.jsonl")
    for i in (0, 2):
        assert by_line[i]["response"] == by_config[i]["response"]
        assert by_line[i]["logprob"] == pytest.approx(by_config[i]["logprob"], abs=1e-5)

    # Penalties with speculative decoding: the config key refuses the job, a line's field skips the line.
    with pytest.raises(JobError, match="sampling.presence_penalty=0.5 is not supported with speculative"):
        run_generate(load_config(cfg, overrides + ["speculative.k=2"]), plain, tmp_path / "s.jsonl", progress=False,
                     log=io.StringIO())
    summary = run_generate(load_config(cfg, ["speculative.k=2"]), lines, tmp_path / "spec.jsonl", progress=False,
                           log=io.StringIO())
    errors = read_jsonl(tmp_path / "spec.errors.jsonl")
    assert summary.skipped == 2 and [e["line"] for e in errors] == [1, 3]
    assert all("presence_penalty=0.5 is not supported with speculative decoding" in e["error"] for e in errors)


def test_a_restarted_row_counts_its_outputs_so_far_for_the_penalties():
    """A row restarted at output ``first`` (``batching``: longrope's original context) carries its outputs so
    far as the last ``first`` tokens of its left-padded prompts; presence / frequency penalties count them
    again (numpy bincount of that tail), and nothing for a new row."""
    vocab = 11
    plan = decode.Plan(configs=(), vocab=vocab, n_ft=0, base_top_p=None, sampling=SamplingParams(), stop_ids=(),
                       pad_id=0, chunk=1, features=Features(penalties=True))
    tokens = np.array([[0, 0, 3, 4, 5, 5, 7], [1, 2, 3, 4, 5, 6, 7], [9, 9, 9, 9, 2, 2, 10]], np.int32)
    first = np.array([3, 0, 5], np.int32)
    rows = decode.NewRows((tokens,), (np.zeros_like(tokens),), np.zeros(3, np.int32), np.full(3, 9, np.int32), (),
                          1, first=first)
    got = np.asarray(decode._restart_counts(plan, rows, jax.numpy.asarray(first)))
    want = np.stack([np.bincount(t[len(t) - f:], minlength=vocab) for t, f in zip(tokens, first, strict=True)])
    np.testing.assert_array_equal(got, want)
