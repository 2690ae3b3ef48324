"""EFT combination rule against an independent float64 numpy implementation of the formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eft_jax.eft import component_logprobs, eft_logprobs, gather_logprobs, implicit_rewards
from tolerances import assert_within, float32_tolerance, probability_tolerance

B, V = 5, 40


# ----------------------------------------------------------------------------- numpy reference


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 over finite entries; -inf elsewhere."""
    x = np.asarray(x, np.float64)
    out = np.full_like(x, -np.inf)
    for r in range(x.shape[0]):
        ok = np.isfinite(x[r])
        if not ok.any():
            continue
        v = x[r, ok]
        m = v.max()
        out[r, ok] = v - m - np.log(np.sum(np.exp(v - m)))
    return out


def np_nucleus(logprobs: np.ndarray, p: float) -> np.ndarray:
    """Smallest set of most likely ids with mass >= p; every id tied with its least likely member kept."""
    keep = np.zeros(logprobs.shape, bool)
    for r in range(logprobs.shape[0]):
        probs = np.exp(logprobs[r])
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        m = int(np.searchsorted(cum >= p, True)) + 1 if (cum >= p).any() else int(np.sum(probs > 0))
        m = max(1, min(m, int(np.sum(probs > 0))))
        threshold = probs[order[m - 1]]
        keep[r] = (probs >= threshold) & (probs > 0)
    return keep


def np_eft(base, ref=None, fts=None, weights=None, base_top_p=None) -> np.ndarray:
    """log p_base + sum_i w_i (log p_ft_i - log p_ref), renormalised, from normalised log-probs."""
    base_lp = np_log_softmax(base)
    allowed = np.isfinite(base_lp)
    if base_top_p is not None:
        allowed &= np_nucleus(base_lp, base_top_p)
    score = np.where(allowed, base_lp, -np.inf)
    if fts is not None:
        ref_lp = np_log_softmax(ref)
        for ft, w in zip(fts, weights, strict=True):
            ft_lp = np_log_softmax(ft)
            for r in range(score.shape[0]):
                for v in range(score.shape[1]):
                    if not np.isfinite(score[r, v]) or w == 0:
                        continue
                    if np.isfinite(ft_lp[r, v]) and np.isfinite(ref_lp[r, v]):
                        score[r, v] += w * (ft_lp[r, v] - ref_lp[r, v])
                    else:
                        score[r, v] = -np.inf
        # documented fallback: a row whose every base-allowed id is excluded by reward masks
        for r in range(score.shape[0]):
            if not np.isfinite(score[r]).any():
                score[r] = np.where(allowed[r], base_lp[r], -np.inf)
    return np_log_softmax(score)


# ----------------------------------------------------------------------------- helpers


def random_logits(rng: np.random.Generator, shape, scale=3.0, mask_frac=0.1) -> np.ndarray:
    x = (rng.standard_normal(shape) * scale + rng.standard_normal(shape[:-1] + (1,)) * 5).astype(np.float32)
    x[rng.random(shape) < mask_frac] = -np.inf
    x[..., 0] = np.where(np.isfinite(x[..., 0]), x[..., 0], 1.0)  # at least one finite id per row
    return x


# ----------------------------------------------------------------------------- rounding bounds
# float32 log_softmax(x)_v = (x_v - max x) - log sum exp(x - max x) rounds quantities of size |x_v| + max |x|
# and a V-term sum; the EFT score adds base, w_i ft_i and -(sum w_i) ref, each of its own size; the final
# log-softmax adds the p-weighted mean of the score's errors. So d log p_v <= float32_tolerance(T_v +
# sum_u p_u T_u, V, 2 log-softmax stages) with T_v the summed sizes, and d p_v <= p_v (e^(d log p_v) - 1).
# (Observed differences reach <= 1.3% of it; weights 1% off, bf16-rounded logits or an output shifted by
# 1e-3 all fail, as they did against the former fixed 1e-5.)


def _size(x) -> np.ndarray:
    """|x_v| + max_u |x_u| over the finite entries of each row (0 elsewhere)."""
    a = np.where(np.isfinite(x), np.abs(np.asarray(x, np.float64)), 0.0)
    return a + a.max(-1, keepdims=True)


def eft_scale(base, ref=None, fts=None, weights=None) -> np.ndarray:
    """T_v: the summed sizes of what the float32 EFT computation of id v rounds (see above)."""
    t = _size(base)
    if fts is not None:
        w = np.ones(len(fts)) if weights is None else np.asarray(weights, np.float64)
        w = w.reshape(w.shape + (1,) * (np.ndim(base) + 1 - w.ndim))  # [n] or [n, batch] -> [n, batch, 1]
        t = t + (np.abs(w) * _size(fts)).sum(0) + np.abs(w.sum(0)) * _size(ref)
    return t


def logprob_tolerance(want, scale) -> np.ndarray:
    p = np.exp(np.where(np.isfinite(want), want, -np.inf))
    return float32_tolerance(scale + (p * scale).sum(-1, keepdims=True), want.shape[-1], depth=2)


def assert_same_distribution(got, want, scale):
    got, want = np.asarray(got), np.asarray(want, np.float64)
    assert got.dtype == np.float32
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg="different supports")
    p = np.exp(np.where(np.isfinite(want), want, -np.inf))
    prob_tol = probability_tolerance(want, logprob_tolerance(want, scale))
    assert_within(np.exp(got.astype(np.float64)), p, prob_tol, "probabilities")
    # and the float32 probabilities sum to one: their errors plus the float32 rounding of a V-term sum
    assert_within(np.exp(got).sum(-1), 1.0, prob_tol.sum(-1) + float32_tolerance(1.0, got.shape[-1]), "sum")


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    base = random_logits(rng, (B, V))
    ref = random_logits(rng, (B, V))
    fts = random_logits(rng, (3, B, V))
    return base, ref, fts


eft_jit = jax.jit(eft_logprobs, static_argnames="base_top_p")


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 2.0])
def test_upscaling_single_finetune(logits, w):
    base, ref, fts = logits
    weights = np.array([w], np.float32)
    got = eft_jit(base, ref, fts[:1], weights)
    assert_same_distribution(got, np_eft(base, ref, fts[:1], weights), eft_scale(base, ref, fts[:1], weights))


def test_weight_zero_is_base(logits):
    base, ref, fts = logits
    got = eft_jit(base, ref, fts[:2], jnp.zeros(2))
    assert_same_distribution(got, np_log_softmax(base), eft_scale(base))


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_two_finetunes_lambda_mix(logits, lam):
    base, ref, fts = logits
    weights = np.array([lam, 1.0 - lam], np.float32)
    got = eft_jit(base, ref, fts[:2], weights)
    assert_same_distribution(got, np_eft(base, ref, fts[:2], weights), eft_scale(base, ref, fts[:2], weights))


def test_three_finetunes_default_weights(logits):
    base, ref, fts = logits
    got = eft_jit(base, ref, fts, None)
    assert_same_distribution(got, np_eft(base, ref, fts, np.ones(3)), eft_scale(base, ref, fts))


def test_per_row_weights(logits):
    base, ref, fts = logits
    w = np.linspace(0.0, 2.0, B, dtype=np.float32)[None]  # [1, batch]: a w sweep in one batch
    got = eft_jit(base, ref, fts[:1], w)
    for r in range(B):
        want = np_eft(base[r : r + 1], ref[r : r + 1], fts[:1, r : r + 1], [w[0, r]])
        assert_same_distribution(got[r : r + 1], want, eft_scale(base[r : r + 1], ref[r : r + 1], fts[:1, r : r + 1], [w[0, r]]))


@pytest.mark.parametrize("p", [0.3, 0.9])
@pytest.mark.parametrize("w", [1.0, 2.0])
def test_conservative_base_top_p(logits, p, w):
    base, ref, fts = logits
    weights = np.array([w], np.float32)
    got = eft_jit(base, ref, fts[:1], weights, base_top_p=p)
    want = np_eft(base, ref, fts[:1], weights, base_top_p=p)
    assert_same_distribution(got, want, eft_scale(base, ref, fts[:1], weights))
    # nothing outside the base's own nucleus
    assert not (np.isfinite(np.asarray(got)) & ~np_nucleus(np_log_softmax(base), p)).any()


def test_base_top_p_keeps_ties_and_argmax():
    base = np.array([[2.0, 1.0, 1.0, 1.0, -1.0], [5.0, -5.0, -5.0, -5.0, -5.0]], np.float32)
    got = np.asarray(eft_jit(base, None, None, None, base_top_p=0.5))
    # row 0: argmax has ~0.47 < 0.5, the nucleus needs a 1.0 and keeps all three tied at it
    np.testing.assert_array_equal(np.isfinite(got), [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    assert_same_distribution(got, np_eft(base, base_top_p=0.5), eft_scale(base))


def test_identity_ft_equals_ref_gives_base(logits):
    base, ref, _ = logits
    got = eft_jit(base, ref, np.stack([ref, ref]), jnp.array([1.5, -0.7]))
    assert_same_distribution(got, np_log_softmax(np.where(np.isfinite(ref), base, -np.inf)),
                             eft_scale(base, ref, np.stack([ref, ref]), [1.5, -0.7]))
    # with a fully finite reference this is exactly the base distribution
    ref_full = np.where(np.isfinite(ref), ref, 0.0).astype(np.float32)
    got = eft_jit(base, ref_full, ref_full[None], jnp.array([2.0]))
    assert_same_distribution(got, np_log_softmax(base), eft_scale(base, ref_full, ref_full[None], [2.0]))


def test_identity_base_equals_ref_gives_ft(logits):
    base, _, fts = logits
    got = eft_jit(base, base, fts[:1], jnp.array([1.0]))
    assert_same_distribution(got, np_log_softmax(np.where(np.isfinite(base), fts[0], -np.inf)),
                             eft_scale(base, base, fts[:1], [1.0]))


def test_plain_decoding(logits):
    base, _, _ = logits
    assert_same_distribution(eft_logprobs(base, None, None, None), np_log_softmax(base), eft_scale(base))


def test_shift_invariance_raw_logits(logits):
    """Raw logits and log-probs give the same result (per-row constants cancel)."""
    base, ref, fts = logits
    shift = np.arange(B, dtype=np.float32)[:, None] * 7.0
    w = jnp.array([0.5, 1.5])
    a = eft_jit(base, ref, fts[:2], w)
    b = eft_jit(base + shift, ref - shift, fts[:2] + shift[None] * 3, w)
    # both sides round: the bound of each, the shifted one's at its larger logits
    scale = eft_scale(base, ref, fts[:2], w) + eft_scale(base + shift, ref - shift, fts[:2] + shift[None] * 3, w)
    assert_same_distribution(b, np.asarray(a, np.float64), scale)


def test_no_nan_with_masks_and_empty_rows():
    base = np.array([[0.0, -np.inf, 1.0, 2.0], [0.0, 1.0, -np.inf, -np.inf], [-np.inf] * 4], np.float32)
    ref = np.array([[-np.inf, -np.inf, 0.0, 0.0], [0.0, 0.0, -np.inf, 0.0], [0.0] * 4], np.float32)
    ft = np.array([[[-np.inf, 0.0, -np.inf, 1.0], [-np.inf, -np.inf, 0.0, 0.0], [0.0] * 4]], np.float32)
    for w in (0.0, 1.0, -1.0):
        out = np.asarray(eft_jit(base, ref, ft, jnp.array([w])))
        assert not np.isnan(out).any()
        assert np.isneginf(out[2]).all()  # nothing allowed by the base
    out = np.asarray(eft_jit(base, ref, ft, jnp.array([1.0])))
    # row 0: only id 3 is finite in base, ref and ft
    np.testing.assert_array_equal(np.isfinite(out[0]), [0, 0, 0, 1])
    # row 1: every base-allowed id is excluded by the reward masks -> fall back to the base
    assert_same_distribution(out[1:2], np_log_softmax(base[1:2]), eft_scale(base[1:2], ref[1:2], ft[:, 1:2], [1.0]))
    # w = 0 ignores the fine-tune's masks entirely
    assert_same_distribution(eft_jit(base, ref, ft, jnp.array([0.0]))[:2], np_log_softmax(base[:2]), eft_scale(base[:2]))


def test_weight_sweep_does_not_recompile(logits):
    base, ref, fts = logits
    traces = []

    def traced(*args):
        traces.append(1)
        return eft_logprobs(*args)

    f = jax.jit(traced)
    for w in (0.0, 0.5, 1.0, 2.0):
        f(base, ref, fts[:2], jnp.array([w, 1.0 - w], jnp.float32)).block_until_ready()
    assert len(traces) == 1


def test_implicit_rewards_and_components(logits):
    base, ref, fts = logits
    r = np.asarray(jax.jit(implicit_rewards)(fts, ref))
    assert r.shape == (3, B, V) and not np.isnan(r).any()
    ref_lp, ft_lp = np_log_softmax(ref), np.stack([np_log_softmax(f) for f in fts])
    both = np.isfinite(ft_lp) & np.isfinite(ref_lp)[None]
    # each log-softmax rounds sizes |x_v| + max |x| over a V-term sum; a reward is the difference of two
    def lp_tol(x):
        return float32_tolerance(_size(x), V)

    ft_tol = np.stack([lp_tol(f) for f in fts])
    r_tol = ft_tol + lp_tol(ref)[None]
    assert_within(r[both], (ft_lp - np.where(np.isfinite(ref_lp), ref_lp, 0))[both], r_tol[both], "rewards")
    assert np.all(r[np.isneginf(ft_lp) & np.isneginf(ref_lp)[None]] == 0)
    assert np.all(np.isneginf(r[np.isneginf(ft_lp) & np.isfinite(ref_lp)[None]]))
    assert np.all(np.isposinf(r[np.isfinite(ft_lp) & np.isneginf(ref_lp)[None]]))

    tokens = np.array([0, 3, 7, 11, 39], np.int32)
    w = np.array([0.5, 1.5], np.float32)
    c = jax.jit(component_logprobs)(base, ref, fts[:2], w, tokens)
    rows = np.arange(B)
    assert_within(np.asarray(c.base), np_log_softmax(base)[rows, tokens], lp_tol(base)[rows, tokens], "base")
    assert_within(np.asarray(c.ref), ref_lp[rows, tokens], lp_tol(ref)[rows, tokens], "ref")
    assert_within(np.asarray(c.ft), ft_lp[:2][:, rows, tokens], ft_tol[:2][:, rows, tokens], "ft")
    assert_within(np.asarray(c.reward), r[:2][:, rows, tokens], 2 * r_tol[:2][:, rows, tokens], "reward")  # vs our r
    want = np_eft(base, ref, fts[:2], w)
    eft_tol = logprob_tolerance(want, eft_scale(base, ref, fts[:2], w))
    assert_within(np.asarray(c.eft), want[rows, tokens], eft_tol[rows, tokens], "eft")
    np.testing.assert_array_equal(np.asarray(gather_logprobs(jnp.asarray(fts[:2]), tokens)), fts[:2][:, rows, tokens])
    plain = component_logprobs(base, None, None, None, tokens)
    assert plain.ref is None and plain.ft is None and plain.reward is None


def test_input_validation(logits):
    base, ref, fts = logits
    with pytest.raises(ValueError, match="together"):
        eft_logprobs(base, ref, None, None)
    with pytest.raises(ValueError, match="weights must have shape"):
        eft_logprobs(base, ref, fts[:2], jnp.ones(3))
    with pytest.raises(ValueError, match="ft_logits must be"):
        eft_logprobs(base, ref, fts[0], None)
    with pytest.raises(ValueError, match="base_top_p"):
        eft_logprobs(base, None, None, None, base_top_p=0.0)
