"""Random-weight model families with a controlled relation between their members, for benchmarks.

Speculative EFT only pays when the drafter agrees with the EFT distribution often, and random weights
agree with nothing. This module builds families that do, at any realistic shape and without a
checkpoint:

- ``small_base``: a random Llama-shaped model;
- ``small_ft``: ``small_base`` plus a random perturbation of relative size ``ft_noise`` (the "fine-tune");
- ``large_base``: ``small_base`` embedded *exactly* in a larger shape (:func:`contain`), plus random
  weights of relative size ``noise``. At ``noise = 0`` the large model computes the small one's logits,
  so EFT up-scaling (w = 1) equals ``small_ft`` and every draft is accepted; raising ``noise`` lowers
  the acceptance smoothly. ``make_family(..., target_acceptance=a)`` calibrates the noise for a.

The large model has the full cost of its shape (zeros are multiplied like any other weight), so
timings are those of a real model of that size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jaxtyping import Array, Int
from tokenizers import Tokenizer, models, pre_tokenizers

from eft_jax.eft import eft_logprobs
from eft_jax.model import Model, param_shardings
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.sampling import safe_log_softmax
from eft_jax.sharding import TENSOR_PARALLEL, single_device_mesh

_SPECIALS = ("<pad>", "<s>", "</s>")


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with ``vocab_size`` ids: ``<pad> <s> </s> t3 t4 ...``.

    Gives random-weight models a real vocabulary size (the combine and sample cost depends on it).
    """
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(_SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def containing_config(small: LlamaConfig, **large_shape: int) -> LlamaConfig:
    """The config of a larger model that can contain ``small`` exactly (see :func:`contain`).

    ``large_shape`` sets hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads (and may
    repeat head_dim); each must be >= the small model's, with the same head_dim and the same number
    of query heads per key/value head.
    rms_norm_eps is scaled by the hidden-size ratio, which makes the embedding exact.
    """
    large = dataclasses.replace(small, **large_shape)
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(large, name) < getattr(small, name):
            raise ValueError(f"large {name} ({getattr(large, name)}) is smaller than the small model's ({getattr(small, name)})")
    if large.num_heads // large.num_kv_heads != small.num_heads // small.num_kv_heads:
        raise ValueError("large and small models need the same number of query heads per key/value head")
    if large.head_dim != small.head_dim:
        raise ValueError(f"large head_dim {large.head_dim} != small head_dim {small.head_dim}")
    return dataclasses.replace(large, rms_norm_eps=small.rms_norm_eps * small.hidden_size / large.hidden_size)


def contain(small_cfg: LlamaConfig, small_params: Any, large_cfg: LlamaConfig) -> Any:
    """Params of ``large_cfg`` whose forward pass equals ``small_params``' (up to float rounding).

    Every weight of the small model goes into the leading corner of the large one's (first layers,
    first heads, first hidden and MLP units); everything else is zero, so the extra layers, heads and
    units add nothing to the residual stream, whose extra dimensions stay zero. RMS norms average over
    the larger hidden size, which scales the mean square by r = small/large hidden size: norm scales
    are multiplied by sqrt(r), and ``containing_config`` multiplies eps by r, which compensates exactly.
    """
    ratio = small_cfg.hidden_size / large_cfg.hidden_size
    expected = containing_config(small_cfg, hidden_size=large_cfg.hidden_size,
                                 intermediate_size=large_cfg.intermediate_size, num_layers=large_cfg.num_layers,
                                 num_heads=large_cfg.num_heads, num_kv_heads=large_cfg.num_kv_heads)
    if expected != large_cfg:
        raise ValueError("large_cfg must come from containing_config(small_cfg, ...)")
    shapes = llama.abstract_params(large_cfg)

    def place(path: tuple, small: Array, like: jax.ShapeDtypeStruct) -> Array:
        out = jnp.zeros(like.shape, small.dtype)
        out = out.at[tuple(slice(0, n) for n in small.shape)].set(small)
        if path[-1].key == "scale":  # an RMSNorm scale
            out = out * jnp.asarray(math.sqrt(ratio), small.dtype)
        return out

    return jax.tree_util.tree_map_with_path(place, small_params, shapes)


def perturbed(cfg: LlamaConfig, params: Any, key: jax.Array, scale: float) -> Any:
    """``params + scale * (fresh random params of cfg)``: every weight moved by ``scale`` of its init size."""
    dtype = jax.tree.leaves(params)[0].dtype.name
    return _add(params, _init(cfg, key, dtype), jnp.float32(scale), dtype)


@dataclasses.dataclass(frozen=True)
class Family:
    """Configs and params of a related trio (see the module docstring)."""

    large_cfg: LlamaConfig
    small_cfg: LlamaConfig
    large_base: Any
    small_base: Any
    small_ft: Any
    noise: float


def _parts(large_shape: dict[str, int], small_shape: dict[str, int], vocab: int, ft_noise: float, seed: int,
           max_position_embeddings: int, dtype: str) -> tuple[LlamaConfig, LlamaConfig, Any, Any, Any, Any]:
    """(small_cfg, large_cfg, small_base, small_ft, contained small_base, large noise direction).

    The small models are float32; the large trees are in ``dtype`` (for an 8B shape, two float32 copies
    would not fit next to the result on an 80 GB accelerator)."""
    small_cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=max_position_embeddings, **small_shape)
    large_cfg = containing_config(small_cfg, **large_shape)
    k_small, k_ft, k_large = jax.random.split(jax.random.key(seed), 3)
    small_base = _init(small_cfg, k_small, "float32")
    small_ft = perturbed(small_cfg, small_base, k_ft, ft_noise)
    contained = _cast(_contain(small_cfg, small_base, large_cfg), dtype)
    return small_cfg, large_cfg, small_base, small_ft, contained, _init(large_cfg, k_large, dtype)


_init = jax.jit(lambda cfg, key, dtype: llama.init_params(cfg, key, jnp.dtype(dtype)), static_argnums=(0, 2))
_contain = jax.jit(contain, static_argnums=(0, 2))
_cast = jax.jit(lambda tree, dtype: jax.tree.map(lambda a: a.astype(dtype), tree), static_argnums=1)


@functools.partial(jax.jit, static_argnums=3)
def _add(params: Any, direction: Any, scale: Array, dtype: str) -> Any:
    """``params + scale * direction``, cast to dtype (one jitted program per shape)."""
    return jax.tree.map(lambda p, d: (p + scale * d).astype(dtype), params, direction)


def make_family(large_shape: dict[str, int], small_shape: dict[str, int], *, vocab: int, noise: float = 0.0,
                target_acceptance: float | None = None, ft_noise: float = 0.5, dtype: str = "float32",
                seed: int = 0, max_position_embeddings: int = 4096) -> Family:
    """A related trio: ``large_base`` = contain(small_base) + noise, ``small_ft`` = small_base + ft_noise.

    With ``target_acceptance``, ``noise`` is instead calibrated (:func:`calibrate_noise`) so that drafts
    from ``small_ft`` are accepted at about that rate by EFT up-scaling with w = 1.
    """
    small_cfg, large_cfg, small_base, small_ft, contained, direction = _parts(
        large_shape, small_shape, vocab, ft_noise, seed, max_position_embeddings, dtype)
    if target_acceptance is not None:
        noise, _ = calibrate_noise(small_cfg, large_cfg, small_base, small_ft, contained, direction, target_acceptance)
    large_base = _add(contained, direction, jnp.float32(noise), dtype)
    del contained, direction
    return Family(large_cfg, small_cfg, large_base, _cast(small_base, dtype), _cast(small_ft, dtype), noise)


def family_models(family: Family) -> tuple[Model, Model, Model]:
    """(large_base, small_base, small_ft) as single-device Models sharing one word tokenizer."""
    tokenizer = word_tokenizer(family.small_cfg.vocab_size)
    mesh = single_device_mesh()

    def model(cfg: LlamaConfig, params: Any, name: str) -> Model:
        placed = jax.device_put(params, param_shardings(cfg, mesh, TENSOR_PARALLEL))
        return Model(cfg, placed, tokenizer, mesh, TENSOR_PARALLEL, name)

    return (model(family.large_cfg, family.large_base, "synthetic-large-base"),
            model(family.small_cfg, family.small_base, "synthetic-small-base"),
            model(family.small_cfg, family.small_ft, "synthetic-small-ft"))


def _logits(cfg: LlamaConfig, params: Any, tokens: Int[Array, "batch seq"]) -> Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    out, _ = llama.forward(cfg, params, tokens, positions)
    return out.reshape(-1, out.shape[-1])[:, : cfg.vocab_size].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def _acceptance(small_cfg: LlamaConfig, large_cfg: LlamaConfig, large: Any, base: Any, ft: Any,
                tokens: Int[Array, "batch seq"], weight: Array, start: int = 0) -> Array:
    """Mean over positions >= start of ``tokens`` of sum_v min(p_v, q_v), p = EFT up-scaling, q = small_ft."""
    big, ref, tuned = (_logits(large_cfg, large, tokens), _logits(small_cfg, base, tokens),
                       _logits(small_cfg, ft, tokens))
    p = jnp.exp(eft_logprobs(big, ref, tuned[None], weight[None]))
    q = jnp.exp(safe_log_softmax(tuned))
    per_position = jnp.sum(jnp.minimum(p, q), axis=-1).reshape(tokens.shape)
    return jnp.mean(per_position[:, start:])


def expected_acceptance(family: Family, tokens: Int[Array, "batch seq"], weight: float = 1.0,
                        start: int = 0) -> float:
    """The chance that a draft from q = small_ft is accepted against p = EFT up-scaling (temperature 1,
    no filters) for the token after each position >= ``start`` of ``tokens`` (teacher-forced), averaged:
    the mean of sum_v min(p_v, q_v)."""
    return float(_acceptance(family.small_cfg, family.large_cfg, family.large_base, family.small_base,
                             family.small_ft, tokens, jnp.float32(weight), start))


@functools.partial(jax.jit, static_argnums=0)
def _sample_at(cfg: LlamaConfig, params: Any, tokens: Int[Array, "batch seq"], t: Array, key: jax.Array) -> Array:
    """``tokens`` with column t replaced by a temperature-1 sample given columns < t (full forward)."""
    logits = _logits(cfg, params, tokens).reshape(*tokens.shape, -1)
    nxt = jax.random.categorical(key, jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False))
    return jax.lax.dynamic_update_index_in_dim(tokens, nxt.astype(tokens.dtype), t, axis=1)


def drafter_probe(cfg: LlamaConfig, params: Any, *, batch: int = 4, prompt_len: int = 8, length: int = 32,
                  seed: int = 0) -> Int[Array, "batch length"]:
    """Probe sequences like those speculation visits: random prompt tokens, then tokens sampled from
    the model (the drafter) at temperature 1."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(len(_SPECIALS), cfg.vocab_size, (batch, length)), jnp.int32)
    key = jax.random.key(seed)
    for t in range(prompt_len, length):
        tokens = _sample_at(cfg, params, tokens, jnp.int32(t), jax.random.fold_in(key, t))
    return tokens


def calibrate_noise(small_cfg: LlamaConfig, large_cfg: LlamaConfig, small_base: Any, small_ft: Any, contained: Any,
                    direction: Any, target: float, *, steps: int = 10) -> tuple[float, float]:
    """The noise scale whose large model ``contained + noise * direction`` gives an expected acceptance
    closest to ``target``, by bisection in log space (acceptance falls as noise grows), measured on
    :func:`drafter_probe` sequences of the fine-tune. Returns (noise, its expected acceptance)."""
    probe = drafter_probe(small_cfg, small_ft)
    dtype = jax.tree.leaves(contained)[0].dtype.name
    with_noise = jax.jit(lambda p, d, s, base, ft: _acceptance(small_cfg, large_cfg, _add(p, d, s, dtype), base,
                                                                ft, probe, jnp.float32(1.0)))
    lo, hi = 1e-4, 4.0
    best = (hi, 0.0)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        acc = float(with_noise(contained, direction, jnp.float32(mid), small_base, small_ft))
        if abs(acc - target) < abs(best[1] - target):
            best = (mid, acc)
        lo, hi = (mid, hi) if acc > target else (lo, mid)
    return best
