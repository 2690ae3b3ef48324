"""Architecture configuration of the Llama family, read from a Hugging Face ``config.json``.

The reader works from an allow-list: every field is either implemented, known to be irrelevant at
inference time, or refused with a message that names it. A field we do not implement is never
silently ignored, because a silently ignored field (an active sliding window, a new rope-scaling type)
gives a model that loads and produces wrong logits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

# Fields that change nothing in an inference forward pass (training knobs, token ids, bookkeeping).
_IRRELEVANT_FIELDS = frozenset(
    {
        "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
        "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
        "attention_dropout", "output_attentions", "output_hidden_states", "return_dict",
        "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
        "tokenizer_class", "prefix", "task_specific_params", "quantization_config_ignored",
        "tie_encoder_decoder", "torchscript", "use_return_dict", "auto_map", "decoder_start_token_id",
        "max_window_layers", "layer_types", "embd_pdrop", "resid_pdrop", "unsloth_version",
    }
)


class UnsupportedConfigError(ValueError):
    """The checkpoint's config.json asks for something this implementation does not do."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling. ``kind`` is "llama3" or "linear"."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of one Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, SmolLM2, ...)."""

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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise UnsupportedConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h, k, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * hd * (2 * h + 2 * k) + (hd * (h + 2 * k) if self.qkv_bias else 0)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * per_layer + self.vocab_size * d + head + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Inverse of ``to_dict`` (our own serialisation, e.g. inside an orbax checkpoint)."""
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


def _rope_settings(hf: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
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
    raise UnsupportedConfigError(
        f"{where}: rope scaling type {kind!r} is not implemented (supported: default, linear, llama3)"
    )


def config_from_hf(hf: Mapping[str, Any], *, where: str = "config.json") -> LlamaConfig:
    """Build a ``LlamaConfig`` from a Hugging Face config dict, refusing anything not implemented.

    ``where`` names the file in error messages.
    """
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and model_type in SUPPORTED_ARCHITECTURES.values():
        arch = model_type
    if arch is None:
        raise UnsupportedConfigError(
            f"{where}: architecture {archs or model_type!r} is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )

    handled = {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
        "pretraining_tp", "sliding_window", "use_sliding_window",
    }
    unknown = sorted(k for k in hf if k not in handled and k not in _IRRELEVANT_FIELDS)
    if unknown:
        raise UnsupportedConfigError(
            f"{where}: field(s) {unknown} are not implemented by eft_jax's Llama-family model; refusing to "
            "load rather than silently ignoring them"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not implemented (only silu)")
    if hf.get("mlp_bias"):
        raise UnsupportedConfigError(f"{where}: mlp_bias=true is not implemented")
    if hf.get("pretraining_tp", 1) != 1:
        raise UnsupportedConfigError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not implemented (only 1)")

    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    max_pos = int(hf.get("max_position_embeddings", 2048))
    # A sliding window is exact as long as no sequence is longer than it, so an active window becomes
    # our context limit instead of a silently wrong attention pattern.
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window", False) and window is not None:
        # Qwen2's window applies to only some layers (max_window_layers): not implemented.
        raise UnsupportedConfigError(
            f"{where}: use_sliding_window=true (sliding_window={window}) is not implemented; "
            "set use_sliding_window to false if your sequences never exceed the window"
        )
    if arch == "mistral" and window is not None:
        # Mistral's window is exact as long as no sequence is longer than it, so it becomes our
        # context limit (longer prompts are refused) rather than a silently wrong attention pattern.
        max_pos = min(max_pos, int(window))

    # Qwen2 always has q/k/v biases; Llama/Mistral have them when attention_bias is set.
    qkv_bias = arch == "qwen2" or bool(hf.get("attention_bias", False))
    theta, scaling = _rope_settings(hf, where)
    try:
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            architecture=arch,
        )
    except KeyError as e:
        raise UnsupportedConfigError(f"{where}: required field {e.args[0]!r} is missing") from None


def rope_inverse_frequencies(config: LlamaConfig) -> list[float]:
    """Per-pair rotary inverse frequencies (length head_dim // 2), with the configured scaling applied."""
    dim = config.head_dim
    inv = [1.0 / (config.rope_theta ** (2 * i / dim)) for i in range(dim // 2)]
    s = config.rope_scaling
    if s is None:
        return inv
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
