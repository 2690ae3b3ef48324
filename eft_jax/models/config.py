"""The decoder configuration: shapes, constants and the architectural switches of every supported family.

``LlamaConfig`` describes one decoder of the Llama lineage (pre-norm residual blocks of grouped-query
attention with rotary positions and a gated MLP). Its defaults are Llama's; the switches after them
(norm form, q/k norms, sandwich norms, MLP activation, embedding scale, soft-capping, sliding windows,
per-layer-type rope) are what other families change. Which values a family sets, and how they are read
from its ``config.json``, lives in one place per family: :mod:`eft_jax.models.families`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"  # per-layer attention types (HF's ``layer_types``)


class UnsupportedConfigError(ValueError):
    """The checkpoint's config.json asks for something this implementation does not do."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling. ``kind`` is "llama3", "linear" or "longrope".

    longrope (Phi-3.5, Phi-4-mini): per-frequency divisors, ``short_factor`` while a row's positions stay
    within ``original_max_position_embeddings`` and ``long_factor`` beyond (chosen per forward call, as
    transformers does), and cos/sin scaled by ``attention_factor``.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of one decoder (Llama 1/2/3, Mistral, Qwen2/3, Gemma 2/3, OLMo 2, Phi-3, GPT-2,
    GPT-NeoX / Pythia, Falcon, ...)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    architecture: str = "llama"
    # --- switches other families set (see eft_jax.models.families) ---
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), in float32 before the cast (Gemma)
    norm_float32_scale: bool = False  # RMSNorm scales in float32, then casts (OLMo 2; Gemma does so too)
    qk_norm: str | None = None  # RMSNorm of queries and keys before rope: "head" (over head_dim, one weight
    #   shared by the heads: Qwen3, Gemma 3) or "width" (over all heads together: OLMo 2); None: none
    pre_norms: bool = True  # each block's input is normalised (all but OLMo 2)
    post_norms: bool = False  # each block's output is normalised before the residual add (Gemma, OLMo 2)
    mlp_activation: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size), in the weights' dtype (Gemma)
    query_scale: float | None = None  # attention score scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before masking (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    sliding_window: int | None = None  # a sliding layer's query at position p sees keys at p - window + 1 .. p
    layer_types: tuple[str, ...] | None = None  # per layer SLIDING or FULL; None: every layer FULL
    local_rope_theta: float | None = None  # rope base of SLIDING layers, unscaled (Gemma 3); None: as FULL ones
    rotary_dim: int | None = None  # rope rotates only the first rotary_dim dims of each head (partial rotary:
    #   GPT-NeoX, Phi-4-mini); None: all of head_dim
    norm_type: str = "rms"  # "rms" (RMSNorm, a scale) or "layernorm" (mean-centred, a scale and a bias: GPT-2,
    #   GPT-NeoX, Falcon); rms_norm_eps is its epsilon either way. q/k norms are always RMS.
    parallel_residual: bool = False  # x + attn(norm1 x) + mlp(norm2 x) instead of the sequential block (GPT-NeoX,
    #   Falcon)
    shared_input_norm: bool = False  # parallel blocks: one input norm feeds attention and MLP (Falcon-7B)
    mlp_gated: bool = True  # False: down(act(up x)), no gate (GPT-2, GPT-NeoX, Falcon)
    o_bias: bool = False  # a bias on the attention output projection
    mlp_bias: bool = False  # biases on the MLP projections
    position_embedding: str = "rope"  # "rope" or "learned" (an absolute position table added to the
    #   embeddings, max_position_embeddings rows, no rope: GPT-2)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise UnsupportedConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise UnsupportedConfigError(
                f"the rotary dimension must be even and within head_dim ({self.head_dim}), got {self.rope_dim}")
        if self.qk_norm not in (None, "head", "width"):
            raise UnsupportedConfigError(f"qk_norm must be None, 'head' or 'width', got {self.qk_norm!r}")
        if not (self.pre_norms or self.post_norms):
            raise UnsupportedConfigError("a decoder needs pre_norms, post_norms or both")
        if self.mlp_activation not in ("silu", "gelu_tanh", "gelu"):
            raise UnsupportedConfigError(
                f"mlp_activation must be 'silu', 'gelu_tanh' or 'gelu', got {self.mlp_activation!r}")
        if self.norm_type not in ("rms", "layernorm"):
            raise UnsupportedConfigError(f"norm_type must be 'rms' or 'layernorm', got {self.norm_type!r}")
        if self.position_embedding not in ("rope", "learned"):
            raise UnsupportedConfigError(
                f"position_embedding must be 'rope' or 'learned', got {self.position_embedding!r}")
        if self.parallel_residual and not (self.pre_norms and not self.post_norms):
            raise UnsupportedConfigError("parallel_residual needs pre_norms and no post_norms")
        if self.shared_input_norm and not self.parallel_residual:
            raise UnsupportedConfigError("shared_input_norm needs parallel_residual")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}:
                raise UnsupportedConfigError(
                    f"layer_types must list {self.num_layers} entries, each {SLIDING!r} or {FULL!r}; "
                    f"got {list(self.layer_types)}")
            if SLIDING in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
                raise UnsupportedConfigError(f"sliding layers need a positive sliding_window, got {self.sliding_window}")

    @property
    def rope_dim(self) -> int:
        """How many leading dims of each head rope rotates."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend over a sliding window?"""
        return tuple(t == SLIDING for t in self.layer_types) if self.layer_types else (False,) * self.num_layers

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h, k, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        qk_norm = {"head": 2 * hd, "width": (h + k) * hd}.get(self.qk_norm or "", 0)
        attn = (d * hd * (2 * h + 2 * k) + (hd * (h + 2 * k) if self.qkv_bias else 0) + qk_norm
                + (d if self.o_bias else 0))
        projections = 3 if self.mlp_gated else 2
        mlp = projections * d * f + ((projections - 1) * f + d if self.mlp_bias else 0)
        norm = 2 * d if self.norm_type == "layernorm" else d  # a layer norm has a bias too
        input_norms = 1 if self.shared_input_norm else 2
        per_layer = attn + mlp + (input_norms * self.pre_norms + 2 * self.post_norms) * norm
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        positions = self.max_position_embeddings * d if self.position_embedding == "learned" else 0
        return self.num_layers * per_layer + self.vocab_size * d + head + norm + positions

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Inverse of ``to_dict`` (our own serialisation, e.g. inside an orbax checkpoint)."""
        d = dict(d)
        if d.get("rope_scaling") is not None:
            scaling = dict(d["rope_scaling"])
            for key in ("short_factor", "long_factor"):
                if scaling.get(key) is not None:
                    scaling[key] = tuple(scaling[key])
            d["rope_scaling"] = RopeScaling(**scaling)
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)


def rope_settings(hf: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """Rope theta and scaling from either the transformers-v4 keys (rope_theta, rope_scaling) or v5's
    rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        params = {**params, **scaling}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        try:
            return theta, RopeScaling(
                kind="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise UnsupportedConfigError(f"{where}: llama3 rope scaling lacks the field {e.args[0]!r}") from None
    if kind in ("longrope", "su"):  # "su": the name of older Phi-3 configs
        original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
        try:
            short, long = tuple(map(float, params["short_factor"])), tuple(map(float, params["long_factor"]))
        except KeyError as e:
            raise UnsupportedConfigError(f"{where}: longrope scaling lacks the field {e.args[0]!r}") from None
        if original is None:
            raise UnsupportedConfigError(f"{where}: longrope scaling needs original_max_position_embeddings")
        factor = params.get("factor") or int(hf.get("max_position_embeddings", original)) / int(original)
        attention = params.get("attention_factor")
        if attention is None:  # the LongRoPE paper's choice, as transformers computes it
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(int(original)))
        return theta, RopeScaling(kind="longrope", factor=float(factor), original_max_position_embeddings=int(original),
                                  short_factor=short, long_factor=long, attention_factor=float(attention))
    raise UnsupportedConfigError(
        f"{where}: rope scaling type {kind!r} is not implemented (supported: default, linear, llama3, longrope)"
    )


def rope_inverse_frequencies(config: LlamaConfig, *, local: bool = False) -> list[float]:
    """Per-pair rotary inverse frequencies (length rope_dim // 2), with the configured scaling applied;
    ``local``: those of sliding layers (``local_rope_theta``, unscaled, where the config sets one)."""
    dim = config.rope_dim
    if local and config.local_rope_theta is not None:
        return [1.0 / (config.local_rope_theta ** (2 * i / dim)) for i in range(dim // 2)]
    inv = [1.0 / (config.rope_theta ** (2 * i / dim)) for i in range(dim // 2)]
    s = config.rope_scaling
    if s is None:
        return inv
    if s.kind == "longrope":  # the short factors; see llama._rope_for_rows for the long ones
        return [f / div for f, div in zip(inv, _longrope_factors(config, s.short_factor), strict=True)]
    if s.kind == "linear":
        return [f / s.factor for f in inv]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth blend in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out


def _longrope_factors(config: LlamaConfig, factors: tuple[float, ...] | None) -> tuple[float, ...]:
    if factors is None or len(factors) != config.rope_dim // 2:
        raise UnsupportedConfigError(f"longrope factors must number rope_dim / 2 = {config.rope_dim // 2}, "
                                     f"got {None if factors is None else len(factors)}")
    return factors


def longrope_long_frequencies(config: LlamaConfig) -> list[float]:
    """The long-context inverse frequencies of a longrope config (used once a row passes
    ``original_max_position_embeddings``)."""
    s = config.rope_scaling
    assert s is not None and s.kind == "longrope"
    dim = config.rope_dim
    inv = [1.0 / (config.rope_theta ** (2 * i / dim)) for i in range(dim // 2)]
    return [f / div for f, div in zip(inv, _longrope_factors(config, s.long_factor), strict=True)]
