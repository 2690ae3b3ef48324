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

Per-request settings and the whole pipeline of one step, for one row (every value may differ per row)::

    x = EFT log-probs (log p_base + w * (log p_ft - log p_ref), renormalised; per-row weights w)
        -> reported ``logprob`` of the sampled token (and ``distributions``, ``top_logprobs``): x itself, i.e. temperature 1,
           BEFORE logit_bias, penalties, min_tokens and the filters
    1. logit_bias:          x[id] += bias                   (ids the EFT rule masked stay -inf)
    2. min_tokens:          x[stop and end ids] = -inf while the row has fewer than min_tokens output tokens
                            (end ids are not masked for an ignore_eos row: they do not stop it)
    3. repetition_penalty:  for ids in the prompt (the base model's rendering) or generated so far:
                            x / r where x > 0, x * r where x <= 0 (the EFT "logits" are its log-probs, <= 0
                            unless a bias made them positive: in effect the penalty multiplies them)
    4. presence/frequency:  x -= presence * [count > 0] + frequency * count   (counts of generated tokens)
    5. temperature, top-k, top-p, min-p (as above); temperature 0: greedy on the result of 1-4
    6. sample

Static and traced parts: the engine compiles one program per :class:`Features` (which of these steps any
row of a run uses); the values are per row arrays (:class:`RowValues`), so a batch mixes settings without
recompiling. A run whose rows all share the filters (e.g. all defaults) keeps them static
(:func:`final_logprobs`: the fast path, ``lax.top_k`` with a static k); per-row filters take the values
from one sort (``lax.top_k`` with the largest k when every top-p row also has a top-k; else a full sort).
Penalty counts are in the decode state only when some row uses a penalty.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Key

__all__ = [
    "Features",
    "RowValues",
    "SETTINGS",
    "check_logit_bias",
    "filter_rows",
    "process_rows",
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


LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's allowed bias values


def check_logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (a mapping token id -> bias; ids as ints or decimal strings, as in JSON), as
    (id, bias) pairs sorted by id; or ValueError ``"must be ..., got ..."``. The vocabulary bound is checked
    by the engine (it knows the shared vocabulary)."""
    lo, hi = LOGIT_BIAS_RANGE
    bad = ValueError(f"must be an object mapping token ids (integers >= 0) to numbers in [{lo:g}, {hi:g}], "
                     f"got {value!r}")
    if isinstance(value, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value):
        value = dict(value)  # pairs (the config's form)
    if not isinstance(value, dict):
        raise bad
    out = {}
    for key, bias in value.items():
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise bad
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not lo <= bias <= hi:
            raise bad
        out[int(key)] = float(bias)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    """Static (hashable) sampling configuration; pass it as a static argument to ``jax.jit``.

    temperature: > 0 divides the log-probs; 0 means greedy (argmax).
    top_k: keep the k most likely ids (ties at the k-th value kept); 0 = off.
    top_p: nucleus sampling, in (0, 1]; 1 = off.
    min_p: keep ids with probability >= min_p * max probability, in [0, 1); 0 = off.
    min_tokens, ignore_eos, logit_bias, repetition_penalty, presence_penalty, frequency_penalty: see the
    module docstring (logit_bias: a mapping or (id, bias) pairs; kept as pairs sorted by id).
    As the engine's default it is static; per request (``requests.Rendered.sampling``) its values are traced.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "logit_bias", check_logit_bias(self.logit_bias) if self.logit_bias else ())
        except ValueError as e:
            raise ValueError(f"SamplingParams.logit_bias {e}") from None
        for name in SETTINGS:
            try:
                # Normalised types, so equal configurations hash equally (1 vs 1.0, numpy scalars).
                object.__setattr__(self, name, check_setting(name, getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"SamplingParams.{name} {e}") from None

    @property
    def is_identity(self) -> bool:
        """True when the filters change nothing (temperature 1, no top-k/top-p/min-p)."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0 and self.min_p == 0.0

    @property
    def filters(self) -> tuple[float, int, float, float]:
        return (self.temperature, self.top_k, self.top_p, self.min_p)

    @property
    def penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

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
    sorted_desc: Float[Array, "batch n"], log_norm: Float[Array, "batch"], p: float | Float[Array, "batch"]
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
    p = p if isinstance(p, float) else jnp.asarray(p, jnp.float32).reshape(-1, 1)  # per-row: [batch, 1]
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


@dataclass(frozen=True)
class Features:
    """Static: which steps of the pipeline any row of a run uses (part of the compiled program's key).

    row_filters: the rows' temperature/top-k/top-p/min-p differ (per-row filters; else ``Plan.sampling``'s,
    static). top_k: the largest k of a row (0: none); full_sort: some top-p row has no top-k (sort the whole
    vocabulary). greedy / top_p / min_p: some row uses it. logit_bias: the most bias entries of a row (padded).
    min_tokens / penalties: some row uses them. ignore_eos: rows differ in ignore_eos. row_weights: rows
    differ in reward weights.
    """

    row_filters: bool = False
    top_k: int = 0
    full_sort: bool = False
    greedy: bool = False
    top_p: bool = False
    min_p: bool = False
    logit_bias: int = 0
    min_tokens: bool = False
    penalties: bool = False
    ignore_eos: bool = False
    row_weights: bool = False

    @classmethod
    def of(cls, rows: list[SamplingParams], vocab: int, row_weights: bool = False) -> Features:
        """The features of a run's rows (their effective settings)."""
        mixed = len({r.filters for r in rows}) > 1
        ks = [min(r.top_k, vocab) for r in rows if 0 < r.top_k]
        return cls(
            row_filters=mixed,
            top_k=max(ks) if mixed and ks else 0,
            full_sort=mixed and any(r.top_p < 1.0 and not 0 < r.top_k < vocab for r in rows),
            greedy=mixed and any(r.greedy for r in rows),
            top_p=mixed and any(r.top_p < 1.0 for r in rows),
            min_p=mixed and any(r.min_p > 0.0 for r in rows),
            logit_bias=max(len(r.logit_bias) for r in rows),
            min_tokens=any(r.min_tokens > 0 for r in rows),
            penalties=any(r.penalties for r in rows),
            ignore_eos=len({r.ignore_eos for r in rows}) > 1,
            row_weights=row_weights,
        )

    @property
    def processors(self) -> bool:
        """Some row changes the EFT distribution before the filters (bias, min_tokens, penalties)."""
        return bool(self.logit_bias) or self.min_tokens or self.penalties


@jax.tree_util.register_dataclass
@dataclass
class RowValues:
    """Each row's traced sampling values ([rows] each; ``bias_ids`` / ``bias`` [rows, Features.logit_bias],
    padded with id -1 and bias 0)."""

    temperature: Float[Array, " rows"]
    top_k: Int[Array, " rows"]
    top_p: Float[Array, " rows"]
    min_p: Float[Array, " rows"]
    min_tokens: Int[Array, " rows"]
    ignore_eos: Bool[Array, " rows"]
    repetition: Float[Array, " rows"]
    presence: Float[Array, " rows"]
    frequency: Float[Array, " rows"]
    bias_ids: Int[Array, "rows nb"]
    bias: Float[Array, "rows nb"]

    @staticmethod
    def host(rows: list[SamplingParams], features: Features) -> dict[str, object]:
        """The numpy arrays of ``rows``' values (the caller places them on devices)."""
        import numpy as np

        nb = features.logit_bias
        ids = np.full((len(rows), nb), -1, np.int32)
        bias = np.zeros((len(rows), nb), np.float32)
        for i, r in enumerate(rows):
            for j, (t, b) in enumerate(r.logit_bias):
                ids[i, j], bias[i, j] = t, b
        col = lambda name, dtype: np.array([getattr(r, name) for r in rows], dtype)  # noqa: E731
        return dict(temperature=col("temperature", np.float32), top_k=col("top_k", np.int32),
                    top_p=col("top_p", np.float32), min_p=col("min_p", np.float32),
                    min_tokens=col("min_tokens", np.int32), ignore_eos=col("ignore_eos", bool),
                    repetition=col("repetition_penalty", np.float32), presence=col("presence_penalty", np.float32),
                    frequency=col("frequency_penalty", np.float32), bias_ids=ids, bias=bias)

    def repeat(self, n: int) -> RowValues:
        """Each row's values ``n`` times in a row (for the [rows * n] flattened positions of speculative rounds)."""
        return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), self)


def process_rows(
    x: Float[Array, "rows vocab"], values: RowValues, features: Features, out_index: Int[Array, " rows"],
    stop_mask: Bool[Array, "rows vocab"] | None, counts: Int[Array, "rows vocab"] | None,
    prompt_seen: Bool[Array, "rows vocab"] | None,
) -> Float[Array, "rows vocab"]:
    """Steps 1-4 of the module docstring (logit_bias, min_tokens, repetition, presence/frequency) on the EFT
    log-probs ``x``. ``out_index``: the output index of the token being sampled; ``stop_mask``: each row's ids
    that would stop it (for min_tokens); ``counts``: generated tokens per id; ``prompt_seen``: ids in the prompt.
    Only the steps ``features`` names are traced."""
    x = jnp.asarray(x, jnp.float32)
    rows, vocab = x.shape
    if features.logit_bias:
        ids = jnp.where(values.bias_ids >= 0, values.bias_ids, vocab)  # padding: out of range, dropped
        x = x.at[jnp.arange(rows)[:, None], ids].add(values.bias, mode="drop")
    if features.min_tokens and stop_mask is not None:
        x = jnp.where(stop_mask & (out_index < values.min_tokens)[:, None], -jnp.inf, x)
    if features.penalties:
        r = values.repetition[:, None]
        seen = prompt_seen | (counts > 0)
        x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
        x = x - values.presence[:, None] * (counts > 0) - values.frequency[:, None] * counts.astype(jnp.float32)
    return jnp.where(jnp.isnan(x), -jnp.inf, x)


def filter_rows(x: Float[Array, "rows vocab"], values: RowValues, features: Features) -> Float[Array, "rows vocab"]:
    """Per-row :func:`final_logprobs`: each row's own temperature, top-k, top-p, min-p (same definitions, tie
    rule and order); rows with temperature 0 are greedy. Static ``features`` say which filters to trace."""
    x = jnp.asarray(x, jnp.float32)
    x = jnp.where(_valid(x), x, -jnp.inf)
    rows, vocab = x.shape
    t = values.temperature
    scaled = x / jnp.where(t > 0, t, 1.0)[:, None]
    threshold = jnp.full((rows,), -jnp.inf, jnp.float32)
    if features.top_k or features.top_p:
        # One sort serves every row: the largest k of the run, or the whole vocabulary when a top-p row has
        # no top-k (its nucleus may reach any id).
        width = vocab if features.full_sort or not features.top_k else min(features.top_k, vocab)
        sorted_desc = (jnp.flip(jnp.sort(scaled, axis=-1), axis=-1) if width == vocab
                       else jax.lax.top_k(scaled, width)[0])
        k = values.top_k
        use_k = (k > 0) & (k < vocab)
        kth = jnp.take_along_axis(sorted_desc, (jnp.clip(k, 1, width) - 1)[:, None], axis=-1)[:, 0]
        threshold = jnp.where(use_k, kth, -jnp.inf)
        if features.top_p:
            in_top_k = scaled >= threshold[:, None]
            log_norm = _safe_logsumexp(jnp.where(in_top_k, scaled, -jnp.inf))
            restricted = jnp.where(sorted_desc >= threshold[:, None], sorted_desc, -jnp.inf)
            nucleus = _nucleus_threshold(restricted, log_norm, values.top_p)
            threshold = jnp.where(values.top_p < 1.0, jnp.maximum(threshold, nucleus), threshold)
    if features.min_p:
        row_max = jnp.max(scaled, axis=-1)
        log_min_p = jnp.log(jnp.where(values.min_p > 0, values.min_p, 1.0))
        threshold = jnp.where(values.min_p > 0, jnp.maximum(threshold, row_max + log_min_p), threshold)
    out = safe_log_softmax(jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf))
    if features.greedy:
        best = jnp.argmax(x, axis=-1)
        one_hot = jnp.where(jnp.arange(vocab)[None, :] == best[:, None], 0.0, -jnp.inf).astype(jnp.float32)
        out = jnp.where((t == 0)[:, None], one_hot, out)
    return out


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
