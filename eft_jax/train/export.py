"""Export trained params as a standard Hugging Face checkpoint directory.

``config.json`` (LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM), ``model.safetensors`` in
Hugging Face names and orientation, and the tokenizer files. The layout change of each tensor is the
exact inverse of the loader's (``eft_jax.loading.weights.weight_rules``): every loader transform is a
reshape/transpose, so it is inverted by pushing an index array through it, which keeps the exporter
correct by construction for any rule the loader has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from eft_jax.loading.weights import TensorRule, weight_rules
from eft_jax.models.config import LlamaConfig

_HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "mistral": ("MistralForCausalLM", "mistral")}


def hf_config_dict(cfg: LlamaConfig, tokenizer: Any = None, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` (every field one that ``config_from_hf`` reads back)."""
    arch, model_type = _HF_ARCH[cfg.architecture]
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": jnp.dtype(dtype).name,
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor} if s.kind == "linear" else {
            "rope_type": s.kind, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings}
    if model_type in ("llama", "mistral"):
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif not cfg.qkv_bias:
        raise ValueError("a qwen2 model always has q/k/v biases")
    if model_type == "qwen2":
        out["use_sliding_window"] = False
    if model_type == "mistral":
        out["sliding_window"] = None
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    return out


def _to_hf(rule: TensorRule, ours: np.ndarray) -> np.ndarray:
    """Invert ``rule.to_ours`` for one layer: scatter our elements back to their HF positions."""
    index = rule.to_ours(np.arange(int(np.prod(rule.hf_shape))).reshape(rule.hf_shape))
    if index.shape != ours.shape:
        raise ValueError(f"{rule.hf_name}: our tensor has shape {ours.shape}, expected {index.shape}")
    flat = np.empty(index.size, ours.dtype)
    flat[np.asarray(index).reshape(-1)] = ours.reshape(-1)
    return flat.reshape(rule.hf_shape)


def hf_state_dict(cfg: LlamaConfig, params: dict[str, Any], dtype: Any = jnp.bfloat16) -> dict[str, np.ndarray]:
    """HF tensor name -> numpy array in ``dtype`` (leaves gathered to the host one at a time)."""
    out: dict[str, np.ndarray] = {}
    np_dtype = np.dtype(jnp.dtype(dtype))
    for rule in weight_rules(cfg):
        leaf = params
        for key in rule.path:
            leaf = leaf[key]
        host = np.asarray(jax.device_get(leaf), np.float32)
        if rule.stacked:
            for layer in range(cfg.num_layers):
                out[rule.hf_name.format(layer=layer)] = np.ascontiguousarray(_to_hf(rule, host[layer]).astype(np_dtype))
        else:
            out[rule.hf_name] = np.ascontiguousarray(_to_hf(rule, host).astype(np_dtype))
    return out


def export_hf(
    cfg: LlamaConfig,
    params: dict[str, Any],
    dest: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: Any = jnp.bfloat16,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files of a model to ``dest``.

    The result loads with ``eft_jax.load_model(dest)`` and ``transformers.AutoModelForCausalLM
    .from_pretrained(dest)``. ``dtype``: the stored float type (bf16 by default).
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty; pass overwrite=True or choose another directory")
    dest.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(cfg, params, dtype), str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(hf_config_dict(cfg, tokenizer, dtype), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
    return dest
