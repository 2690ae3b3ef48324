"""One description per model family: how its ``config.json`` maps onto :class:`LlamaConfig`, and how its
checkpoint names its tensors.

Every family here runs the same decoder (:mod:`eft_jax.models.llama`); what differs is a handful of
switches and constants in the config, and a few tensor names. A :class:`Family` holds both, so a
family's differences are visible in one place:

- ``architectures`` / ``model_types``: how a ``config.json`` (or a GGUF file's reconstructed config)
  names it;
- ``fields``: the config fields it reads on top of the shared ones, and ``read`` turning them into
  :class:`LlamaConfig` keyword arguments;
- ``tensor_names``: our leaf path -> the checkpoint's per-layer tensor name, where it differs from
  Llama's (``eft_jax.loading.weights`` builds the whole key map from it; the fused layouts of Phi-3, GPT-NeoX,
  GPT-2 and Falcon are hooks there), ``top_names`` / ``layer_prefix`` / ``base_prefix`` for the rest;
- ``aliases`` / ``prepare``: a family's own spelling of the shared fields (GPT-2's ``n_embd``);
- ``write``: the inverse of ``read``, the family's own ``config.json`` keys for a :class:`LlamaConfig`
  (``Family.hf_keys`` adds its ``architectures`` / ``model_type``; ``eft_jax.train.export`` adds the
  shared keys and checks that ``config_from_hf`` reads the result back as the same model).

Reading works from an allow-list: a field is read by the shared reader or the family, known to be
irrelevant at inference time, or refused with a message naming it. A silently ignored field (an
active sliding window, a new rope type, bidirectional attention) would give a model that loads and
produces wrong logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from eft_jax.models.config import FULL, SLIDING, LlamaConfig, UnsupportedConfigError, rope_settings

# Fields that change nothing in an inference forward pass (training knobs, token ids, bookkeeping).
IRRELEVANT_FIELDS = frozenset(
    {
        "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
        "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
        "attention_dropout", "output_attentions", "output_hidden_states", "return_dict",
        "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
        "tokenizer_class", "prefix", "task_specific_params", "quantization_config_ignored",
        "tie_encoder_decoder", "torchscript", "use_return_dict", "auto_map", "decoder_start_token_id",
        "embd_pdrop", "resid_pdrop", "unsloth_version", "cache_implementation",
    }
)

# Fields every family reads (the shared part of ``read_config``).
SHARED_FIELDS = frozenset(
    {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "max_position_embeddings", "tie_word_embeddings",
    }
)

Reader = Callable[[Mapping[str, Any], str], dict[str, Any]]
Writer = Callable[[LlamaConfig], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family is read and written (see the module docstring)."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    fields: frozenset[str]
    read: Reader
    tensor_names: Mapping[tuple[str, ...], str] = dataclasses.field(default_factory=dict)
    write: Writer | None = None  # every family in FAMILIES has one
    # Values a config.json of this family may omit, as transformers' config class defaults them.
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The family's own spelling of shared config.json fields: its name -> the shared name (GPT-2's n_embd ->
    # hidden_size), read as the shared field and written under the family's name.
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Shared fields its config.json does not have (GPT-2 has no rope_theta): not written on export.
    unwritten: frozenset[str] = frozenset()
    # Where its checkpoint differs from Llama's outside the layers: ("embed",), ("final_norm", "scale"),
    # ("final_norm", "bias"), ("lm_head",), ("pos_embed",) -> tensor name; and the layers' name prefix.
    top_names: Mapping[tuple[str, ...], str] = dataclasses.field(default_factory=dict)
    layer_prefix: str = "model.layers.{layer}."
    # transformers' base_model_prefix where a checkpoint may lack it (one saved from the base model; the Hub's
    # gpt2): such tensors are read as if prefixed. "" for the families whose checkpoints always carry it.
    base_prefix: str = ""
    # Normalises a config.json before it is read (the aliases applied; computed defaults such as GPT-2's
    # n_inner = 4 x n_embd); None: the aliases only.
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def hf_keys(self, cfg: LlamaConfig) -> dict[str, Any]:
        """The family's part of ``cfg``'s ``config.json``: its class names and ``write``'s keys (the shared
        shape, norm and rope keys are the exporter's). Raises ``ValueError`` for a config the family's
        ``config.json`` cannot say."""
        if self.write is None:
            raise ValueError(f"family {self.name!r} has no config.json writer")
        return {"architectures": [self.architectures[0]], "model_type": self.model_types[0], **self.write(cfg)}


def _activation(hf: Mapping[str, Any], where: str, key: str, default: str) -> str:
    act = hf.get(key) or default
    ours = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if ours is None:
        raise UnsupportedConfigError(f"{where}: {key} {act!r} is not implemented (silu, gelu_pytorch_tanh)")
    return ours


# The GELUs of the non-gated families: exact (erf) "gelu", and the tanh approximations under their names
# (one formula: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), written differently).
_GELUS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _gelu(hf: Mapping[str, Any], where: str, key: str, default: str) -> str:
    act = hf.get(key) or default
    if act not in _GELUS:
        raise UnsupportedConfigError(f"{where}: {key} {act!r} is not implemented ({', '.join(sorted(_GELUS))})")
    return _GELUS[act]


def _require_silu(hf: Mapping[str, Any], where: str) -> None:
    if _activation(hf, where, "hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not implemented for this family (silu)")


def _layer_types(hf: Mapping[str, Any], where: str, default: list[str]) -> tuple[str, ...] | None:
    """``layer_types`` as written, else ``default``; None when no layer slides."""
    types = hf.get("layer_types") or default
    if set(types) - {SLIDING, FULL}:
        raise UnsupportedConfigError(f"{where}: layer_types {sorted(set(types) - {SLIDING, FULL})} are not implemented")
    return tuple(types) if SLIDING in types else None


def _window(hf: Mapping[str, Any], where: str, types: tuple[str, ...] | None) -> dict[str, Any]:
    if types is None:
        return {}
    window = hf.get("sliding_window")
    if not window:
        raise UnsupportedConfigError(f"{where}: sliding layers without a sliding_window")
    return {"layer_types": types, "sliding_window": int(window)}


def _refuse(hf: Mapping[str, Any], where: str, **bad: Callable[[Any], bool]) -> None:
    """Refuse, naming the field, any ``field=predicate`` whose value the predicate flags."""
    for key, is_bad in bad.items():
        if key in hf and is_bad(hf[key]):
            raise UnsupportedConfigError(f"{where}: {key}={hf[key]!r} is not implemented")


def _read_llama(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    _refuse(hf, where, mlp_bias=bool, pretraining_tp=lambda v: v != 1)
    _require_silu(hf, where)
    return {"qkv_bias": bool(hf.get("attention_bias", False))}


def _read_mistral(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    # Mistral's window (v0.1: 4096) applies to every layer; layer_types belongs to other classes;
    # transformers' Mistral has no q/k/v biases, whatever attention_bias says.
    _refuse(hf, where, layer_types=lambda v: v is not None, attention_bias=bool)
    kwargs = _read_llama(hf, where)
    n = int(hf["num_hidden_layers"])
    return {**kwargs, **_window(hf, where, (SLIDING,) * n if hf.get("sliding_window") else None)}


def _qwen_windows(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Qwen2/Qwen3: with ``use_sliding_window``, layers from ``max_window_layers`` on slide."""
    n = int(hf["num_hidden_layers"])
    on = bool(hf.get("use_sliding_window", False)) and hf.get("sliding_window") is not None
    start = int(hf.get("max_window_layers", n))
    default = [SLIDING if on and i >= start else FULL for i in range(n)]
    types = _layer_types(hf, where, default) if on else None
    return _window(hf, where, types)


def _read_qwen2(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    _require_silu(hf, where)
    return {"qkv_bias": True, **_qwen_windows(hf, where)}


def _read_qwen3(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    _require_silu(hf, where)
    # attention_bias in Qwen3 would add an o_proj bias too, which the checkpoint check would report.
    return {"qkv_bias": bool(hf.get("attention_bias", False)), "qk_norm": "head", **_qwen_windows(hf, where)}


def _read_gemma(hf: Mapping[str, Any], where: str, *, pattern: int, qk_norm: bool) -> dict[str, Any]:
    """Gemma 2 (``pattern`` 2: every other layer slides, from the first) and Gemma 3 text (6: five sliding
    layers, then a global one; ``sliding_window_pattern`` in older configs)."""
    _refuse(hf, where, attention_bias=bool, use_bidirectional_attention=bool)
    n = int(hf["num_hidden_layers"])
    pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or pattern)
    default = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    kwargs: dict[str, Any] = dict(
        norm_plus_one=True, post_norms=True, embed_scale=True, qk_norm="head" if qk_norm else None,
        mlp_activation=_activation(hf, where, "hidden_activation", "gelu_pytorch_tanh"),
        query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=float(hf["attn_logit_softcapping"]) if hf.get("attn_logit_softcapping") else None,
        final_softcap=float(hf["final_logit_softcapping"]) if hf.get("final_logit_softcapping") else None,
        **_window(hf, where, _layer_types(hf, where, default)),
    )
    if hf.get("hidden_act") not in (None, "gelu_pytorch_tanh"):  # Gemma 2 configs carry both names
        raise UnsupportedConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not implemented")
    return kwargs


def _read_gemma3(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    kwargs = _read_gemma(hf, where, pattern=6, qk_norm=True)
    params = hf.get("rope_parameters") or {}
    if SLIDING in params:  # transformers 5: rope parameters per layer type
        local = dict(params[SLIDING])
        if local.get("rope_type", "default") != "default":
            raise UnsupportedConfigError(f"{where}: rope_parameters.{SLIDING} of type {local['rope_type']!r} "
                                         "is not implemented (only default)")
        kwargs["local_rope_theta"] = float(local.get("rope_theta", 10000.0))
    else:
        kwargs["local_rope_theta"] = float(hf.get("rope_local_base_freq", 10000.0))
    return kwargs


def _read_olmo2(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """OLMo 2: no input norms; the attention and MLP outputs are normalised before the residual add; q/k
    normalised over the whole projection; norms scale in float32."""
    _require_silu(hf, where)
    _refuse(hf, where, attention_bias=bool)  # would add an o_proj bias too
    return {"qk_norm": "width", "pre_norms": False, "post_norms": True, "norm_float32_scale": True}


def _read_phi3(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Phi-3 / Phi-3.5 / Phi-4-mini: Llama's blocks with fused projections (the key map), partial rotary
    (``partial_rotary_factor``, top level or in ``rope_parameters``), longrope scaling (read with the shared
    rope keys) and one sliding window on every layer when ``sliding_window`` is set."""
    _require_silu(hf, where)
    head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))
    factor = float((hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    rotary = int(head_dim * factor)
    n = int(hf["num_hidden_layers"])
    return {"rotary_dim": None if rotary == head_dim else rotary,
            **_window(hf, where, (SLIDING,) * n if hf.get("sliding_window") else None)}


def _rotary(hf: Mapping[str, Any], factor: float) -> int | None:
    """``rotary_dim`` for a rotary fraction of each head (None: the whole head)."""
    head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))
    rotary = int(head_dim * factor)
    return None if rotary == head_dim else rotary


_NON_GATED_LAYERNORM = {"norm_type": "layernorm", "mlp_gated": False}


def _read_gpt_neox(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """GPT-NeoX / Pythia: LayerNorms, parallel (or sequential) residual, partial rotary (``rotary_pct``, or
    ``partial_rotary_factor`` in rope_parameters), fused per-head q/k/v, non-gated GELU MLP with biases;
    ``attention_bias`` puts biases on q/k/v and the output projection."""
    params = hf.get("rope_parameters") or {}
    factor = float(params.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
    bias = bool(hf.get("attention_bias", True))
    return {**_NON_GATED_LAYERNORM, "qkv_bias": bias, "o_bias": bias, "mlp_bias": True,
            "parallel_residual": bool(hf.get("use_parallel_residual", True)), "rotary_dim": _rotary(hf, factor),
            "mlp_activation": _gelu(hf, where, "hidden_act", "gelu")}


def _prepare_gpt_neox(hf: dict[str, Any]) -> dict[str, Any]:
    # Older configs (Pythia) name the rope base rotary_emb_base.
    if "rotary_emb_base" in hf and "rope_theta" not in hf and not (hf.get("rope_parameters") or {}).get("rope_theta"):
        hf["rope_theta"] = hf["rotary_emb_base"]
    return hf


def _read_gpt2(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """GPT-2: learned absolute positions, LayerNorms, non-gated tanh-GELU MLP, biases everywhere, tied head."""
    _refuse(hf, where, scale_attn_by_inverse_layer_idx=bool, reorder_and_upcast_attn=bool, add_cross_attention=bool,
            scale_attn_weights=lambda v: not v)
    return {**_NON_GATED_LAYERNORM, "position_embedding": "learned", "qkv_bias": True, "o_bias": True,
            "mlp_bias": True, "mlp_activation": _gelu(hf, where, "activation_function", "gelu_new")}


def _prepare_gpt2(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("intermediate_size") is None:  # n_inner null: 4 x n_embd
        hf["intermediate_size"] = 4 * int(hf["hidden_size"])
    return hf


def _read_falcon(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Falcon: 7B style (``new_decoder_architecture`` false: multi-query or per-head fused q/k/v, parallel
    attention with one shared input norm, or sequential blocks) and 40B/180B style (grouped kv, ``ln_attn``
    and ``ln_mlp``); LayerNorms, rotary, non-gated GELU MLP, ``bias`` on every projection."""
    if hf.get("alibi"):
        raise UnsupportedConfigError(f"{where}: alibi=True: ALiBi is not implemented")
    _refuse(hf, where, apply_residual_connection_post_layernorm=bool)  # an old Falcon option, false on the Hub
    new = bool(hf.get("new_decoder_architecture", False))
    parallel = bool(hf.get("parallel_attn", True))
    norms = hf.get("num_ln_in_parallel_attn")
    if new:
        if norms is None:
            norms = 2
        if not parallel or int(norms) not in (1, 2):
            raise UnsupportedConfigError(f"{where}: new_decoder_architecture with parallel_attn={parallel!r} and "
                                         f"num_ln_in_parallel_attn={norms!r} is not implemented")
        shared = int(norms) == 1
    else:
        shared = parallel
    bias = bool(hf.get("bias", False))
    return {**_NON_GATED_LAYERNORM, "qkv_bias": bias, "o_bias": bias, "mlp_bias": bias,
            "parallel_residual": parallel, "shared_input_norm": shared,
            "mlp_activation": _gelu(hf, where, "activation", "gelu")}


def _prepare_falcon(hf: dict[str, Any]) -> dict[str, Any]:
    heads = int(hf["num_attention_heads"])
    if not hf.get("new_decoder_architecture"):  # the kv head count follows multi_query, whatever num_kv_heads says
        hf["num_key_value_heads"] = 1 if hf.get("multi_query", True) else heads
    if hf.get("intermediate_size") is None:  # ffn_hidden_size null: 4 x hidden_size
        hf["intermediate_size"] = 4 * int(hf["hidden_size"])
    return hf


_GEMMA_NORMS = {
    # Gemma's post_attention_layernorm normalises the attention *output*; the MLP's input norm is the
    # pre_feedforward one (in Llama, post_attention_layernorm is the MLP's input norm).
    ("mlp_norm", "scale"): "pre_feedforward_layernorm.weight",
    ("attn_post_norm", "scale"): "post_attention_layernorm.weight",
    ("mlp_post_norm", "scale"): "post_feedforward_layernorm.weight",
}
_QK_NORMS = {
    ("attn", "q_norm", "scale"): "self_attn.q_norm.weight",
    ("attn", "k_norm", "scale"): "self_attn.k_norm.weight",
}
_GEMMA_FIELDS = frozenset({"hidden_activation", "hidden_act", "query_pre_attn_scalar", "attn_logit_softcapping",
                           "final_logit_softcapping", "sliding_window", "layer_types", "attention_bias",
                           "use_bidirectional_attention", "sliding_window_pattern",
                           "_sliding_window_pattern"})
_QWEN_FIELDS = frozenset({"hidden_act", "attention_bias", "use_sliding_window", "sliding_window",
                          "max_window_layers", "layer_types"})


# --- writing: the inverse of each reader (see Family.hf_keys) ---------------------------------------------
# A writer states what its family's config.json holds for ``cfg``; it refuses only what that config.json
# cannot say at all. A switch the family does not have (a Llama with q/k norms, a Qwen3 with q/k/v biases
# but no o_proj bias) is written as the family's value and caught by the exporter's read-back check.


def _write_llama(cfg: LlamaConfig) -> dict[str, Any]:
    return {"hidden_act": "silu", "attention_bias": cfg.qkv_bias, "mlp_bias": False}


def _write_mistral(cfg: LlamaConfig) -> dict[str, Any]:
    # transformers' Mistral has no q/k/v biases (it ignores attention_bias): none are written, so a config
    # with them reads back without them and the exporter refuses it.
    sliding = cfg.sliding_layers
    if any(sliding) and not all(sliding):
        raise ValueError(f"mistral: one sliding window for every layer or none; layer_types {list(cfg.layer_types)} "
                         "mixes sliding and full layers (a Qwen2/Qwen3 config can say that)")
    return {"hidden_act": "silu", "sliding_window": cfg.sliding_window if any(sliding) else None}


def _write_qwen_windows(cfg: LlamaConfig) -> dict[str, Any]:
    sliding = cfg.sliding_layers
    if not any(sliding):
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers}
    # layer_types says which layers slide; max_window_layers (the first sliding layer) for readers without it.
    return {"use_sliding_window": True, "sliding_window": cfg.sliding_window, "max_window_layers": sliding.index(True),
            "layer_types": list(cfg.layer_types)}


def _write_qwen2(cfg: LlamaConfig) -> dict[str, Any]:
    return {"hidden_act": "silu", **_write_qwen_windows(cfg)}  # q/k/v biases are implied


def _write_qwen3(cfg: LlamaConfig) -> dict[str, Any]:
    # Qwen3's attention_bias would add an o_proj bias too, which we do not have: always False.
    return {"hidden_act": "silu", "attention_bias": False, **_write_qwen_windows(cfg)}


def _write_olmo2(cfg: LlamaConfig) -> dict[str, Any]:
    return {"hidden_act": "silu", "attention_bias": False}


def _write_phi3(cfg: LlamaConfig) -> dict[str, Any]:
    sliding = cfg.sliding_layers
    if any(sliding) and not all(sliding):
        raise ValueError("phi3: one sliding window for every layer or none")
    s = cfg.rope_scaling
    return {"hidden_act": "silu", "sliding_window": cfg.sliding_window if any(sliding) else None,
            "partial_rotary_factor": cfg.rope_dim / cfg.head_dim,
            "original_max_position_embeddings": s.original_max_position_embeddings if s is not None and
            s.kind == "longrope" else cfg.max_position_embeddings}


def _write_gelu(cfg: LlamaConfig, tanh_name: str) -> str:
    if cfg.mlp_activation == "silu":
        raise ValueError(f"{cfg.architecture}: a SiLU MLP cannot be written (its config.json names GELUs only)")
    return "gelu" if cfg.mlp_activation == "gelu" else tanh_name


def _write_gpt_neox(cfg: LlamaConfig) -> dict[str, Any]:
    # All rope settings in rope_parameters (rope_scaling is not written: transformers' GPT-NeoX config takes a
    # rope_scaling dict in place of rope_parameters, dropping the base and the rotary fraction).
    rope: dict[str, Any] = {"rope_type": "default"}
    s = cfg.rope_scaling
    if s is not None:
        if s.kind == "longrope":
            raise ValueError("gpt_neox: longrope scaling cannot be written")
        rope = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    return {"hidden_act": _write_gelu(cfg, "gelu_new"), "use_parallel_residual": cfg.parallel_residual,
            "attention_bias": cfg.qkv_bias, "rotary_pct": cfg.rope_dim / cfg.head_dim,
            "rope_parameters": {**rope, "rope_theta": cfg.rope_theta,
                                "partial_rotary_factor": cfg.rope_dim / cfg.head_dim}}


def _write_gpt2(cfg: LlamaConfig) -> dict[str, Any]:
    return {"activation_function": _write_gelu(cfg, "gelu_new"), "n_inner": cfg.intermediate_size,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False}


def _write_falcon(cfg: LlamaConfig) -> dict[str, Any]:
    new = cfg.parallel_residual and (cfg.num_kv_heads not in (1, cfg.num_heads) or not cfg.shared_input_norm)
    out = {"activation": _write_gelu(cfg, "gelu_pytorch_tanh"), "bias": cfg.qkv_bias, "alibi": False,
           "new_decoder_architecture": new, "parallel_attn": cfg.parallel_residual,
           "multi_query": cfg.num_kv_heads == 1}
    if new:
        out["num_ln_in_parallel_attn"] = 1 if cfg.shared_input_norm else 2
    return out


def _query_pre_attn_scalar(cfg: LlamaConfig) -> int:
    """Gemma's ``query_pre_attn_scalar`` (the score scale is its inverse square root): an integer in
    transformers' config classes."""
    scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim**-0.5
    scalar = round(scale**-2)
    if scalar <= 0 or float(scalar) ** -0.5 != scale:
        raise ValueError(f"{cfg.architecture}: query_scale {scale!r} is not 1 / sqrt(an integer); a Gemma config.json "
                         "stores the integer query_pre_attn_scalar = query_scale ** -2")
    return scalar


def _write_gemma(cfg: LlamaConfig) -> dict[str, Any]:
    sliding = any(cfg.sliding_layers)
    return {
        "hidden_activation": {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}[cfg.mlp_activation],
        "query_pre_attn_scalar": _query_pre_attn_scalar(cfg),
        "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap,
        # Always written: a Gemma config.json without layer_types gets the family's default pattern.
        "layer_types": list(cfg.layer_types) if cfg.layer_types else [FULL] * cfg.num_layers,
        # Unused when no layer slides, but transformers' Gemma models build a sliding mask whatever the
        # layer types, and refuse a null window.
        "sliding_window": cfg.sliding_window if sliding else cfg.sliding_window or cfg.max_position_embeddings,
        "attention_bias": False,
    }


def _write_gemma3(cfg: LlamaConfig) -> dict[str, Any]:
    # The shared rope_theta / rope_scaling are the full layers'; sliding ones take rope_local_base_freq
    # (the transformers-v4 key, which v5 converts to rope_parameters.sliding_attention), unscaled.
    local = cfg.local_rope_theta
    if local is None:  # sliding layers rope like full ones: only expressible without scaling
        if cfg.rope_scaling is not None and any(cfg.sliding_layers):
            raise ValueError("gemma3_text: sliding layers with the full layers' scaled rope (local_rope_theta None) "
                             "cannot be written; Gemma 3's sliding layers use unscaled rope_local_base_freq")
        local = cfg.rope_theta
    return {**_write_gemma(cfg), "rope_local_base_freq": local}


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), ("llama",),
           frozenset({"attention_bias", "mlp_bias", "hidden_act", "pretraining_tp"}), _read_llama,
           write=_write_llama),
    Family("mistral", ("MistralForCausalLM",), ("mistral",),
           frozenset({"attention_bias", "mlp_bias", "hidden_act", "pretraining_tp", "sliding_window",
                      "layer_types"}), _read_mistral, write=_write_mistral),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), _QWEN_FIELDS, _read_qwen2, write=_write_qwen2),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), _QWEN_FIELDS, _read_qwen3, _QK_NORMS, write=_write_qwen3),
    Family("olmo2", ("Olmo2ForCausalLM",), ("olmo2",), frozenset({"hidden_act", "attention_bias"}), _read_olmo2,
           {("attn_post_norm", "scale"): "post_attention_layernorm.weight",
            ("mlp_post_norm", "scale"): "post_feedforward_layernorm.weight", **_QK_NORMS}, write=_write_olmo2),
    Family("phi3", ("Phi3ForCausalLM",), ("phi3",),
           frozenset({"hidden_act", "sliding_window", "original_max_position_embeddings", "partial_rotary_factor"}),
           _read_phi3, write=_write_phi3),  # fused qkv / gate_up: its layout hook in loading/weights.py
    Family("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), _GEMMA_FIELDS,
           lambda hf, where: _read_gemma(hf, where, pattern=2, qk_norm=False), _GEMMA_NORMS, write=_write_gemma,
           defaults={"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    Family("gemma3_text", ("Gemma3ForCausalLM",), ("gemma3_text",), _GEMMA_FIELDS | {"rope_local_base_freq"},
           _read_gemma3, {**_GEMMA_NORMS, **_QK_NORMS}, write=_write_gemma3, defaults={"rope_theta": 1_000_000.0}),
    # The key maps of these three (fused q/k/v layouts, Conv1D orientation) are in eft_jax.loading.weights.
    Family("gpt_neox", ("GPTNeoXForCausalLM",), ("gpt_neox",),
           frozenset({"hidden_act", "use_parallel_residual", "rotary_pct", "rotary_emb_base", "attention_bias",
                      "hidden_dropout", "classifier_dropout", "is_decoder", "attention_probs_dropout_prob"}),
           _read_gpt_neox, write=_write_gpt_neox, aliases={"layer_norm_eps": "rms_norm_eps"},
           defaults={"layer_norm_eps": 1e-5},
           unwritten=frozenset({"rope_theta", "rope_scaling", "num_key_value_heads", "head_dim"}),
           top_names={("embed",): "gpt_neox.embed_in.weight", ("lm_head",): "embed_out.weight",
                      ("final_norm", "scale"): "gpt_neox.final_layer_norm.weight",
                      ("final_norm", "bias"): "gpt_neox.final_layer_norm.bias"},
           layer_prefix="gpt_neox.layers.{layer}.", base_prefix="gpt_neox.", prepare=_prepare_gpt_neox),
    Family("gpt2", ("GPT2LMHeadModel",), ("gpt2",),
           frozenset({"activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                      "reorder_and_upcast_attn", "add_cross_attention", "attn_pdrop", "summary_activation",
                      "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj",
                      "n_ctx"}),
           _read_gpt2, write=_write_gpt2,
           aliases={"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                    "n_positions": "max_position_embeddings", "n_inner": "intermediate_size",
                    "layer_norm_epsilon": "rms_norm_eps"},
           defaults={"layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
           unwritten=frozenset({"rope_theta", "rope_scaling", "num_key_value_heads", "head_dim"}),
           top_names={("embed",): "transformer.wte.weight", ("pos_embed",): "transformer.wpe.weight",
                      ("final_norm", "scale"): "transformer.ln_f.weight",
                      ("final_norm", "bias"): "transformer.ln_f.bias"},
           layer_prefix="transformer.h.{layer}.", base_prefix="transformer.", prepare=_prepare_gpt2),
    Family("falcon", ("FalconForCausalLM",), ("falcon",),
           frozenset({"activation", "alibi", "bias", "multi_query", "new_decoder_architecture", "parallel_attn",
                      "num_ln_in_parallel_attn", "hidden_dropout", "apply_residual_connection_post_layernorm"}),
           _read_falcon, write=_write_falcon,
           aliases={"ffn_hidden_size": "intermediate_size", "num_kv_heads": "num_key_value_heads",
                    "layer_norm_epsilon": "rms_norm_eps"},
           defaults={"layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
           unwritten=frozenset({"head_dim"}),
           top_names={("embed",): "transformer.word_embeddings.weight",
                      ("final_norm", "scale"): "transformer.ln_f.weight",
                      ("final_norm", "bias"): "transformer.ln_f.bias"},
           layer_prefix="transformer.h.{layer}.", base_prefix="transformer.", prepare=_prepare_falcon),
)
SUPPORTED_ARCHITECTURES = {arch: f.name for f in FAMILIES for arch in f.architectures}
_BY_NAME = {f.name: f for f in FAMILIES}


def family(name: str) -> Family:
    """The family called ``name`` (``LlamaConfig.architecture``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedConfigError(f"unknown model family {name!r}; supported: {sorted(_BY_NAME)}") from None


def family_of(hf: Mapping[str, Any], where: str) -> Family:
    """The family a ``config.json`` declares (its ``architectures``, else its ``model_type``)."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return _BY_NAME[SUPPORTED_ARCHITECTURES[arch]]
    for f in FAMILIES:
        if hf.get("model_type") in f.model_types:
            return f
    hint = (" (a multimodal Gemma 3 checkpoint: load its text model, Gemma3ForCausalLM)"
            if "Gemma3ForConditionalGeneration" in archs else "")
    raise UnsupportedConfigError(
        f"{where}: architecture {archs or hf.get('model_type')!r} is not supported{hint}; "
        f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")


def config_from_hf(hf: Mapping[str, Any], *, where: str = "config.json") -> LlamaConfig:
    """Build a ``LlamaConfig`` from a Hugging Face config dict, refusing anything not implemented.

    ``where`` names the file in error messages.
    """
    fam = family_of(hf, where)
    hf = {**fam.defaults, **hf}
    if fam.aliases:
        clash = sorted(k for k, shared in fam.aliases.items() if k in hf and shared in hf and hf[k] != hf[shared])
        if clash:
            raise UnsupportedConfigError(f"{where}: {clash} disagree with {[fam.aliases[k] for k in clash]}")
        hf = {fam.aliases.get(k, k): v for k, v in hf.items()}
    if fam.prepare is not None:
        hf = fam.prepare(dict(hf))
    unknown = sorted(k for k in hf if k not in SHARED_FIELDS | fam.fields and k not in IRRELEVANT_FIELDS)
    if unknown:
        raise UnsupportedConfigError(
            f"{where}: field(s) {unknown} are not implemented by eft_jax's {fam.name} model; refusing to "
            "load rather than silently ignoring them")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    theta, scaling = rope_settings(_global_rope(hf), where)
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
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam.name.startswith("gemma"))),
            architecture=fam.name,
            **fam.read(hf, where),
        )
    except KeyError as e:
        raise UnsupportedConfigError(f"{where}: required field {e.args[0]!r} is missing") from None


def _global_rope(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config as ``rope_settings`` reads it: transformers 5 writes per-layer-type rope parameters
    for Gemma 3 (``{"full_attention": {...}, "sliding_attention": {...}}``); the full layers' are the
    model's main ones."""
    params = hf.get("rope_parameters") or {}
    if FULL in params:
        return {**hf, "rope_parameters": params[FULL]}
    return hf
