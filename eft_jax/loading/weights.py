"""Hugging Face tensor names -> our params pytree, placed tensor by tensor into target shardings.

Each leaf of the params pytree is built with ``jax.make_array_from_callback``: every device asks for
its own slice, and the callback reads only the checkpoint tensors (layers) that slice needs, converts
their layout and cuts the slice. No full copy of the model exists on one device or on the host; the
largest host buffer is one tensor of one layer.

Before anything is read, every checkpoint key is accounted for: missing, unexpected and mis-shaped
tensors are reported together, each with its name and both shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from eft_jax.loading.source import CheckpointError, TensorSource
from eft_jax.models.config import LlamaConfig
from eft_jax.models.families import family

# Tensors some checkpoints carry that hold no parameters (buffers saved by old transformers versions).
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one leaf of our params is made: from which HF tensor(s), with which layout change.

    ``hf_name`` has ``{layer}`` for stacked leaves; ``hf_shape`` is the shape expected on disk and
    ``to_ours`` maps a disk tensor (one layer) to our layout.
    """

    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    stacked: bool


def weight_rules(cfg: LlamaConfig) -> list[TensorRule]:
    """The mapping for ``cfg``'s family (our leaf path, HF name, HF shape, layout conversion): Llama's
    names, with the family's own where it has them (``eft_jax.models.families.Family.tensor_names``)."""
    d, f, h, k, hd, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    same = lambda x: x  # noqa: E731
    transpose = lambda x: x.T  # noqa: E731

    def heads_in(n: int) -> Callable[[np.ndarray], np.ndarray]:  # [n*hd, d] -> [d, n, hd]
        return lambda x: x.reshape(n, hd, d).transpose(2, 0, 1)

    def bias(n: int) -> Callable[[np.ndarray], np.ndarray]:  # [n*hd] -> [n, hd]
        return lambda x: x.reshape(n, hd)

    # Per layer: our path (under "layers") -> (Llama's name, HF shape, conversion).
    layer: dict[tuple[str, ...], tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]] = {
        ("attn_norm", "scale"): ("input_layernorm.weight", (d,), same),
        ("mlp_norm", "scale"): ("post_attention_layernorm.weight", (d,), same),
        ("attn", "q"): ("self_attn.q_proj.weight", (h * hd, d), heads_in(h)),
        ("attn", "k"): ("self_attn.k_proj.weight", (k * hd, d), heads_in(k)),
        ("attn", "v"): ("self_attn.v_proj.weight", (k * hd, d), heads_in(k)),
        ("attn", "o"): ("self_attn.o_proj.weight", (d, h * hd), lambda x: x.reshape(d, h, hd).transpose(1, 2, 0)),
        ("mlp", "gate"): ("mlp.gate_proj.weight", (f, d), transpose),
        ("mlp", "up"): ("mlp.up_proj.weight", (f, d), transpose),
        ("mlp", "down"): ("mlp.down_proj.weight", (d, f), transpose),
    }
    if cfg.qkv_bias:
        layer[("attn", "q_bias")] = ("self_attn.q_proj.bias", (h * hd,), bias(h))
        layer[("attn", "k_bias")] = ("self_attn.k_proj.bias", (k * hd,), bias(k))
        layer[("attn", "v_bias")] = ("self_attn.v_proj.bias", (k * hd,), bias(k))
    if cfg.qk_norm == "head":
        layer[("attn", "q_norm", "scale")] = ("", (hd,), same)
        layer[("attn", "k_norm", "scale")] = ("", (hd,), same)
    if cfg.qk_norm == "width":  # [n*hd] -> [n, hd]
        layer[("attn", "q_norm", "scale")] = ("", (h * hd,), bias(h))
        layer[("attn", "k_norm", "scale")] = ("", (k * hd,), bias(k))
    if not cfg.pre_norms:
        del layer[("attn_norm", "scale")], layer[("mlp_norm", "scale")]
    if cfg.post_norms:
        layer[("attn_post_norm", "scale")] = ("", (d,), same)
        layer[("mlp_post_norm", "scale")] = ("", (d,), same)
    fam = family(cfg.architecture)
    if fam.fused_projections:  # row blocks of one fused tensor, read once per leaf
        def rows(start: int, stop: int, then: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
            return lambda x: then(x[start:stop])

        qkv, gate_up = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"
        layer[("attn", "q")] = (qkv, ((h + 2 * k) * hd, d), rows(0, h * hd, heads_in(h)))
        layer[("attn", "k")] = (qkv, ((h + 2 * k) * hd, d), rows(h * hd, (h + k) * hd, heads_in(k)))
        layer[("attn", "v")] = (qkv, ((h + 2 * k) * hd, d), rows((h + k) * hd, (h + 2 * k) * hd, heads_in(k)))
        layer[("mlp", "gate")] = (gate_up, (2 * f, d), rows(0, f, transpose))
        layer[("mlp", "up")] = (gate_up, (2 * f, d), rows(f, 2 * f, transpose))
    names = fam.tensor_names
    L = "model.layers.{layer}."
    rules = [
        TensorRule(("embed",), "model.embed_tokens.weight", (v, d), same, False),
        TensorRule(("final_norm", "scale"), "model.norm.weight", (d,), same, False),
    ]
    for path, (name, shape, convert) in layer.items():
        name = names.get(path, name)
        if not name:
            raise ValueError(f"family {cfg.architecture!r} names no checkpoint tensor for layers.{'.'.join(path)}")
        rules.append(TensorRule(("layers", *path), L + name, shape, convert, True))
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule(("lm_head",), "lm_head.weight", (v, d), transpose, False))
    return rules


def _names(rule: TensorRule, num_layers: int) -> list[str]:
    return [rule.hf_name.format(layer=i) for i in range(num_layers)] if rule.stacked else [rule.hf_name]


def check_keys(cfg: LlamaConfig, source: TensorSource, rules: list[TensorRule]) -> None:
    """Raise one ``CheckpointError`` listing every missing, unexpected or mis-shaped tensor."""
    present = set(source.keys())
    expected: set[str] = set()
    problems: list[str] = []
    for rule in rules:
        for name in _names(rule, cfg.num_layers):
            expected.add(name)
            if name not in present:
                problems.append(f"missing tensor {name} (expected shape {rule.hf_shape})")
            elif tuple(source.shape(name)) != rule.hf_shape:
                problems.append(
                    f"tensor {name} in {source.location(name)} has shape {tuple(source.shape(name))}, "
                    f"expected {rule.hf_shape} from the config"
                )
    tied_head = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # a redundant copy of the embedding
    for name in sorted(present - expected - tied_head):
        if not name.endswith(_IGNORABLE_SUFFIXES):
            problems.append(f"unexpected tensor {name} in {source.location(name)}, shape {tuple(source.shape(name))}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"checkpoint does not match its config ({len(problems)} problem(s)):\n  {shown}")


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def place_weights(
    cfg: LlamaConfig,
    source: TensorSource,
    shardings: dict[str, Any],
    dtype: Any,
) -> dict[str, Any]:
    """Build the params pytree on device, each leaf assembled shard by shard from ``source``."""
    rules = weight_rules(cfg)
    check_keys(cfg, source, rules)
    params: dict[str, Any] = {}
    for rule in rules:
        sharding = shardings
        for key in rule.path:
            sharding = sharding[key]
        _set_path(params, rule.path, _place_leaf(cfg, source, rule, sharding, np.dtype(dtype)))
    return params


def _place_leaf(cfg: LlamaConfig, source: TensorSource, rule: TensorRule, sharding: Any, dtype: np.dtype) -> jax.Array:
    names = _names(rule, cfg.num_layers)
    one = rule.to_ours(np.empty(rule.hf_shape, np.uint8)).shape  # layout of one layer, without reading
    shape = ((cfg.num_layers,) if rule.stacked else ()) + one
    # Devices holding the same slice (replicas) ask one after another: keep only the last slice served,
    # so no more than one shard of this leaf is ever on the host.
    last: dict[tuple, np.ndarray] = {}

    def read_one(name: str) -> np.ndarray:
        return rule.to_ours(np.asarray(source.read(name))).astype(dtype)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in last:
            last.clear()
            if rule.stacked:
                layers = range(cfg.num_layers)[index[0]]
                last[key] = np.stack([read_one(names[i])[index[1:]] for i in layers])
            else:
                last[key] = read_one(names[0])[index]
        return last[key]

    return jax.make_array_from_callback(shape, sharding, shard)
