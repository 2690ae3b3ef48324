"""LoRA (Hu et al., arXiv 2106.09685): low-rank adapters on the attention and MLP projections.

A targeted projection ``W`` (stored ``[layers, *in, *out]``, e.g. ``attn.q`` ``[layers, embed, heads,
head_dim]``, ``attn.o`` ``[layers, heads, head_dim, embed]``, ``mlp.down`` ``[layers, mlp, embed]``) gets two
trainable factors

    a: [layers, *in, rank]  (normal, std in_features ** -0.5)    b: [layers, rank, *out]  (zeros)

and the adapted weight is ``W + (alpha / rank) * a @ b`` (``a @ b`` contracts ``rank``; ``*in`` and ``*out``
flattened in their stored order, which is the order of the Hugging Face ``in_features`` / ``out_features``:
heads major, head_dim minor). ``b = 0`` at initialisation, so a fresh adapter leaves the model unchanged.

Pure functions over pytrees: the adapters are a nested dict ``{"layers": {"attn": {"q": {"a", "b"}}, "mlp":
{...}}}`` mirroring the params; :func:`merge` returns ordinary params (what training runs the forward with,
and what is exported and loaded by the engine: a merged model is a plain model).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from eft_jax.models.config import LlamaConfig

Params = dict[str, Any]

# Target name -> (block, leaf) under params["layers"].
TARGETS: dict[str, tuple[str, str]] = {
    "q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
    "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank: the adapters' inner size (>= 1). alpha: the update is scaled by ``alpha / rank``.
    targets: projection names among ``TARGETS`` (q, k, v, o, gate, up, down); None: every one the model has."""

    rank: int
    alpha: float
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"lora.alpha must be a number > 0, got {self.alpha!r}")
        if self.targets is not None:
            if isinstance(self.targets, str) or not isinstance(self.targets, Sequence) or not self.targets:
                raise ValueError(f"lora.targets must be a non-empty list of {list(TARGETS)}, got {self.targets!r}")
            unknown = [t for t in self.targets if t not in TARGETS]
            if unknown:
                raise ValueError(f"lora.targets: unknown {unknown}; choose among {list(TARGETS)}")
            if len(set(self.targets)) != len(self.targets):
                raise ValueError(f"lora.targets lists a projection twice: {list(self.targets)}")
            object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def resolved_targets(self, cfg: LlamaConfig) -> tuple[str, ...]:
        """The targets in ``TARGETS`` order; raises ``ValueError`` for one the model does not have."""
        present = [t for t in TARGETS if t != "gate" or cfg.mlp_gated]
        if self.targets is None:
            return tuple(present)
        missing = [t for t in self.targets if t not in present]
        if missing:
            raise ValueError(f"lora.targets: this {cfg.architecture} model has no {missing} projection "
                             f"(a non-gated MLP); choose among {present}")
        return tuple(t for t in TARGETS if t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": None if self.targets is None else list(self.targets)}


def _weight_shape(cfg: LlamaConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The per-layer (input axes, output axes) of a target's weight."""
    d, f, h, k, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {"q": ((d,), (h, hd)), "k": ((d,), (k, hd)), "v": ((d,), (k, hd)), "o": ((h, hd), (d,)),
            "gate": ((d,), (f,)), "up": ((d,), (f,)), "down": ((f,), (d,))}[target]


def _factor_shapes(cfg: LlamaConfig, lora: LoraConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Target -> (shape of ``a``, shape of ``b``), for the resolved targets in ``TARGETS`` order."""
    out = {}
    for t in lora.resolved_targets(cfg):
        ins, outs = _weight_shape(cfg, t)
        out[t] = ((cfg.num_layers, *ins, lora.rank), (cfg.num_layers, lora.rank, *outs))
    return out


def _nest(per_target: dict[str, Any]) -> Params:
    """Target -> value as the adapters' nested dict ``{"layers": {block: {leaf: value}}}``."""
    out: Params = {}
    for t, value in per_target.items():
        block, leaf = TARGETS[t]
        out.setdefault(block, {})[leaf] = value
    return {"layers": out}


def adapter_shapes(cfg: LlamaConfig, lora: LoraConfig) -> Params:
    """The adapters' pytree as float32 ``jax.ShapeDtypeStruct`` leaves."""
    return _nest({t: {"a": jax.ShapeDtypeStruct(a, jnp.float32), "b": jax.ShapeDtypeStruct(b, jnp.float32)}
                  for t, (a, b) in _factor_shapes(cfg, lora).items()})


def init_adapters(cfg: LlamaConfig, lora: LoraConfig, key: jax.Array) -> Params:
    """Fresh adapters: ``a`` normal with std ``in_features ** -0.5`` (one key per target, folded from ``key``
    by the target's index in ``TARGETS``, so a target's init does not depend on the others chosen), ``b``
    zeros."""
    names = list(TARGETS)

    def factors(t: str, a: tuple[int, ...], b: tuple[int, ...]) -> dict[str, Array]:
        fan_in = math.prod(a[1:-1])
        noise = jax.random.normal(jax.random.fold_in(key, names.index(t)), a, jnp.float32)
        return {"a": fan_in**-0.5 * noise, "b": jnp.zeros(b, jnp.float32)}

    return _nest({t: factors(t, a, b) for t, (a, b) in _factor_shapes(cfg, lora).items()})


def delta(a: Float[Array, "layers *ins rank"], b: Float[Array, "layers rank *outs"],
          scale: float) -> Float[Array, "layers *weight_dims"]:
    """``scale * a @ b`` per layer, in float32 at full precision (no TF32 on GPUs)."""
    layers, rank = a.shape[0], a.shape[-1]
    ins, outs = a.shape[1:-1], b.shape[2:]
    flat = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank).astype(jnp.float32),
                      b.reshape(layers, rank, -1).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (scale * flat).reshape(layers, *ins, *outs)


def merge(params: Params, adapters: Params, lora: LoraConfig) -> Params:
    """``params`` with every adapted weight replaced by ``W + scale * a @ b`` (added in float32, then cast to
    ``W``'s dtype: keep float32 weights to merge small updates without rounding them away). Other leaves are
    the same arrays. ``params`` must be in the canonical stacked layout (``Model.params``)."""
    if isinstance(params["layers"], tuple):
        raise ValueError("lora.merge needs the stacked params layout (Model.params, not Model.run_params)")
    layers = dict(params["layers"])
    for block, leaves in adapters["layers"].items():
        layers[block] = dict(layers[block])
        for leaf, ab in leaves.items():
            w = layers[block][leaf]
            d = delta(ab["a"], ab["b"], lora.scale)
            if d.shape != w.shape:
                raise ValueError(f"lora adapter {block}.{leaf}: its update has shape {d.shape}, the weight "
                                 f"{w.shape}; the adapters were made for another model config")
            layers[block][leaf] = (w.astype(jnp.float32) + d).astype(w.dtype)
    return {**params, "layers": layers}


def num_adapter_params(cfg: LlamaConfig, lora: LoraConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapter_shapes(cfg, lora)))
