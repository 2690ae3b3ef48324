"""A loaded model: config, params placed on a mesh, tokenizer, and convenience methods around them."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Float, Int

from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.models.kv_cache import CACHE_LOGICAL_AXES, CacheLayout, KVCache
from eft_jax.sharding import ShardingRules, logical_to_spec, tree_shardings


def param_shardings(cfg: LlamaConfig, mesh: Mesh, rules: ShardingRules) -> dict[str, Any]:
    """NamedSharding per params leaf under ``rules``."""
    return tree_shardings(llama.param_logical_axes(cfg), llama.abstract_params(cfg), rules, mesh)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _full_logits(cfg: LlamaConfig, params: Any, vocab: int, tokens: Array) -> Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = llama.forward(cfg, params, tokens, positions)
    return logits[..., :vocab]


@functools.lru_cache(maxsize=64)
def _cache_builder(layout: CacheLayout):
    """A compiled zero-cache constructor per layout (jit of a fresh lambda would recompile every batch)."""
    return jax.jit(layout.zeros)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A causal LM ready to run: ``params`` is a plain pytree of arrays already in their shardings.

    ``params`` has the canonical stacked layout (what is saved, trained, exported and inspected);
    ``run_params`` holds the same weights in the layout the forward runs fastest with here, without a
    second copy (``llama.run_params``: per-layer views on one CPU device, else ``params`` itself). Pass
    ``run_params`` to ``llama.forward``.
    """

    config: LlamaConfig
    params: dict[str, Any]
    tokenizer: Any  # transformers.PreTrainedTokenizerBase, or None for a checkpoint without one
    mesh: Mesh
    rules: ShardingRules
    source: str

    @functools.cached_property
    def run_params(self) -> dict[str, Any]:
        return llama.run_params(self.params)

    @property
    def vocab_size(self) -> int:
        """Real vocabulary size: the tokenizer's, without the padding rows of the embedding."""
        if self.tokenizer is None:
            return self.config.vocab_size
        return min(len(self.tokenizer), self.config.vocab_size)

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["embed"].dtype

    @property
    def weight_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.params))

    def cache_layout(self, batch: int, slots: int) -> CacheLayout:
        """The static description of an empty cache of ``slots`` positions per row, with its shardings."""
        cfg = self.config
        layout = CacheLayout(num_layers=cfg.num_layers, batch=batch, slots=slots, num_kv_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, dtype=jnp.dtype(self.dtype).name)
        abstract = jax.eval_shape(layout.zeros)
        shardings = tree_shardings(CACHE_LOGICAL_AXES, abstract, self.rules, self.mesh)
        return dataclasses.replace(layout, shardings=(shardings.k, shardings.v, shardings.pos, shardings.length))

    def init_cache(self, batch: int, slots: int) -> KVCache:
        """An empty cache of ``slots`` positions per row, created directly in its shardings."""
        return _cache_builder(self.cache_layout(batch, slots))()

    def logits(self, tokens: Int[Array, "batch seq"] | np.ndarray) -> Float[Array, "batch seq vocab"]:
        """Full-sequence float32 logits ``[batch, seq, vocab_size]`` (positions 0..seq-1, no padding)."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got {tokens.min()}..{tokens.max()}")
        spec = logical_to_spec(("batch", "seq"), tokens.shape, self.rules, self.mesh)
        # From a callback, so that each process of a multi-host mesh places only its own slices.
        tokens_on_mesh = jax.make_array_from_callback(tokens.shape, NamedSharding(self.mesh, spec), lambda i: tokens[i])
        return _full_logits(self.config, self.run_params, self.vocab_size, tokens_on_mesh)
