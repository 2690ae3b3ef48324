"""Engine behaviour: sampling statistics, per-prompt randomness, batching, stops, bad input."""

import numpy as np
import pytest

import eft_jax
from eft_jax import decode
from eft_jax.engine import Engine
from eft_jax.prompts import PromptError, render_tokens
from eft_jax.sampling import SamplingParams
from eft_jax.sharding import make_mesh
from eft_jax.spec import EFTSpec
from eft_jax.vocab import VocabMismatchError
from eft_reference import eft_reference, filtered, next_token_logprobs
from tiny import TOKENIZER_SIZE, tiny_tokenizer, write_checkpoint
from tolerances import ALPHA, chi_square_pvalue, eft_logprob_tolerance


@pytest.fixture(scope="module")
def trio(family):
    m = {name: eft_jax.load_model(family[name][0]) for name in ("large_base", "small_base", "small_ft")}
    return EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 1.5)


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.7), SamplingParams(top_p=0.8)], ids=["temperature", "top_p"])
def test_first_token_statistics(family, trio, sampling):
    """10^4 draws of one step (10^4 streams of one prompt) follow the distribution computed independently."""
    prompt = "Once upon a time"
    n = 10_000
    results = Engine(trio).generate([prompt] * n, sampling, max_new_tokens=1, batch_size=2500, seed=11, ids=range(n))
    draws = np.array([r.tokens[0] for r in results])

    ids = [render_tokens(c.model.tokenizer, prompt, c.prompt_format) for c in trio.components]
    lps = [next_token_logprobs(family[k][1], ids[i], TOKENIZER_SIZE)
           for i, k in enumerate(["large_base", "small_base", "small_ft"])]
    probs = filtered(eft_reference(lps[0], lps[1], [lps[2]], [1.5]), sampling.temperature, sampling.top_p)
    assert set(np.flatnonzero(np.bincount(draws, minlength=TOKENIZER_SIZE))) <= set(np.flatnonzero(probs))

    # Chi-square over categories with expected count >= 5, the rest pooled: an exact sampler fails with
    # probability ALPHA = 1e-4 (over the fixed seed 11).
    p_value = chi_square_pvalue(draws, probs)
    assert p_value > ALPHA, p_value


def test_sample_does_not_depend_on_batch_or_mesh(family, trio, family_logit_tol):
    prompt = "The same prompt"
    others = ["x", "a much longer prompt than the others in this batch", "hi", "abc", "zz top", "q", "hello"]
    sampling = SamplingParams(temperature=1.0, top_k=50)
    alone = Engine(trio).generate([prompt], sampling, max_new_tokens=12, seed=5, batch_size=1)[0]
    batched = Engine(trio).generate(others[:3] + [prompt] + others[3:], sampling, max_new_tokens=12, seed=5, batch_size=8)[3]
    assert batched.tokens == alone.tokens
    assert len(alone.tokens) > 3

    mesh = make_mesh(data=2, model=4)
    on_mesh = {name: eft_jax.load_model(family[name][0], mesh=mesh,
                                        sharding="tensor_parallel" if name == "large_base" else "replicated")
               for name in ("large_base", "small_base", "small_ft")}
    spec = EFTSpec.up_scaling(on_mesh["large_base"], on_mesh["small_base"], on_mesh["small_ft"], 1.5)
    sharded = Engine(spec).generate(others[:3] + [prompt] + others[3:], sampling, max_new_tokens=12, seed=5, batch_size=8)[3]
    assert sharded.tokens == alone.tokens
    # Only rounding differs on the mesh: each model's logits by family_logit_tol, propagated through the EFT
    # formula with w = 1.5 (tolerances.eft_logprob_tolerance: x16).
    tol = eft_logprob_tolerance(family_logit_tol, [1.5])
    np.testing.assert_allclose(sharded.token_logprobs, alone.token_logprobs, atol=tol, rtol=0)


def test_chunk_size_does_not_change_samples(trio):
    prompts = ["one", "two two", "three three three"]
    a = Engine(trio, chunk_size=1).generate(prompts, max_new_tokens=9, seed=2, batch_size=4)
    b = Engine(trio, chunk_size=16).generate(prompts, max_new_tokens=9, seed=2, batch_size=4)
    assert [r.tokens for r in a] == [r.tokens for r in b]


def test_stop_tokens_end_rows_independently(trio):
    engine = Engine(trio)
    free = engine.generate(["abc", "def"], max_new_tokens=10, seed=1)
    # Use each row's 4th sampled token as an extra stop id: that row stops there, "stop" reason.
    stop = free[0].tokens[3]
    stopped = engine.generate(["abc", "def"], max_new_tokens=10, seed=1, stop_token_ids=[stop])
    first = free[0].tokens.index(stop)
    assert stopped[0].tokens == free[0].tokens[: first + 1]
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].text == engine.tokenizer.decode(free[0].tokens[:first], skip_special_tokens=True)
    assert len(free[0].tokens) == 10


def test_per_prompt_max_new_tokens(trio):
    res = Engine(trio).generate(["a", "b", "c"], max_new_tokens=[1, 5, 17], seed=0)
    assert [len(r.tokens) for r in res] == [1, 5, 17]
    assert all(r.finish_reason == "length" for r in res)


def test_many_batches_compile_few_programs(trio):
    engine = Engine(trio, chunk_size=2)  # rows of uneven lengths finish in different chunks: refills
    prompts = [("word " * k).strip() for k in range(1, 13)]  # lengths 4..59 chars: buckets 16/32/64
    programs = (decode.start, decode.refill, decode.decode_chunk)
    before = [f._cache_size() for f in programs]
    engine.generate(prompts, max_new_tokens=[2 + 4 * (i % 3) for i in range(12)], batch_size=2, seed=0)
    start, refill, chunk = (f._cache_size() - b for f, b in zip(programs, before, strict=True))
    # However many batches run: one start program (prompts padded to the call's longest bucket);
    # refills of one row (2 slots: never more than twice a 1-row refill free, so no whole-batch refill),
    # each model's prompts in one of the buckets 16/32/64: the plain
    # and the chat format step up at different lengths, as prompts get shorter, so at most 3 + 3 - 1 = 5
    # combinations; chunks attending over a window of 16 or 32 slots (at most half of the cache) or over
    # the whole cache: at most 3 programs.
    assert start == 1 and 1 <= refill <= 5 and 1 <= chunk <= 3


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("k", [0, 3], ids=["eft", "speculative"])
def test_continuous_batching_gives_the_samples_of_static_batching_and_of_batch_size_1(
        family, trio, family_logit_tol, monkeypatch, k):
    """Uneven lengths, temperature > 0: a row refilled mid-run samples exactly what it would alone."""
    from eft_jax import speculative

    prompts = ["a", "bb bb", "the third prompt is the longest", "x", "yy", "zzz zzz zzz", "q", "last one"]
    limits = [3, 17, 5, 9, 1, 12, 7, 4]
    sampling = SamplingParams(temperature=1.0, top_p=0.9)
    engine = Engine(trio, speculative_k=k, chunk_size=4)

    def run(engine, **kwargs):
        return engine.generate(prompts, sampling, max_new_tokens=limits, seed=3, ids=range(8), **kwargs)

    chunks = _count_calls(monkeypatch, speculative if k else decode, "spec_chunk" if k else "decode_chunk")
    continuous = run(engine, batch_size=3)
    continuous_chunks = len(chunks)
    static = run(engine, batch_size=3, continuous=False)
    static_chunks = len(chunks) - continuous_chunks
    alone = run(engine, batch_size=1)
    assert [r.tokens for r in continuous] == [r.tokens for r in static] == [r.tokens for r in alone]
    assert [len(r.tokens) for r in alone] == limits  # random tiny models: no stop token within these limits
    assert continuous_chunks < static_chunks  # finished rows were refilled instead of idling

    mesh = make_mesh(data=2, model=4)
    on_mesh = {name: eft_jax.load_model(family[name][0], mesh=mesh,
                                        sharding="tensor_parallel" if name == "large_base" else "replicated")
               for name in ("large_base", "small_base", "small_ft")}
    spec = EFTSpec.up_scaling(on_mesh["large_base"], on_mesh["small_base"], on_mesh["small_ft"], 1.5)
    sharded = run(Engine(spec, speculative_k=k, chunk_size=4), batch_size=4)
    assert [r.tokens for r in sharded] == [r.tokens for r in alone]
    # Only rounding differs between batch shapes and on the mesh (see test_sample_does_not_depend_on_batch_or_mesh).
    tol = eft_logprob_tolerance(family_logit_tol, [1.5])
    for a, b, c in zip(continuous, alone, sharded, strict=True):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=tol, rtol=0)
        np.testing.assert_allclose(c.token_logprobs, b.token_logprobs, atol=tol, rtol=0)


def test_stream_yields_rows_as_they_finish_and_counts_tokens_per_chunk(trio):
    updates = list(Engine(trio, chunk_size=2).stream(["a", "b", "c"], max_new_tokens=[2, 8, 2], batch_size=3,
                                                     seed=0, ignore_eos=True))
    finished = [sorted(r.index for r in u.finished) for u in updates if u.finished]
    assert finished == [[0, 2], [1]]  # the short rows come back first
    # Progress after the prefill and after every chunk, finished or not: 3 tokens at the prefill, then
    # 2 steps per chunk for each live row (the chunk where rows 0 and 2 reach 2 tokens: 1 each, 2 for row 1).
    assert [u.tokens for u in updates] == [3, 4, 2, 2, 1]
    assert sum(u.tokens for u in updates) == 2 + 8 + 2


def test_a_chunk_stops_when_every_row_is_done(trio):
    """On CPU the decode loop exits once every row has stopped (``decode.run_steps``), and gives the
    samples of the fixed-length chunk."""
    import dataclasses

    import jax.numpy as jnp

    plan = decode.Plan(configs=(), vocab=2, n_ft=0, base_top_p=None, sampling=SamplingParams(), stop_ids=(),
                       pad_id=0, chunk=16)
    # A toy state: a step counter and rows that are done after 2 and 3 steps.
    step = lambda s: {"steps": s["steps"] + 1, "done": s["steps"] + 1 >= s["limit"], "limit": s["limit"]}  # noqa: E731
    state = {"steps": jnp.int32(0), "done": jnp.zeros(2, bool), "limit": jnp.array([2, 3])}
    for stop_early, steps in ((True, 3), (False, 16)):
        out = decode.run_steps(dataclasses.replace(plan, stop_early=stop_early), step, state, 16, lambda s: s["done"])
        assert int(out["steps"]) == steps

    engine = Engine(trio, chunk_size=16)
    assert engine.stop_early  # CPU
    short = engine.generate(["a", "b", "c"], max_new_tokens=[2, 5, 3], seed=1, batch_size=2)
    engine.stop_early = False
    fixed = engine.generate(["a", "b", "c"], max_new_tokens=[2, 5, 3], seed=1, batch_size=2)
    assert [r.tokens for r in short] == [r.tokens for r in fixed]


def test_bad_input(family, trio, tmp_path):
    engine = Engine(trio)
    with pytest.raises(PromptError, match="prompt 1: empty prompt"):
        engine.generate(["fine", "   "], max_new_tokens=4)
    with pytest.raises(PromptError, match="context is 256"):
        engine.generate(["x" * 300], max_new_tokens=4)
    with pytest.raises(PromptError, match="max_new_tokens must be positive"):
        engine.generate(["fine"], max_new_tokens=0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            SamplingParams(top_p=bad)

    # "report" keeps going: the bad prompts get an error, the good ones their samples.
    res = engine.generate(["fine", "", "x" * 300, "also fine"], max_new_tokens=4, on_error="report")
    assert [r.error is None for r in res] == [True, False, False, True]
    assert res[1].finish_reason == "error" and "empty" in res[1].error
    assert len(res[0].tokens) == 4 and len(res[3].tokens) == 4


def test_different_tokenizers_are_refused(family, trio, tmp_path):
    tok = tiny_tokenizer()
    vocab = tok.backend_tokenizer.get_vocab()
    # Same size, two byte tokens swapped: id 65 now means something else.
    path = tmp_path / "other"
    write_checkpoint(path, "gqa", seed=9)
    swapped = tok.backend_tokenizer.to_str().replace('"A":', '"__A__":').replace('"B":', '"A":').replace('"__A__":', '"B":')
    (path / "tokenizer.json").write_text(swapped)
    other = eft_jax.load_model(path)
    assert other.tokenizer.convert_ids_to_tokens(vocab["A"]) == "B"
    with pytest.raises(VocabMismatchError, match=f"token id {vocab['A']}"):
        Engine(EFTSpec.up_scaling(trio.base.model, trio.ref.model, other, 1.0))


def test_ignore_eos_decodes_to_the_limit(trio):
    engine = Engine(trio)
    prompts = [f"prompt {i}" for i in range(8)]
    # Find a run where some row stops at an end-of-sequence token.
    for seed in range(20):
        normal = engine.generate(prompts, max_new_tokens=40, seed=seed)
        stopped = [r for r in normal if r.finish_reason == "stop"]
        if stopped:
            break
    assert stopped, "no end-of-sequence token sampled in 20 seeds"
    free = engine.generate(prompts, max_new_tokens=40, seed=seed, ignore_eos=True)
    assert [len(r.tokens) for r in free] == [40] * 8 and all(r.finish_reason == "length" for r in free)
    row = free[stopped[0].index]
    # Same random streams: the row continues past its EOS instead of stopping there.
    assert row.tokens[: len(stopped[0].tokens)] == stopped[0].tokens
    assert stopped[0].tokens[-1] in engine.end_ids["all"]
    # Extra stop ids still stop a row.
    extra = engine.generate(prompts[:1], max_new_tokens=40, seed=seed, ignore_eos=True, stop_token_ids=[free[0].tokens[5]])
    assert len(extra[0].tokens) <= 6 and extra[0].finish_reason == "stop"
