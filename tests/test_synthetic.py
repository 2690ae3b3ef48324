"""Related random families for benchmarks: the large model must contain the small one exactly."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from eft_jax import synthetic
from eft_jax.eft import eft_logprobs
from eft_jax.engine import Engine
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.models.kv_cache import KVCache
from eft_jax.sampling import SamplingParams, safe_log_softmax
from eft_jax.spec import Component, EFTSpec
from tolerances import ALPHA, float32_tolerance, logits_tolerance, z_bound

SMALL = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
LARGE = dict(hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8)


@pytest.mark.parametrize("variant", [dict(), dict(qkv_bias=True, tie_word_embeddings=True)])
def test_contained_model_computes_the_small_models_logits(variant):
    small_cfg = LlamaConfig(vocab_size=50, max_position_embeddings=64, rms_norm_eps=1e-3, **SMALL, **variant)
    # Random norm scales and biases too, so a wrong corner or scale could not hide behind ones/zeros.
    params = synthetic.perturbed(small_cfg, llama.init_params(small_cfg, jax.random.key(1)), jax.random.key(2), 0.5)
    large_cfg = synthetic.containing_config(small_cfg, **LARGE)
    large = synthetic.contain(small_cfg, params, large_cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    want, _ = llama.forward(small_cfg, params, tokens, positions)
    got, _ = llama.forward(large_cfg, large, tokens, positions)
    assert large_cfg.num_params > 3 * small_cfg.num_params
    # Only rounding differs (the large model sums over 64/96 terms where the small one sums 32/48, with
    # zeros, and its norm scales carry a rounded sqrt(1/2)): float32 eps x max |logit| x sqrt(longest
    # reduction 96 x 3 layers) x LAMBDA = 8: 8e-5 / 6e-4 for the two variants (max |logit| 5 / 38;
    # observed <= 4e-5). Broken containment, measured: rms_norm_eps not rescaled 7e-3 / 4e-2, norm scales
    # 1% off 0.16 / 0.87, the sqrt(small / large) factor missing 6 / 41.
    tol = logits_tolerance(want, hidden=LARGE["hidden_size"], intermediate=LARGE["intermediate_size"],
                           layers=LARGE["num_layers"], seq=tokens.shape[1])
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    # Incremental decoding through the cache as well.
    cache = KVCache.zeros(num_layers=large_cfg.num_layers, batch=2, slots=16, num_kv_heads=large_cfg.num_kv_heads,
                          head_dim=large_cfg.head_dim, dtype=jnp.float32)
    _, cache = llama.forward(large_cfg, large, tokens[:, :8], positions[:, :8], cache)
    step, _ = llama.forward(large_cfg, large, tokens[:, 8:], positions[:, 8:], cache)
    np.testing.assert_allclose(step, want[:, 8:], atol=tol, rtol=0)  # the same bound


def test_noise_moves_the_large_model_away():
    small_cfg = LlamaConfig(vocab_size=50, max_position_embeddings=64, **SMALL)
    params = llama.init_params(small_cfg, jax.random.key(1))
    large_cfg = synthetic.containing_config(small_cfg, **LARGE)
    tokens = jnp.arange(10, dtype=jnp.int32)[None]
    want, _ = llama.forward(small_cfg, params, tokens, tokens)
    diffs = []
    for noise in (0.01, 0.1, 1.0):
        noisy = synthetic.perturbed(large_cfg, synthetic.contain(small_cfg, params, large_cfg), jax.random.key(3), noise)
        got, _ = llama.forward(large_cfg, noisy, tokens, tokens)
        diffs.append(float(jnp.abs(got - want).max()))
    # The smallest noise already moves the logits by more than rounding could (the bound of the test above).
    tol = logits_tolerance(want, hidden=LARGE["hidden_size"], intermediate=LARGE["intermediate_size"],
                           layers=LARGE["num_layers"], seq=tokens.shape[1])
    assert tol < diffs[0] < diffs[1] < diffs[2], (tol, diffs)


def test_containing_config_refuses_what_it_cannot_contain():
    small_cfg = LlamaConfig(vocab_size=50, **SMALL)
    with pytest.raises(ValueError, match="num_layers"):
        synthetic.containing_config(small_cfg, **{**LARGE, "num_layers": 1})
    with pytest.raises(ValueError, match="query heads per key/value head"):
        synthetic.containing_config(small_cfg, **{**LARGE, "num_kv_heads": 8})
    with pytest.raises(ValueError, match="head_dim"):
        synthetic.containing_config(small_cfg, **{**LARGE, "head_dim": 16})


def test_family_acceptance_is_controlled_by_noise_and_measured_by_speculation():
    vocab = 300
    exact = synthetic.make_family(LARGE, SMALL, vocab=vocab, noise=0.0)
    probe = jnp.asarray(np.random.default_rng(0).integers(3, vocab, (1, 16)), jnp.int32)
    # noise 0: EFT up-scaling with w = 1 is exactly the small fine-tune, the drafter, up to rounding: the
    # large and small logits differ by <= tol, so log p_large - log p_ref by 2 tol and the renormalised EFT
    # log-probs by 4 tol; 1 - acceptance = total variation <= half of that, plus float32 rounding of
    # sum_v min(p_v, q_v) over the vocabulary.
    big = _logits(exact.large_cfg, exact.large_base, probe)
    tol = logits_tolerance(big, hidden=LARGE["hidden_size"], intermediate=LARGE["intermediate_size"],
                           layers=LARGE["num_layers"], seq=probe.shape[1])
    slack = 2 * tol + float32_tolerance(1.0, vocab)
    assert synthetic.expected_acceptance(exact, probe) > 1 - slack
    noisy = [synthetic.expected_acceptance(synthetic.make_family(LARGE, SMALL, vocab=vocab, noise=n), probe)
             for n in (0.05, 0.3)]
    assert 1 - slack > noisy[0] > noisy[1]

    # The engine's speculative acceptance follows: every draft accepted at noise 0.
    large, base, ft = synthetic.family_models(exact)
    spec = EFTSpec.up_scaling(Component(large, "plain"), Component(base, "plain"), Component(ft, "plain"))
    prompts = [" ".join(f"t{i}" for i in range(5, 25))]
    # 16 tokens = the prefill's token + 3 full rounds of k + 1 = 5: no round is cut by max_new_tokens.
    res = Engine(spec, speculative_k=4).generate(prompts, SamplingParams(), max_new_tokens=16, ignore_eos=True)
    stats = res[0].speculative
    assert stats.drafted > 0 and stats.accepted == stats.drafted and stats.rejected == 0


def test_calibrated_family_hits_the_target_acceptance():
    """The calibrated acceptance carries over to fresh probe sequences, up to their sampling error."""
    family = synthetic.make_family(LARGE, SMALL, vocab=300, target_acceptance=0.8)
    assert family.noise > 0
    # calibrate_noise bisects on drafter_probe(seed=0) (4 sequences); measure 16 fresh ones (seed 7).
    calibration = synthetic.drafter_probe(family.small_cfg, family.small_ft)
    other = synthetic.drafter_probe(family.small_cfg, family.small_ft, batch=16, seed=7)
    at_calibration = synthetic.expected_acceptance(family, calibration)
    # 10 bisection halvings of log noise over [1e-4, 4] leave a bracket of width h; acceptance falls with
    # noise, so on the calibration probe it is within acceptance(noise e^-h) - acceptance(noise e^h) of 0.8.
    h = math.log(4 / 1e-4) / 2**10
    ends = [synthetic.expected_acceptance(synthetic.make_family(LARGE, SMALL, vocab=300, noise=family.noise * math.exp(e)),
                                          calibration) for e in (-h, h)]
    assert abs(at_calibration - 0.8) <= ends[0] - ends[1], (at_calibration, ends)
    per_sequence = np.array([synthetic.expected_acceptance(family, other[i : i + 1]) for i in range(len(other))])
    # Sequences are independent draws: the two probe means differ by sd * sqrt(1/16 + 1/4) * t, where t is
    # Student's t with 15 degrees of freedom; exceeded with probability ALPHA = 1e-4 (seeds fixed).
    t = stats.t.isf(ALPHA / 2, df=len(other) - 1)
    bound = t * per_sequence.std(ddof=1) * np.sqrt(1 / len(other) + 1 / len(calibration))
    print(f"calibration {at_calibration:.4f} (bracket {ends}), fresh probe {per_sequence.mean():.4f}, bound {bound:.4f}")
    assert abs(per_sequence.mean() - at_calibration) < bound, (per_sequence.mean(), at_calibration, bound)
    assert per_sequence.mean() == pytest.approx(synthetic.expected_acceptance(family, other), abs=1e-6)


def test_speculative_acceptance_matches_the_exact_acceptance_probability():
    """The engine's acceptance rate (accepted / tested drafts) against sum_v min(p_v, q_v) computed from the
    three models' full-sequence logits on the very sequences it generated (an independent count)."""
    family = synthetic.make_family(LARGE, SMALL, vocab=300, target_acceptance=0.8)
    spec = EFTSpec.up_scaling(*(Component(m, "plain") for m in synthetic.family_models(family)))
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 300, 8)] for _ in range(16)]
    res = Engine(spec, speculative_k=4).generate([" ".join(f"t{t}" for t in p) for p in prompts], SamplingParams(),
                                                 max_new_tokens=48, ignore_eos=True, batch_size=16)
    sequences = jnp.asarray([p + r.tokens for p, r in zip(prompts, res)], jnp.int32)
    # a[b, t]: the chance that a draft for the token after position t is accepted. Position 7 (the last
    # prompt token) predicts output token 0; the last token predicts nothing.
    a = _acceptance_per_position(family, sequences[:, :-1])[:, 7:]
    assert a.mean() == pytest.approx(synthetic.expected_acceptance(family, sequences[:, :-1], start=7), abs=1e-6)
    # The drafts that were tested: every accepted one, and each corrected token emitted after fewer than
    # k drafts of its round (the rejections); not the first token (prefill) nor a round's bonus token.
    accepted = rejected = 0
    chances = []
    for b, r in enumerate(res):
        s = r.speculative
        for i, (draft, rnd) in enumerate(zip(s.from_draft, s.round_of)):
            in_round = [f for f, ro in zip(s.from_draft, s.round_of) if ro == rnd]
            if draft or (rnd > 0 and sum(in_round) < 4):
                chances.append(float(a[b, i]))
                accepted, rejected = accepted + draft, rejected + (not draft)
    assert (accepted, rejected) == (sum(r.speculative.accepted for r in res), sum(r.speculative.rejected for r in res))
    chances = np.array(chances)
    assert len(chances) > 400
    # Each tested draft is accepted with probability a given everything before it, so accepted - sum(a)
    # is a martingale with variance sum a (1 - a): a two-sided z-test, failing with probability ALPHA.
    z = (accepted - chances.sum()) / np.sqrt(np.sum(chances * (1 - chances)))
    print(f"acceptance z-score {z:.2f} over {len(chances)} tested drafts")
    assert abs(z) < z_bound(ALPHA), (z, accepted, chances.sum())


def _logits(cfg, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return llama.forward(cfg, params, tokens, positions)[0][..., : cfg.vocab_size]


def _acceptance_per_position(family, tokens) -> np.ndarray:
    """sum_v min(p_v, q_v) after every position: p = EFT up-scaling (w = 1), q = the drafter small_ft."""
    big, ref, ft = (_logits(family.large_cfg, family.large_base, tokens),
                    _logits(family.small_cfg, family.small_base, tokens), _logits(family.small_cfg, family.small_ft, tokens))
    flat = [x.reshape(-1, x.shape[-1]) for x in (big, ref, ft)]
    p = jnp.exp(eft_logprobs(flat[0], flat[1], flat[2][None], jnp.ones((1,), jnp.float32)))
    q = jnp.exp(safe_log_softmax(flat[2]))
    return np.asarray(jnp.minimum(p, q).sum(-1)).reshape(tokens.shape)
