"""Related random families for benchmarks: the large model must contain the small one exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eft_jax import synthetic
from eft_jax.engine import Engine
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.models.kv_cache import KVCache
from eft_jax.sampling import SamplingParams
from eft_jax.spec import Component, EFTSpec

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
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # Incremental decoding through the cache as well.
    cache = KVCache.zeros(num_layers=large_cfg.num_layers, batch=2, slots=16, num_kv_heads=large_cfg.num_kv_heads,
                          head_dim=large_cfg.head_dim, dtype=jnp.float32)
    _, cache = llama.forward(large_cfg, large, tokens[:, :8], positions[:, :8], cache)
    step, _ = llama.forward(large_cfg, large, tokens[:, 8:], positions[:, 8:], cache)
    np.testing.assert_allclose(step, want[:, 8:], atol=2e-5, rtol=1e-5)


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
    assert 0 < diffs[0] < diffs[1] < diffs[2]


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
    # noise 0: EFT up-scaling with w = 1 is exactly the small fine-tune, the drafter.
    assert synthetic.expected_acceptance(exact, probe) > 0.999
    noisy = [synthetic.expected_acceptance(synthetic.make_family(LARGE, SMALL, vocab=vocab, noise=n), probe)
             for n in (0.05, 0.3)]
    assert 0.999 > noisy[0] > noisy[1]

    # The engine's speculative acceptance follows: every draft accepted at noise 0.
    large, base, ft = synthetic.family_models(exact)
    spec = EFTSpec.up_scaling(Component(large, "plain"), Component(base, "plain"), Component(ft, "plain"))
    prompts = [" ".join(f"t{i}" for i in range(5, 25))]
    # 16 tokens = the prefill's token + 3 full rounds of k + 1 = 5: no round is cut by max_new_tokens.
    res = Engine(spec, speculative_k=4).generate(prompts, SamplingParams(), max_new_tokens=16, ignore_eos=True)
    stats = res[0].speculative
    assert stats.drafted > 0 and stats.accepted == stats.drafted and stats.rejected == 0


def test_calibrated_family_hits_the_target_acceptance():
    family = synthetic.make_family(LARGE, SMALL, vocab=300, target_acceptance=0.8)
    other_probe = synthetic.drafter_probe(family.small_cfg, family.small_ft, seed=7)
    assert family.noise > 0
    assert abs(synthetic.expected_acceptance(family, other_probe) - 0.8) < 0.05


def test_speculative_acceptance_matches_the_exact_acceptance_probability():
    """The engine's acceptance rate (accepted / tested drafts) against sum_v min(p_v, q_v) computed from the
    three models' full-sequence logits on the very sequences it generated (an independent count)."""
    family = synthetic.make_family(LARGE, SMALL, vocab=300, target_acceptance=0.8)
    spec = EFTSpec.up_scaling(*(Component(m, "plain") for m in synthetic.family_models(family)))
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 300, 8)] for _ in range(16)]
    res = Engine(spec, speculative_k=4).generate([" ".join(f"t{t}" for t in p) for p in prompts], SamplingParams(),
                                                 max_new_tokens=48, ignore_eos=True, batch_size=16)
    accepted = sum(r.speculative.accepted for r in res)
    tested = accepted + sum(r.speculative.rejected for r in res)
    assert tested > 400  # the standard error of the rate is then below 0.02
    sequences = jnp.asarray([p + r.tokens for p, r in zip(prompts, res)], jnp.int32)
    # Position 7 (the last prompt token) predicts output token 0; the last token predicts nothing.
    exact = synthetic.expected_acceptance(family, sequences[:, :-1], start=7)
    assert abs(accepted / tested - exact) < 0.05
