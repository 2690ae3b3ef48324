"""Sampling filters and samplers against naive numpy references and sampling statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eft_jax.sampling import SamplingParams, final_logprobs, nucleus_mask, row_keys, sample
from tolerances import ALPHA, assert_within, chi_square_pvalue, float32_tolerance, probability_tolerance


# ----------------------------------------------------------------------------- naive numpy reference


def np_normalise(x: np.ndarray) -> np.ndarray:
    """log-softmax of one float64 row over its finite entries."""
    out = np.full_like(x, -np.inf)
    ok = np.isfinite(x)
    if ok.any():
        m = x[ok].max()
        out[ok] = x[ok] - m - np.log(np.exp(x[ok] - m).sum())
    return out


def np_final(logprobs: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Documented rule, one row at a time: temperature, top-k, top-p, min-p; ties at a threshold kept."""
    out = np.empty(logprobs.shape, np.float64)
    for r, row in enumerate(np.asarray(logprobs, np.float64)):
        row = np.where(np.isfinite(row), row, -np.inf)
        if temperature == 0:
            out[r] = -np.inf
            out[r, int(np.argmax(row))] = 0.0
            continue
        x = np_normalise(row / temperature)
        if top_k:
            kth = sorted(x, reverse=True)[min(top_k, len(x)) - 1]
            x = np_normalise(np.where(x >= kth, x, -np.inf))
        if top_p < 1.0:
            probs = np.exp(x)
            desc = sorted(probs, reverse=True)
            total, m = 0.0, 0
            while total < top_p and m < len(desc) and desc[m] > 0:
                total += desc[m]
                m += 1
            smallest_kept = desc[max(m, 1) - 1]
            x = np_normalise(np.where(probs >= smallest_kept, x, -np.inf))
        if min_p > 0.0:
            probs = np.exp(x)
            x = np_normalise(np.where(probs >= min_p * probs.max(), x, -np.inf))
        out[r] = x
    return out


def assert_same_distribution(got, want, logprobs, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Rounding bound: log p_v = x_v / T - log-normaliser, renormalised once per active filter; each
    log-softmax rounds sizes (|x_v| + max |x|) / T plus a V-term sum and adds the p-weighted mean of the
    errors before it: d log p_v <= float32_tolerance(S_v + sum_u p_u S_u, V, stages) and d p_v <= p_v
    (e^(d log p_v) - 1) (observed differences reach <= 1% of it; a temperature 1% off fails every case)."""
    got, want = np.asarray(got), np.asarray(want, np.float64)
    assert got.dtype == np.float32 and not np.isnan(got).any()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg="different supports")
    x = np.where(np.isfinite(logprobs), np.abs(np.asarray(logprobs, np.float64)), 0.0)
    size = (x + x.max(-1, keepdims=True)) / temperature
    p = np.exp(want)
    stages = 1 + (top_k > 0) + (top_p < 1.0) + (min_p > 0.0)
    lp_tol = float32_tolerance(size + (p * size).sum(-1, keepdims=True), want.shape[-1], depth=stages)
    assert_within(np.exp(got.astype(np.float64)), p, probability_tolerance(want, lp_tol), "probabilities")


@pytest.fixture(scope="module")
def logprobs():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 50)) * 2.5).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = -np.inf
    x[:, 7] = 0.5
    x[3] = np.round(x[3])  # many exact ties
    x[4, :5] = 4.0  # a 5-way tie at the top
    return x


final_jit = jax.jit(final_logprobs, static_argnums=1)
sample_jit = jax.jit(sample)
keys_jit = jax.jit(row_keys)

CASES = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.6),
    dict(top_k=1),
    dict(top_k=3),
    dict(top_k=10),
    dict(top_k=1000),
    dict(top_p=0.3),
    dict(top_p=0.8),
    dict(top_p=0.95),
    dict(min_p=0.05),
    dict(min_p=0.3),
    dict(temperature=0.7, top_k=10, top_p=0.8),
    dict(temperature=1.3, top_p=0.9, min_p=0.02),
    dict(temperature=0.5, top_k=20, top_p=0.9, min_p=0.1),
    dict(top_k=2, top_p=0.99),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_final_logprobs_matches_reference(logprobs, case):
    got = final_jit(logprobs, SamplingParams(**case))
    assert_same_distribution(got, np_final(logprobs, **case), logprobs, **case)


def test_tie_rules():
    x = np.stack([np.log(np.array([0.4, 0.15, 0.15, 0.15, 0.15])), [3, 1, 1, 1, 0]]).astype(np.float32)
    # top-k keeps every id tied with the k-th value
    got = np.asarray(final_jit(x, SamplingParams(top_k=2)))
    np.testing.assert_array_equal(np.isfinite(got), [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    # top-p: 0.4 + 0.15 reaches 0.5, and the other ids tied at 0.15 are kept as well
    got = np.asarray(final_jit(x[:1], SamplingParams(top_p=0.5)))
    np.testing.assert_array_equal(np.isfinite(got), [[1, 1, 1, 1, 1]])
    # top-k then top-p: the nucleus of the top-k distribution extends into the ties beyond k
    got = np.asarray(final_jit(x[1:], SamplingParams(top_k=2, top_p=0.99)))
    np.testing.assert_array_equal(np.isfinite(got), [[1, 1, 1, 1, 0]])
    assert_same_distribution(got, np_final(x[1:], top_k=2, top_p=0.99), x[1:], top_k=2, top_p=0.99)
    # the nucleus always holds at least the argmax
    got = np.asarray(nucleus_mask(jnp.array([[9.0, 0.0, 0.0]]), 0.01))
    np.testing.assert_array_equal(got, [[True, False, False]])


def test_greedy_is_one_hot_argmax(logprobs):
    params = SamplingParams(temperature=0.0, top_k=5, top_p=0.5)
    assert params.greedy and not SamplingParams().greedy
    got = np.asarray(final_jit(logprobs, params))
    best = np.argmax(logprobs, axis=-1)
    assert best[4] == 0  # ties resolve to the lowest id
    want = np.full(logprobs.shape, -np.inf)
    want[np.arange(len(best)), best] = 0.0
    np.testing.assert_array_equal(got, want)
    for seed in range(3):
        keys = keys_jit(seed, jnp.arange(logprobs.shape[0]), jnp.zeros(logprobs.shape[0], jnp.int32))
        np.testing.assert_array_equal(np.asarray(sample_jit(got, keys)), best)


def test_all_masked_row_gives_no_nan():
    x = np.full((2, 6), -np.inf, np.float32)
    x[1, 2] = 1.0
    for params in (SamplingParams(), SamplingParams(top_k=2, top_p=0.5, min_p=0.1, temperature=0.5)):
        got = np.asarray(final_jit(x, params))
        assert not np.isnan(got).any()
        assert np.isneginf(got[0]).all() and got[1, 2] == 0.0


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7), SamplingParams(top_p=0.8)], ids=["t0.7", "p0.8"])
def test_sample_chi_square(logprobs, params):
    n = 10_000
    row = logprobs[1]
    dist = np.asarray(final_jit(row[None], params))[0]
    keys = keys_jit(1234, jnp.arange(n), jnp.full((n,), 5))
    draws = np.asarray(sample_jit(jnp.broadcast_to(dist, (n, dist.shape[0])), keys))
    probs = np.exp(dist.astype(np.float64))
    # An exact sampler fails with probability ALPHA = 1e-4 (over the fixed seed 1234).
    assert chi_square_pvalue(draws, probs) > ALPHA


def test_per_row_independence(logprobs):
    rng = np.random.default_rng(3)
    batch = np.concatenate([logprobs, logprobs[:3] + rng.standard_normal((3, logprobs.shape[1])).astype(np.float32)])
    dist = final_jit(batch, SamplingParams(temperature=1.2))
    pids = jnp.arange(100, 100 + batch.shape[0])
    pos = jnp.arange(batch.shape[0]) * 3
    keys = keys_jit(7, pids, pos)
    together = np.asarray(sample_jit(dist, keys))
    perm = rng.permutation(batch.shape[0])
    permuted = np.asarray(sample_jit(dist[perm], keys_jit(7, pids[perm], pos[perm])))
    np.testing.assert_array_equal(permuted, together[perm])
    for i in range(batch.shape[0]):
        alone_key = keys_jit(7, pids[i : i + 1], pos[i : i + 1])
        np.testing.assert_array_equal(
            np.asarray(jax.random.key_data(alone_key))[0], np.asarray(jax.random.key_data(keys))[i]
        )
        assert int(sample_jit(dist[i : i + 1], alone_key)[0]) == together[i]
    # unjitted, single row: same draw
    assert int(sample(dist[2:3], row_keys(7, pids[2:3], pos[2:3]))[0]) == together[2]
    # different positions / prompts / seeds give different keys
    kd = np.asarray(jax.random.key_data(keys))
    assert len({tuple(k) for k in kd}) == batch.shape[0]
    other = np.asarray(jax.random.key_data(keys_jit(8, pids, pos)))
    assert not (other == kd).all(axis=-1).any()


def test_row_keys_jittable():
    f = jax.jit(row_keys)
    a = f(3, jnp.arange(4), jnp.arange(4))
    b = row_keys(3, jnp.arange(4), jnp.arange(4))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(a)), np.asarray(jax.random.key_data(b)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(min_p=1.0), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
    ],
)
def test_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**kwargs)


def test_params_hashable_and_normalised():
    assert SamplingParams(temperature=1, top_p=1) == SamplingParams()
    assert hash(SamplingParams(top_k=np.int64(3))) == hash(SamplingParams(top_k=3))


def test_inverse_cdf_sampler_across_block_edges():
    """Support spread over block boundaries and the ragged last block (vocab not a multiple of 256)."""
    vocab = 700
    support = np.array([0, 255, 256, 511, 512, 699])
    logits = np.full(vocab, -np.inf, np.float32)
    logits[support] = np.log(np.array([0.05, 0.3, 0.1, 0.2, 0.15, 0.2], np.float32))
    n = 20_000
    keys = row_keys(7, jnp.arange(n), jnp.zeros(n, jnp.int32))
    draws = np.asarray(sample(jnp.broadcast_to(jnp.asarray(logits), (n, vocab)), keys))
    assert set(np.unique(draws)) <= set(support.tolist())
    # An exact sampler fails with probability ALPHA = 1e-4 (over the fixed seed 7).
    assert chi_square_pvalue(draws, np.exp(logits.astype(np.float64))) > ALPHA
    # A single valid id in the last (ragged) block is always drawn.
    only_last = np.full((4, vocab), -np.inf, np.float32)
    only_last[:, -1] = 0.0
    assert np.asarray(sample(jnp.asarray(only_last), keys[:4])).tolist() == [vocab - 1] * 4
