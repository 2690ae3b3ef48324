"""Export trained params as a standard Hugging Face checkpoint directory.

``config.json`` (the family's class: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, Olmo2ForCausalLM, Phi3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM,
GPTNeoXForCausalLM, GPT2LMHeadModel, FalconForCausalLM), ``model.safetensors`` in
Hugging Face names and orientation, and the tokenizer files. The config keys every family shares are
written here; each family's own come from its writer next to its reader
(``eft_jax.models.families.Family.write``), and the result is read back with ``config_from_hf``: a config
its family's ``config.json`` cannot say (a Llama with q/k norms, a Mistral with q/k/v biases) is refused
rather than exported as a different model. The layout change of each tensor is the exact inverse of the
loader's (``eft_jax.loading.weights.weight_rules``): every loader transform is a reshape/transpose, so
it is inverted by pushing an index array through it, which keeps the exporter correct by construction
for any rule the loader has. Norm scales need no conversion: Gemma's ``(1 + w)`` norms store ``w`` both
in our params and in its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from eft_jax.loading.weights import TensorRule, weight_rules
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.models.families import config_from_hf, family


def hf_config_dict(cfg: LlamaConfig, tokenizer: Any = None, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """The ``config.json`` of ``cfg``: the shared keys, then the family's (``Family.hf_keys``).

    ``config_from_hf`` reads it back as ``cfg`` (for a config read from a ``config.json``: equal in
    every field). Raises ``ValueError`` when the family's ``config.json`` cannot say ``cfg``.
    """
    own = family(cfg.architecture).hf_keys(cfg)
    out: dict[str, Any] = {
        "architectures": own.pop("architectures"), "model_type": own.pop("model_type"),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": jnp.dtype(dtype).name,
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        if s.kind == "linear":
            out["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor}
        elif s.kind == "longrope":
            out["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor, "attention_factor": s.attention_factor,
                                   "short_factor": list(s.short_factor), "long_factor": list(s.long_factor),
                                   "original_max_position_embeddings": s.original_max_position_embeddings,
                                   # transformers 5 reads the rotary fraction from here (Phi-3's validation)
                                   "partial_rotary_factor": cfg.rope_dim / cfg.head_dim}
        else:
            out["rope_scaling"] = {
                "rope_type": s.kind, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings}
    fam = family(cfg.architecture)
    if fam.aliases or fam.unwritten:  # the family's own spelling of the shared keys (GPT-2's n_embd, ...)
        renamed = {shared: theirs for theirs, shared in fam.aliases.items()}
        out = {renamed.get(k, k): v for k, v in out.items() if k not in fam.unwritten}
    out.update(own)
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    back = config_from_hf(out, where=f"the {cfg.architecture} config.json written for it")
    diff = _differences(_canonical(cfg), _canonical(back))
    if diff:
        raise ValueError(f"a {cfg.architecture} config.json cannot say this config; it would read back with "
                         f"{'; '.join(diff)}")
    return out


def _canonical(cfg: LlamaConfig) -> LlamaConfig:
    """``cfg`` with the fields that change no logits in their one form: no window, layer types or local rope
    without a sliding layer; the default query scale and an unscaled local rope equal to the global one
    spelled out."""
    sliding = any(cfg.sliding_layers)
    local = cfg.local_rope_theta
    if local is None and cfg.rope_scaling is None:
        local = cfg.rope_theta
    return dataclasses.replace(
        cfg, layer_types=cfg.layer_types if sliding else None, sliding_window=cfg.sliding_window if sliding else None,
        local_rope_theta=local if sliding else None,
        query_scale=cfg.query_scale if cfg.query_scale is not None else cfg.head_dim**-0.5)


def _differences(want: LlamaConfig, got: LlamaConfig) -> list[str]:
    return [f"{f.name}={getattr(got, f.name)!r} instead of {getattr(want, f.name)!r}" for f in dataclasses.fields(want)
            if getattr(want, f.name) != getattr(got, f.name)]


def _to_hf(rule: TensorRule, ours: np.ndarray, into: np.ndarray | None = None) -> np.ndarray:
    """Invert ``rule.to_ours`` for one layer: scatter our elements back to their HF positions (into the
    HF tensor ``into`` when several of our leaves share it: fused projections such as Phi-3's qkv_proj)."""
    index = rule.to_ours(np.arange(int(np.prod(rule.hf_shape))).reshape(rule.hf_shape))
    if index.shape != ours.shape:
        raise ValueError(f"{rule.hf_name}: our tensor has shape {ours.shape}, expected {index.shape}")
    flat = np.empty(int(np.prod(rule.hf_shape)), ours.dtype) if into is None else into.reshape(-1)
    flat[np.asarray(index).reshape(-1)] = ours.reshape(-1)
    return flat.reshape(rule.hf_shape)


def hf_state_dict(cfg: LlamaConfig, params: dict[str, Any], dtype: Any = jnp.bfloat16) -> dict[str, np.ndarray]:
    """HF tensor name -> numpy array in ``dtype`` (leaves gathered to the host one at a time)."""
    if llama.params_quantize(params) is not None:
        # int8 projections would be written as their integer codes without the scales: refuse instead.
        raise ValueError("these weights are int8-quantized (quantize: int8); export or train from the float "
                         "checkpoint they were quantized from (load_model without quantize)")
    out: dict[str, np.ndarray] = {}  # float32 until every leaf sharing a tensor has been scattered into it
    for rule in weight_rules(cfg):
        leaf = params
        for key in rule.path:
            leaf = leaf[key]
        host = np.asarray(jax.device_get(leaf), np.float32)
        if rule.stacked:
            for layer in range(cfg.num_layers):
                name = rule.hf_name.format(layer=layer)
                out[name] = _to_hf(rule, host[layer], out.get(name))
        else:
            out[rule.hf_name] = _to_hf(rule, host, out.get(rule.hf_name))
    np_dtype = np.dtype(jnp.dtype(dtype))
    return {name: np.ascontiguousarray(x.astype(np_dtype)) for name, x in out.items()}


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
