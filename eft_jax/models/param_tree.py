"""A config's parameter tree (every leaf's shape, dtype and logical axes) without building the Flax module.

The tree comes from the modules themselves (:func:`eft_jax.models.llama_nnx.param_tree`: ``nnx.eval_shape`` of
the model, ~0.1 s a config plus flax's ~0.3 s import). The memory plan needs it before a job loads anything,
so a warm job that runs only saved programs would import flax for this alone. It is therefore also saved
beside the compiled programs (:func:`eft_jax.programs.store_dir`: on and off with the compile cache), one JSON
file per (config, dtype, quantize), under a key of the same kind as a program's: the config's ``repr`` (a frozen
dataclass: every field), the dtype and quantization, and the digest of eft-jax's source and flax's version
(the modules decide the tree). A file with another key or that cannot be read is a miss; a miss computes the
tree and rewrites the file. With the store off, the tree is computed (once per process: cached in memory).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from eft_jax.models.config import LlamaConfig

FORMAT = "eft-jax param tree v1"  # bump when the file layout changes

Params = dict[str, Any]  # nested dict of arrays (or of their shapes / axes), as nnx.State.to_pure_dict() gives


def abstract_params(cfg: LlamaConfig, dtype_name: str, quantize: str | None) -> Params:
    """The params pytree as ``jax.ShapeDtypeStruct`` leaves in ``dtype_name`` (a new dict per call)."""
    return _copy(_trees(cfg, dtype_name, quantize)[0])


def logical_axes(cfg: LlamaConfig, quantize: str | None) -> Params:
    """The params pytree with a tuple of logical axis names per leaf (a new dict per call)."""
    return _copy(_trees(cfg, "float32", quantize)[1])


@functools.lru_cache(maxsize=None)
def _trees(cfg: LlamaConfig, dtype_name: str, quantize: str | None) -> tuple[Params, Params]:
    from eft_jax import programs

    store = programs.store_dir()
    if store is None:
        return _computed(cfg, dtype_name, quantize)
    key = "\n".join([FORMAT, f"eft_jax source: {programs.source_digest()}", f"flax: {programs.package_version('flax')}",
                     f"config: {cfg!r}", f"dtype: {dtype_name}", f"quantize: {quantize}"])
    path = store / f"params-{hashlib.sha256(key.encode()).hexdigest()}.json"
    loaded = _read(path, key)
    if loaded is not None:
        return loaded
    trees = _computed(cfg, dtype_name, quantize)
    try:
        programs.write_atomically(path, _encoded(key, trees))
    except OSError:
        pass  # not saved: computed again next time
    return trees


def _computed(cfg: LlamaConfig, dtype_name: str, quantize: str | None) -> tuple[Params, Params]:
    from eft_jax.models import llama_nnx

    return llama_nnx.param_tree(cfg, dtype_name, quantize)


def _read(path: Path, key: str) -> tuple[Params, Params] | None:
    try:
        saved = json.loads(path.read_text())
        if saved["key"] != key:
            return None
        abstract: Params = {}
        axes: Params = {}
        for keys, shape, dtype, names in saved["leaves"]:
            set_path(abstract, keys, jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)))
            set_path(axes, keys, tuple(names))
        return abstract, axes
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or unreadable: computed and rewritten


def _encoded(key: str, trees: tuple[Params, Params]) -> bytes:
    abstract, axes = trees
    leaves = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        keys = [k.key for k in path]
        leaves.append([keys, list(leaf.shape), leaf.dtype.name, list(get_path(axes, keys))])
    return json.dumps({"key": key, "leaves": leaves}).encode()


def _copy(tree: Params) -> Params:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def get_path(tree: Params, keys: list[str]) -> Any:
    """The value at ``keys`` (a path of dict keys) in a nested dict."""
    for key in keys:
        tree = tree[key]
    return tree


def set_path(tree: Params, keys: list[str], value: Any) -> None:
    """Put ``value`` at ``keys`` in a nested dict, creating the dicts on the way."""
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
