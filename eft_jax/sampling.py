"""Filters and samplers on log-probabilities (pure, jit-friendly functions).

The decode loop turns one step's (EFT-combined) log-probs into a token in two stages:

1. :func:`final_logprobs` applies the sampling configuration and returns the *exact* distribution
   that will be sampled, as normalised log-probs with ``-inf`` outside the kept set. Speculative
   decoding uses the same function for its target ``p`` and draft ``q`` distributions.
2. :func:`sample` draws one token per row from that distribution, each row from its own key
   (see :func:`row_keys`), so a sequence's sample never depends on the batch it was run in.

Filter order (the same as Hugging Face ``transformers``' warpers): **temperature, then top-k, then
top-p, then min-p**, each acting on the renormalised output of the previous one, then a final
renormalisation. Top-p is the only filter for which the order matters (its nucleus is taken from the
distribution already restricted to the top-k); min-p compares with the most likely token, which every
filter keeps, so it is unaffected by renormalisation.

Tie rule: every filter keeps *all* ids whose value equals its threshold value. Top-k keeps every id
whose log-prob is >= the k-th largest value (so more than k ids survive when there are ties at the
k-th place); top-p finds the smallest prefix of ids, in order of decreasing probability, whose mass
is >= p, and keeps every id whose probability is >= the smallest one in that prefix; min-p keeps ids
with ``p >= min_p * p_max``. The kept set is therefore a function of the values only, never of how a
sort happens to order equal values, and it is always of the form ``logprob >= threshold``. Entries
that are ``-inf`` (masked ids) are never kept.

Greedy decoding (``temperature == 0``) is represented as a one-hot distribution on the argmax (log-prob
0 there, ``-inf`` elsewhere; on ties, the lowest id); ``sample`` then returns that id for any key.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Key

__all__ = [
    "SETTINGS",
    "SamplingParams",
    "Setting",
    "check_setting",
    "final_logprobs",
    "nucleus_mask",
    "row_keys",
    "safe_log_softmax",
    "sample",
]


@dataclass(frozen=True)
class Setting:
    """One per-request sampling setting: its neutral (off) value, its kind and what values are allowed.

    The one place the allowed values are written: the config schema, per-line JSONL fields, OpenAI request
    bodies, ``generation_config.json`` defaults and ``SamplingParams`` all check with :func:`check_setting`.
    """

    neutral: object
    kind: str  # "real", "int" or "bool"
    allowed: str  # said in error messages: "must be {allowed}"
    check: object = None  # value -> bool, for "real"/"int"; None: any value of the kind


SETTINGS: dict[str, Setting] = {
    "temperature": Setting(1.0, "real", "a number >= 0 (0 = greedy)", lambda v: math.isfinite(v) and v >= 0),
    "top_k": Setting(0, "int", "an integer >= 0 (0 = off)", lambda v: v >= 0),
    "top_p": Setting(1.0, "real", "a number in (0, 1] (1 = off)", lambda v: 0 < v <= 1),
    "min_p": Setting(0.0, "real", "a number in [0, 1) (0 = off)", lambda v: 0 <= v < 1),
    "min_tokens": Setting(0, "int", "an integer >= 0", lambda v: v >= 0),
    "ignore_eos": Setting(False, "bool", "true or false"),
    "repetition_penalty": Setting(1.0, "real", "a number > 0 (1 = off)", lambda v: math.isfinite(v) and v > 0),
    "presence_penalty": Setting(0.0, "real", "a number in [-2, 2] (0 = off)", lambda v: -2 <= v <= 2),
    "frequency_penalty": Setting(0.0, "real", "a number in [-2, 2] (0 = off)", lambda v: -2 <= v <= 2),
}


def check_setting(name: str, value: object) -> object:
    """``value`` of setting ``name`` (a key of ``SETTINGS``) normalised (float, int or bool), or ValueError
    saying ``"must be <allowed>, got <value>"`` (the caller prefixes where the value came from)."""
    setting = SETTINGS[name]
    bad = ValueError(f"must be {setting.allowed}, got {value!r}")
    if setting.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad
    if setting.kind == "int":
        if not float(value).is_integer():
            raise bad
        value = int(value)
    else:
        value = float(value)
    if setting.check is not None and not setting.check(value):  # type: ignore[operator]
        raise bad
    return value


@dataclass(frozen=True)
class SamplingParams:
    """Static (hashable) sampling configuration; pass it as a static argument to ``jax.jit``.

    temperature: > 0 divides the log-probs; 0 means greedy (argmax).
    top_k: keep the k most likely ids (ties at the k-th value kept); 0 = off.
    top_p: nucleus sampling, in (0, 1]; 1 = off.
    min_p: keep ids with probability >= min_p * max probability, in [0, 1); 0 = off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_k", "top_p", "min_p"):
            try:
                # Normalised types, so equal configurations hash equally (1 vs 1.0, numpy scalars).
                object.__setattr__(self, name, check_setting(name, getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"SamplingParams.{name} {e}") from None

    @property
    def is_identity(self) -> bool:
        """True when sampling draws from the input distribution unchanged (no temperature, no filter)."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0 and self.min_p == 0.0

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0)."""
        return self.temperature == 0.0


def _valid(x: Array) -> Array:
    """Entries that take part in a distribution: finite ones (``-inf`` marks a masked id)."""
    return jnp.isfinite(x)


def _safe_logsumexp(x: Float[Array, "*b n"]) -> Float[Array, "*b"]:
    """log(sum(exp(x))) over the last axis, ignoring non-finite entries; -inf for an empty row."""
    valid = _valid(x)
    m = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, x - m, -jnp.inf)), 0.0), axis=-1)
    safe_s = jnp.where(s > 0, s, 1.0)
    return jnp.where(s > 0, jnp.log(safe_s) + m[..., 0], -jnp.inf)


def safe_log_softmax(x: Float[Array, "*b n"]) -> Float[Array, "*b n"]:
    """float32 log-softmax over the last axis; non-finite entries become -inf and never produce NaN.

    A row without any finite entry comes back as all ``-inf``.
    """
    x = jnp.asarray(x, jnp.float32)
    valid = _valid(x)
    lse = _safe_logsumexp(x)[..., None]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.where(valid, jnp.where(valid, x, 0.0) - lse, -jnp.inf)


def _nucleus_threshold(
    sorted_desc: Float[Array, "batch n"], log_norm: Float[Array, "batch"], p: float
) -> Float[Array, "batch"]:
    """Per-row value threshold of the top-p nucleus.

    ``sorted_desc`` holds the row's largest values in decreasing order (``-inf`` last) and
    ``log_norm`` the log of the normaliser of the distribution they belong to. The nucleus is the
    shortest prefix whose mass reaches ``p``; an id belongs to it iff the mass strictly before it is
    < p. Returns the value of the prefix's last element (always at least the maximum).
    """
    valid = _valid(sorted_desc)
    probs = jnp.where(valid, jnp.exp(jnp.where(valid, sorted_desc - log_norm[:, None], -jnp.inf)), 0.0)
    cum = jnp.cumsum(probs, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
    count = jnp.sum((before < p) & valid, axis=-1)
    count = jnp.clip(count, 1, sorted_desc.shape[-1])
    return jnp.take_along_axis(sorted_desc, (count - 1)[:, None], axis=-1)[:, 0]


def nucleus_mask(logits: Float[Array, "batch vocab"], p: float) -> Bool[Array, "batch vocab"]:
    """Ids in the top-p nucleus of ``softmax(logits)`` (ties at the threshold kept; ``-inf`` never kept).

    ``logits`` need not be normalised. ``p`` is a static float in (0, 1]; ``p == 1`` keeps every
    finite id.
    """
    if not (0.0 < p <= 1.0):
        raise ValueError(f"top-p must be in (0, 1], got {p!r}")
    x = jnp.asarray(logits, jnp.float32)
    if p >= 1.0:
        return _valid(x)
    sorted_desc = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
    thr = _nucleus_threshold(sorted_desc, _safe_logsumexp(x), p)
    return (x >= thr[:, None]) & _valid(x)


def final_logprobs(logprobs: Float[Array, "batch vocab"], params: SamplingParams) -> Float[Array, "batch vocab"]:
    """The exact distribution that will be sampled, as normalised float32 log-probs [batch, vocab].

    Applies temperature, top-k, top-p and min-p in that order (see the module docstring for the tie
    rule) and renormalises; ids outside the kept set are ``-inf``. The input may be unnormalised
    logits; ``-inf`` entries are masked ids. Greedy (``temperature == 0``) gives a one-hot
    distribution on the argmax (0 there, ``-inf`` elsewhere). ``params`` must be static under jit.
    """
    x = jnp.asarray(logprobs, jnp.float32)
    x = jnp.where(_valid(x), x, -jnp.inf)
    batch, vocab = x.shape
    if params.greedy:
        best = jnp.argmax(x, axis=-1)
        return jnp.where(jnp.arange(vocab)[None, :] == best[:, None], 0.0, -jnp.inf).astype(jnp.float32)

    if params.temperature != 1.0:
        x = x / jnp.float32(params.temperature)

    # Every filter keeps `x >= threshold`; the kept set is x >= the largest threshold.
    threshold = jnp.full((batch,), -jnp.inf, jnp.float32)
    k = min(params.top_k, vocab)
    use_top_k = 0 < k < vocab
    use_top_p = params.top_p < 1.0

    if use_top_k:
        # One partial sort serves both top-k and top-p: the top-p nucleus of the top-k-restricted
        # distribution lies within the k largest values (ids tied at the k-th value, which top-k
        # also keeps, all carry that same value).
        top_vals = jax.lax.top_k(x, k)[0]
        threshold = top_vals[:, k - 1]
        if use_top_p:
            in_top_k = x >= threshold[:, None]
            log_norm = _safe_logsumexp(jnp.where(in_top_k, x, -jnp.inf))
            threshold = jnp.maximum(threshold, _nucleus_threshold(top_vals, log_norm, params.top_p))
    elif use_top_p:
        sorted_desc = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
        threshold = _nucleus_threshold(sorted_desc, _safe_logsumexp(x), params.top_p)

    if params.min_p > 0.0:
        # p_i >= min_p * p_max  <=>  x_i >= max(x) + log(min_p), in any normalisation.
        row_max = jnp.max(x, axis=-1)
        threshold = jnp.maximum(threshold, row_max + jnp.float32(math.log(params.min_p)))

    x = jnp.where(x >= threshold[:, None], x, -jnp.inf)
    return safe_log_softmax(x)


_BLOCK = 256  # inverse-CDF block width: one pass over the vocabulary, then two short cumsums


def sample(logprobs: Float[Array, "batch vocab"], keys: Key[Array, "batch"]) -> Int[Array, "batch"]:
    """One independent draw per row [batch] from ``softmax(logprobs)``, row i from ``keys[i]``.

    Inverse-CDF sampling with one uniform per row: pick the block of ``_BLOCK`` ids whose cumulative
    mass crosses ``u * total``, then the id inside it. This needs one pass over the vocabulary and no
    per-id random numbers (per-id Gumbel noise costs more than the rest of an EFT step on CPU). A row's
    draw depends only on its own key and row, never on the batch. ``-inf`` ids are never drawn (a row
    that is all ``-inf`` returns id 0).
    """
    x = jnp.asarray(logprobs, jnp.float32)
    batch, vocab = x.shape
    u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
    row_max = jnp.max(jnp.where(_valid(x), x, -jnp.inf), axis=-1, keepdims=True)
    probs = jnp.where(_valid(x), jnp.exp(x - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)

    blocks = -(-vocab // _BLOCK)
    probs = jnp.pad(probs, ((0, 0), (0, blocks * _BLOCK - vocab))).reshape(batch, blocks, _BLOCK)
    block_mass = jnp.sum(probs, axis=-1)  # [batch, blocks]
    block_cum = jnp.cumsum(block_mass, axis=-1)
    target = u * block_cum[:, -1]
    # The first block whose cumulative mass exceeds the target; rounding can push the target past
    # the last block, so never go beyond the last block that has any mass.
    last_block = jnp.max(jnp.where(block_mass > 0, jnp.arange(blocks), 0), axis=-1)
    block = jnp.minimum(jnp.sum(block_cum <= target[:, None], axis=-1), last_block)
    inside = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [batch, _BLOCK]
    before = jnp.take_along_axis(block_cum - block_mass, block[:, None], axis=1)[:, 0]
    inner_cum = jnp.cumsum(inside, axis=-1)
    last_id = jnp.max(jnp.where(inside > 0, jnp.arange(_BLOCK), 0), axis=-1)
    offset = jnp.minimum(jnp.sum(inner_cum <= (target - before)[:, None], axis=-1), last_id)
    return (block * _BLOCK + offset).astype(jnp.int32)


def row_keys(
    seed: int | Int[Array, ""], prompt_ids: Int[Array, "batch"], positions: Int[Array, "batch"]
) -> Key[Array, "batch"]:
    """Per-row keys [batch]: ``key(seed)`` folded with the row's prompt id, then with its position.

    Pure and jittable (``seed`` may be traced). Prompt ids and positions must fit in 32 bits.
    """
    base = jax.random.key(seed)
    prompt_ids = jnp.asarray(prompt_ids)
    positions = jnp.asarray(positions)

    def one(pid: Array, pos: Array) -> Array:
        return jax.random.fold_in(jax.random.fold_in(base, pid), pos)

    return jax.vmap(one)(prompt_ids, positions)
