"""The emulated fine-tuning (EFT) combination rule, as pure jit-friendly functions on float32 logits.

Per decoding step (Mitchell et al. 2023, arXiv 2310.12962):

    log p(y) = log p_base(y) + sum_i w_i * [log p_ft_i(y) - log p_ref(y)] - log Z

with ``base`` the pretrained model at scale N, ``ref`` the pretrained model at scale M and ``ft_i``
the fine-tunes of ``ref``. Raw logits are combined directly (each log-softmax normaliser is a per-row
constant that the final normalisation removes), and only the result is log-softmaxed, in float32.

Masked ids (non-finite entries, normally ``-inf``) are handled without ever computing
``(-inf) - (-inf)``:

- an id masked in the base is excluded;
- an id masked in ``ref`` or in ``ft_i`` is excluded when ``w_i != 0`` (its implicit reward is
  infinite or undefined there); with ``w_i == 0`` that fine-tune contributes nothing, so ``w = 0``
  always gives back the base distribution exactly;
- if these rules exclude every id the base allows in a row, the row falls back to the base
  distribution (restricted to its nucleus under ``base_top_p``) instead of producing NaN.

Weights are a traced array, so sweeping them does not recompile; the number of fine-tunes is the
static leading axis of ``ft_logits``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from eft_jax.sampling import nucleus_mask, safe_log_softmax

__all__ = [
    "ComponentLogprobs",
    "component_logprobs",
    "eft_logprobs",
    "gather_logprobs",
    "implicit_rewards",
]


def _check_inputs(
    base_logits: Array, ref_logits: Array | None, ft_logits: Array | None, weights: Array | None
) -> tuple[Array | None, Array | None, Array | None]:
    """Shape checks (at trace time); returns float32 ref, ft and weights (ones when omitted)."""
    if base_logits.ndim != 2:
        raise ValueError(f"base_logits must be [batch, vocab], got shape {base_logits.shape}")
    if (ref_logits is None) != (ft_logits is None):
        raise ValueError(
            "ref_logits and ft_logits must be given together (EFT) or both be None (plain decoding); "
            f"got ref_logits={'None' if ref_logits is None else 'array'}, "
            f"ft_logits={'None' if ft_logits is None else 'array'}"
        )
    if ref_logits is None:
        if weights is not None:
            raise ValueError("weights were given without ft_logits/ref_logits")
        return None, None, None
    ref = jnp.asarray(ref_logits, jnp.float32)
    ft = jnp.asarray(ft_logits, jnp.float32)
    if ref.shape != base_logits.shape:
        raise ValueError(f"ref_logits shape {ref.shape} != base_logits shape {base_logits.shape}")
    if ft.ndim != 3 or ft.shape[1:] != base_logits.shape:
        raise ValueError(
            f"ft_logits must be [n_ft, batch, vocab] = [n_ft, {base_logits.shape[0]}, {base_logits.shape[1]}], "
            f"got shape {ft.shape}"
        )
    n_ft, batch = ft.shape[0], ft.shape[1]
    if n_ft == 0:
        raise ValueError("ft_logits has no fine-tuned model (n_ft == 0)")
    if weights is None:
        w = jnp.ones((n_ft,), jnp.float32)
    else:
        w = jnp.asarray(weights, jnp.float32)
        if w.shape not in ((n_ft,), (n_ft, batch)):
            raise ValueError(
                f"weights must have shape [n_ft] = [{n_ft}] or [n_ft, batch] = [{n_ft}, {batch}], got {w.shape}"
            )
    return ref, ft, w


def eft_logprobs(
    base_logits: Float[Array, "batch vocab"],
    ref_logits: Float[Array, "batch vocab"] | None,
    ft_logits: Float[Array, "n_ft batch vocab"] | None,
    weights: Float[Array, "n_ft"] | Float[Array, "n_ft batch"] | None,
    *,
    base_top_p: float | None = None,
) -> Float[Array, "batch vocab"]:
    """Normalised float32 log-probs [batch, vocab] of the EFT distribution.

    ``log p_base + sum_i w_i (log p_ft_i - log p_ref) - log Z``; all inputs share the (common) vocab.
    ``ref_logits`` and ``ft_logits`` both None gives plain single-model decoding of ``base_logits``.
    ``weights`` [n_ft] (or [n_ft, batch] for per-row weights) defaults to all ones.
    ``base_top_p`` (static, in (0, 1]) restricts the result to the top-p nucleus of the base model's
    own distribution (conservative decoding); ids outside it are ``-inf``. See the module docstring
    for masked ids. Never returns NaN.
    """
    base = jnp.asarray(base_logits, jnp.float32)
    ref, ft, w = _check_inputs(base, ref_logits, ft_logits, weights)
    if base_top_p is not None and not (0.0 < base_top_p <= 1.0):
        raise ValueError(f"base_top_p must be in (0, 1] or None, got {base_top_p!r}")

    allowed = jnp.isfinite(base)
    if base_top_p is not None and base_top_p < 1.0:
        allowed = nucleus_mask(base, base_top_p)
    base_part = jnp.where(allowed, base, -jnp.inf)
    if ft is None:
        return safe_log_softmax(base_part)

    w_b = w[:, None, None] if w.ndim == 1 else w[:, :, None]  # [n_ft, 1|batch, 1]
    pair_ok = jnp.isfinite(ft) & jnp.isfinite(ref)[None]  # [n_ft, batch, vocab]
    delta = jnp.where(pair_ok, ft, 0.0) - jnp.where(pair_ok, ref[None], 0.0)  # 0 where either is masked
    # Elementwise (not a matmul/einsum) so no reduced-precision matmul path is ever taken.
    reward = jnp.sum(w_b * delta, axis=0)
    excluded = jnp.any((w_b != 0) & ~pair_ok, axis=0)
    keep = allowed & ~excluded
    combined = jnp.where(keep, jnp.where(allowed, base, 0.0) + reward, -jnp.inf)
    # Guard a non-finite sum (e.g. overflow from huge weights) so it cannot become NaN later.
    combined = jnp.where(jnp.isfinite(combined), combined, -jnp.inf)

    row_empty = ~jnp.any(jnp.isfinite(combined), axis=-1, keepdims=True)
    return safe_log_softmax(jnp.where(row_empty, base_part, combined))


def implicit_rewards(
    ft_logits: Float[Array, "n_ft batch vocab"], ref_logits: Float[Array, "batch vocab"]
) -> Float[Array, "n_ft batch vocab"]:
    """Implicit rewards ``log_softmax(ft_i) - log_softmax(ref)`` [n_ft, batch, vocab] in float32.

    Where an id is masked in both models the reward is 0; masked only in ``ft_i``: ``-inf``; masked
    only in ``ref``: ``+inf``. Never NaN.
    """
    ft = safe_log_softmax(jnp.asarray(ft_logits, jnp.float32))
    ref = safe_log_softmax(jnp.asarray(ref_logits, jnp.float32))
    return _reward(ft, ref[None])


def _reward(ft_lp: Array, ref_lp: Array) -> Array:
    """``ft_lp - ref_lp`` with 0 where both are -inf, +-inf where one is; never computes inf - inf."""
    ft_ok, ref_ok = jnp.isfinite(ft_lp), jnp.isfinite(ref_lp)
    both = ft_ok & ref_ok
    diff = jnp.where(both, ft_lp, 0.0) - jnp.where(both, ref_lp, 0.0)
    return jnp.where(both, diff, jnp.where(ft_ok, jnp.inf, jnp.where(ref_ok, -jnp.inf, 0.0)))


def gather_logprobs(
    logprobs: Float[Array, "*lead batch vocab"], tokens: Int[Array, "batch"]
) -> Float[Array, "*lead batch"]:
    """Pick ``logprobs[..., b, tokens[b]]`` for every row b: [*lead, batch]."""
    tokens = jnp.asarray(tokens)
    idx = jnp.broadcast_to(tokens[:, None], (*logprobs.shape[:-1], 1))
    return jnp.take_along_axis(logprobs, idx, axis=-1)[..., 0]


class ComponentLogprobs(NamedTuple):
    """Per-token log-probs of one step's components, for scoring and analysis (a pytree).

    base: [batch] under the base model alone. ref: [batch] under the reference (None in plain
    decoding). ft: [n_ft, batch] under each fine-tune. reward: [n_ft, batch] implicit rewards
    ``ft_i - ref``. eft: [batch] under the combined EFT distribution (with ``base_top_p``).
    """

    base: Float[Array, "batch"]
    ref: Float[Array, "batch"] | None
    ft: Float[Array, "n_ft batch"] | None
    reward: Float[Array, "n_ft batch"] | None
    eft: Float[Array, "batch"]


def component_logprobs(
    base_logits: Float[Array, "batch vocab"],
    ref_logits: Float[Array, "batch vocab"] | None,
    ft_logits: Float[Array, "n_ft batch vocab"] | None,
    weights: Float[Array, "n_ft"] | Float[Array, "n_ft batch"] | None,
    tokens: Int[Array, "batch"],
    *,
    base_top_p: float | None = None,
) -> ComponentLogprobs:
    """Log-probs of ``tokens`` [batch] under every component and under the EFT combination."""
    base = jnp.asarray(base_logits, jnp.float32)
    eft = gather_logprobs(eft_logprobs(base, ref_logits, ft_logits, weights, base_top_p=base_top_p), tokens)
    base_lp = gather_logprobs(safe_log_softmax(base), tokens)
    if ref_logits is None or ft_logits is None:
        return ComponentLogprobs(base=base_lp, ref=None, ft=None, reward=None, eft=eft)
    ref_lp = gather_logprobs(safe_log_softmax(jnp.asarray(ref_logits, jnp.float32)), tokens)
    ft_lp = gather_logprobs(safe_log_softmax(jnp.asarray(ft_logits, jnp.float32)), tokens)
    return ComponentLogprobs(base=base_lp, ref=ref_lp, ft=ft_lp, reward=_reward(ft_lp, ref_lp[None]), eft=eft)
