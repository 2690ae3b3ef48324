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


def param_shardings(cfg: LlamaConfig, mesh: Mesh, rules: ShardingRules, quantize: str | None = None
                    ) -> dict[str, Any]:
    """NamedSharding per params leaf under ``rules`` (``quantize``: of the quantized params, scales included)."""
    return tree_shardings(llama.param_logical_axes(cfg, quantize), llama.abstract_params(cfg, quantize=quantize),
                          rules, mesh)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _full_logits(cfg: LlamaConfig, params: Any, vocab: int, tokens: Array) -> Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = llama.forward(cfg, params, tokens, positions)
    return logits[..., :vocab]


@functools.lru_cache(maxsize=64)
def _cache_builder(layout: CacheLayout):
    """A compiled zero-cache constructor per layout (jit of a fresh lambda would recompile every batch)."""
    return jax.jit(layout.zeros)


class Model:
    """A causal LM ready to run: config, weights already in their shardings, tokenizer, mesh and rules.

    ``params`` is the canonical stacked layout (what is saved, trained, exported and inspected);
    ``run_params`` holds the same weights in the layout the forward runs fastest with here. Pass
    ``run_params`` to ``llama.forward``.

    On one CPU device ``run_params`` is the contraction-minor per-layer layout (``llama.run_params(...,
    transpose=True)``: ~1.1x faster decoding than the canonical layout at batch 1, ~1.7x at batch 8),
    given so by the loader (``params`` with per-layer ``layers``) or built on first use, and the weights
    are not held twice: the model then drops its stacked copy, and
    ``params`` rebuilds the canonical layout from ``run_params`` on each access (a copy of the weights that
    lives as long as the caller keeps it; saving or training reads it once). Elsewhere ``run_params`` is
    ``params`` itself.
    """

    def __init__(self, config: LlamaConfig, params: dict[str, Any], tokenizer: Any, mesh: Mesh,
                 rules: ShardingRules, source: str, end_token_ids: tuple[int, ...] = ()):
        self.config = config
        self.tokenizer = tokenizer  # loading.tokenizer_json.TokenizerJson or a transformers tokenizer; None: none
        self.mesh = mesh
        self.rules = rules
        self.source = source
        self.end_token_ids = tuple(end_token_ids)  # end tokens the checkpoint declares (vocab.end_token_ids)
        # The weights as held: the stacked params until the CPU run layout replaces them (see run_params), or
        # the run layout from the start (params given per layer: the loader builds it directly on one CPU device).
        per_layer = isinstance(params["layers"], tuple)
        self._stacked: dict[str, Any] | None = None if per_layer else params
        self._run: dict[str, Any] | None = params if per_layer else None

    def replace(self, **changes: Any) -> Model:
        """A new model with some fields changed (``params`` given in any layout is taken as it is)."""
        fields = dict(config=self.config, params=self._held(), tokenizer=self.tokenizer, mesh=self.mesh,
                      rules=self.rules, source=self.source, end_token_ids=self.end_token_ids)
        return Model(**{**fields, **changes})

    @property
    def params(self) -> dict[str, Any]:
        """The canonical stacked params: the held ones, or a copy rebuilt from the CPU run layout."""
        return llama.stacked_params(self._held())

    @property
    def run_params(self) -> dict[str, Any]:
        if self._run is None:
            params = self._stacked
            if _on_one_cpu_device(params):
                # Convert our own copy of the tree structure leaf by leaf, releasing each stacked leaf as it
                # goes: the weights are held twice at most one leaf at a time (when nothing else holds them).
                self._stacked = None
                self._run = llama.run_params(jax.tree.map(lambda x: x, params), transpose=True, consume=True)
            else:
                self._run = llama.run_params(params)
        return self._run

    @property
    def vocab_size(self) -> int:
        """Real vocabulary size: the tokenizer's, without the padding rows of the embedding."""
        if self.tokenizer is None:
            return self.config.vocab_size
        return min(len(self.tokenizer), self.config.vocab_size)

    @property
    def dtype(self) -> jnp.dtype:
        return self._held()["embed"].dtype

    @property
    def quantize(self) -> str | None:
        """"int8" when the layers' projections are int8 (``load_model(..., quantize="int8")``), else None."""
        return llama.params_quantize(self._held())

    @property
    def weight_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self._held()))

    def _held(self) -> dict[str, Any]:
        """The weights as held now, in either layout (no copy)."""
        return self._stacked if self._stacked is not None else self._run

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


def _on_one_cpu_device(params: dict[str, Any]) -> bool:
    leaves = jax.tree.leaves(params["layers"])
    return not isinstance(params["layers"], tuple) and all(
        len(x.devices()) == 1 and x.platform() == "cpu" for x in leaves)
