"""Tolerances derived from the arithmetic, and the statistical thresholds, shared by the test suite.

Rounding bound (see docs/tests.md). Two computations of one real quantity that differ only in rounding
(summation order, blocking, fusion, device count, library) differ by at most

    LAMBDA * eps * scale * sqrt(reduction_len * depth)

- ``eps``: machine epsilon of the arithmetic, ``FLOAT32_EPS`` = 2**-23 or ``BFLOAT16_EPS`` = 2**-7. One
  rounding is off by at most u = eps / 2, so two independent computations differ by at most eps per step.
- ``scale``: the size of the values (max |logit|) or of the terms that were added (sum of |terms|).
- ``reduction_len``: the longest sum on the way (hidden size, MLP width, vocabulary, sequence length).
- ``depth``: how many such stages are chained (layers of a model, log-softmaxes of a formula).
- Rounding errors behave like a random walk (Higham & Mary, "A new approach to probabilistic rounding
  error analysis", SIAM J. Sci. Comput. 41(5), 2019): the error of n accumulated roundings exceeds
  lambda * sqrt(n) * u * scale with probability at most 2 exp(-lambda^2 / 2). Chained stages add their
  rounding errors to the same walk (the residual stream adds them), hence sqrt(reduction_len * depth).
- ``LAMBDA = 8``: 2 exp(-32) ~ 3e-14 per value, so no summation order on any machine reaches it (the
  worst case, linear in n, needs every rounding to go the same way). Observed differences sit 12-60x
  below the bound for model logits (docs/tests.md), while a bug (a wrong norm scale, position, weight or
  mask) moves values by O(scale), far above it at the shapes the tests use.

Propagating a bound is exact (no statistics): log-softmax is 2-Lipschitz in the max norm (each
log-prob moves by its logit's error plus the log-normaliser's, a p-weighted mean of the errors), and a
probability moves by at most p times its log-prob's error.

Statistical tests: a correct sampler passes a test at level ``ALPHA`` except with probability ALPHA (over
the seed); every statistical test uses a fixed seed, so its verdict is the same on every run and machine.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from scipy import stats

FLOAT32_EPS = 2.0**-23  # ~1.19e-7, np.finfo(np.float32).eps
BFLOAT16_EPS = 2.0**-7  # 8 significand bits
LAMBDA = 8.0  # tail of the random-walk rounding model: 2 exp(-LAMBDA^2 / 2) ~ 3e-14
ALPHA = 1e-4  # false-failure probability of each statistical test (over the choice of its fixed seed)


def rounding_tolerance(scale, reduction_len: int = 1, depth: int = 1, *, eps: float = FLOAT32_EPS):
    """LAMBDA * eps * scale * sqrt(reduction_len * depth): see the module docstring. ``scale`` may be an
    array (an element-wise bound)."""
    return LAMBDA * eps * np.asarray(scale, np.float64) * math.sqrt(reduction_len * depth)


def float32_tolerance(scale, reduction_len: int = 1, depth: int = 1):
    """The rounding bound of two float32 computations of values of size ``scale``."""
    return rounding_tolerance(scale, reduction_len, depth, eps=FLOAT32_EPS)


def bfloat16_tolerance(scale, reduction_len: int = 1, depth: int = 1):
    """The rounding bound when activations are rounded to bfloat16 (accumulation stays float32, so a
    matmul adds one rounding of its output, not one per term: pass the rounded stages as ``depth``)."""
    return rounding_tolerance(scale, reduction_len, depth, eps=BFLOAT16_EPS)


def logits_tolerance(reference, *, hidden: int, intermediate: int, layers: int, seq: int,
                     eps: float = FLOAT32_EPS) -> float:
    """Bound on |logit difference| of two float32 forwards of one Llama model: scale max |logit|, the
    longest reduction max(hidden, intermediate, seq), one stage per layer."""
    scale = float(np.max(np.abs(np.asarray(reference, np.float64)[np.isfinite(reference)])))
    return float(rounding_tolerance(scale, max(hidden, intermediate, seq), layers, eps=eps))


def eft_logprob_tolerance(logit_tol: float, weights) -> float:
    """Bound on an EFT log-prob's error when each model's logits are off by at most ``logit_tol``:
    each model's log-softmax doubles it; base + sum_i w_i ft_i - (sum_i w_i) ref adds
    1 + sum_i |w_i| + |sum_i w_i| of them; the final renormalisation doubles it again."""
    w = np.asarray(weights, np.float64)
    terms = 1.0 + float(np.sum(np.abs(w))) + float(abs(np.sum(w)))
    return 2.0 * terms * 2.0 * logit_tol


def probability_tolerance(logprobs, logprob_tol) -> np.ndarray:
    """Element-wise bound on |p_got - p_want| from a bound d on the log-probs' error: p (e^d - 1)."""
    lp = np.asarray(logprobs, np.float64)
    p = np.exp(np.where(np.isfinite(lp), lp, -np.inf))
    return p * np.expm1(np.asarray(logprob_tol, np.float64))


def record(what: str, **values) -> None:
    """With $EFT_TOLERANCE_LOG set, append how close a check came to its bound (for docs/tests.md)."""
    if os.environ.get("EFT_TOLERANCE_LOG"):
        with open(os.environ["EFT_TOLERANCE_LOG"], "a") as f:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            f.write(json.dumps({"test": test, "what": what, **values}) + "\n")


def assert_within(actual, desired, tol, what: str = "") -> None:
    """|actual - desired| <= tol element-wise (tol broadcasts), compared in float64; non-finite entries
    must match exactly. The message names the worst element against its bound."""
    a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    a, d, t = np.broadcast_arrays(a, d, np.asarray(tol, np.float64))
    finite = np.isfinite(d)
    np.testing.assert_array_equal(np.where(finite, 0, a), np.where(finite, 0, d), err_msg=f"{what}: non-finite entries")
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(a - d), 0.0)
    bad = ~(diff <= t)
    record(what, max_diff=float(diff.max(initial=0.0)), ratio=float(np.max(diff / np.maximum(t, 1e-300), initial=0.0)))
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, diff / np.maximum(t, 1e-300), 0)), diff.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {diff.size} elements outside the rounding bound; worst at "
                             f"{i}: {a[i]!r} vs {d[i]!r}, |diff| {diff[i]:.3g} > bound {t[i]:.3g}")


def chi_square_pvalue(draws, probs, *, rescale: bool = True) -> float:
    """Pearson chi-square p-value of integer ``draws`` against ``probs`` (categories with an expected count
    below 5 pooled into one, so the chi-square approximation holds). Draws outside the support fail.
    ``rescale`` makes the expected counts sum to the observed total (probs that sum to 1 - rounding)."""
    probs = np.asarray(probs, np.float64)
    counts = np.bincount(np.asarray(draws), minlength=len(probs)).astype(np.float64)
    assert counts[probs <= 0].sum() == 0, f"drew ids outside the support: {np.flatnonzero(counts * (probs <= 0))}"
    expected = probs / probs.sum() * counts.sum() if rescale else probs * counts.sum()
    big = expected >= 5
    obs, exp = np.append(counts[big], counts[~big].sum()), np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    pvalue = float(stats.chisquare(obs[keep], exp[keep]).pvalue)
    record("chi-square p-value", pvalue=pvalue)
    return pvalue


def z_bound(alpha: float = ALPHA) -> float:
    """Two-sided standard-normal quantile: |Z| exceeds it with probability ``alpha`` (3.89 for 1e-4)."""
    return float(stats.norm.isf(alpha / 2))
