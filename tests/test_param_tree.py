"""The parameter tree saved beside the compiled programs (``eft_jax.models.param_tree``) against the one the
Flax modules declare (``llama_nnx.param_tree``, ``nnx.eval_shape`` of the model): every leaf's path, shape,
dtype and logical axes, for configs that change the tree's form (biases, norms, tied head, learned positions,
q/k norms, int8), after a round trip through the file; and a file of another key or a broken one is a miss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import pytest

from eft_jax import compile_cache
from eft_jax.models import llama_nnx, param_tree
from eft_jax.models.config import LlamaConfig

BASE = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, max_position_embeddings=64)
VARIANTS = {
    "llama": {},
    "qwen2_bias_tied": dict(qkv_bias=True, tie_word_embeddings=True),
    "gpt2": dict(norm_type="layernorm", mlp_gated=False, o_bias=True, mlp_bias=True, position_embedding="learned",
                 qkv_bias=True),
    "olmo2_width_norms": dict(qk_norm="width", pre_norms=False, post_norms=True, norm_float32_scale=True),
    "qwen3_head_norms": dict(qk_norm="head"),
}


def leaves(abstract, axes) -> list[tuple]:
    paths = jax.tree_util.tree_leaves_with_path(abstract)
    named = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    return [(jax.tree_util.keystr(p), leaf.shape, leaf.dtype, named[p]) for p, leaf in paths]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A fresh program store, and the in-memory cache cleared so that every call reads or writes the file."""
    monkeypatch.setattr(compile_cache, "cache_dir", lambda: tmp_path)
    param_tree._trees.cache_clear()
    yield tmp_path / "eft-jax-programs"
    param_tree._trees.cache_clear()


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_tree_is_the_modules_tree(store, variant, dtype, quantize):
    cfg = dataclasses.replace(BASE, **VARIANTS[variant])
    want = leaves(*llama_nnx.param_tree(cfg, dtype, quantize))
    first = param_tree.abstract_params(cfg, dtype, quantize), param_tree.logical_axes(cfg, quantize)  # computed, saved
    assert len(list(store.glob("params-*.json"))) == (1 if dtype == "float32" else 2)  # axes come from float32
    param_tree._trees.cache_clear()
    second = param_tree.abstract_params(cfg, dtype, quantize), param_tree.logical_axes(cfg, quantize)  # read back
    assert leaves(*first) == want and leaves(*second) == want


def test_another_key_or_a_broken_file_is_a_miss(store, monkeypatch):
    param_tree.abstract_params(BASE, "float32", None)
    (path,) = store.glob("params-*.json")
    path.write_text(path.read_text().replace(param_tree.FORMAT, "another format"))
    param_tree._trees.cache_clear()
    computed = []
    monkeypatch.setattr(param_tree, "_computed", lambda *a: computed.append(a) or llama_nnx.param_tree(*a))
    assert leaves(param_tree.abstract_params(BASE, "float32", None), param_tree.logical_axes(BASE, None)) == \
        leaves(*llama_nnx.param_tree(BASE, "float32", None))
    assert len(computed) == 1  # the key did not match: computed, then rewritten
    path.write_text(path.read_text()[:50])
    param_tree._trees.cache_clear()
    param_tree.abstract_params(BASE, "float32", None)
    assert len(computed) == 2
    param_tree._trees.cache_clear()
    param_tree.abstract_params(BASE, "float32", None)
    assert len(computed) == 2  # the rewritten file is read


def test_a_new_dict_per_call(store):
    a = param_tree.abstract_params(BASE, "float32", None)
    a["layers"]["attn"].clear()
    assert param_tree.abstract_params(BASE, "float32", None)["layers"]["attn"]
