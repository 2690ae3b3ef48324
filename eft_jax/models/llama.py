"""The Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, SmolLM2, TinyLlama) as Flax NNX modules.

The modules only declare parameters (shape, initialiser and logical axes in one place) and hold the
math. Everything outside works on plain pytrees: ``init_params`` / ``abstract_params`` give a nested
dict of arrays, and ``forward`` is a pure function of (static config, params, tokens, positions, cache)
that merges the params into the module inside the traced function.

Layer weights have two layouts, and ``forward`` runs either (the choice is made in :func:`run_params`):

- **stacked** (the canonical one: loading, sharding, training, checkpoints, export): each layer leaf has a
  leading ``layers`` axis and the layers run under ``lax.scan``, so compile time does not grow with
  depth. This is what runs on accelerators and on meshes of several devices.
- **per-layer** (``params["layers"]`` a tuple of one dict per layer): a Python loop over the layers. On
  XLA:CPU a scan copies every layer's weights out of the stacked buffer before its matmuls, at every
  forward (a one-token decode step of an 853M float32 model: ~0.3 of the time to stream the weights
  once, against ~0.75 per-layer; bench/bench_cpu_decode.py). ``run_params`` gives this layout on one CPU
  device as *views* of the stacked buffers: no weight is copied and the memory is held once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from eft_jax.models.config import LlamaConfig, rope_inverse_frequencies
from eft_jax.models.kv_cache import KVCache

Params = dict[str, Any]  # nested dict of arrays, as produced by nnx.State.to_pure_dict()

# A finite "minus infinity" for masked attention scores: a row with nothing to attend to (a padding
# query) then gets a uniform average instead of NaN, and its output is never used.
_MASKED = -1e30
# run_params: the largest per-layer slice that may be copied when the runtime cannot view it.
_MAX_COPIED_BYTES = 4096


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any, scale: float | None) -> nnx.Param:
    """One parameter declaration: shape, logical axes, init (normal(0, scale), or ones/zeros)."""
    if scale is None:
        value = jnp.ones(shape, dtype)
    elif scale == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype: Any, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), ("embed",), dtype, None)
        self.eps = eps

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        # Normalise in float32, cast back, then scale: the order Hugging Face uses.
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * h.astype(x.dtype)


def apply_rope(
    x: Float[Array, "batch seq heads head_dim"], positions: Int[Array, "batch seq"], inv_freq: Float[Array, " half"]
) -> Float[Array, "batch seq heads head_dim"]:
    """Rotary embedding in the rotate-half layout of Hugging Face checkpoints (pairs (i, i + d/2))."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [b, t, d/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = d**-0.5
        self.q = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dtype, std)
        self.k = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), dtype, std)
        self.v = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), dtype, std)
        self.o = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dtype, (h * hd) ** -0.5)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), dtype, 0.0)
            self.k_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), dtype, 0.0)
            self.v_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), dtype, 0.0)
        self.qkv_bias = cfg.qkv_bias
        self.scale = hd**-0.5

    def project(
        self, x: Float[Array, "batch seq embed"], positions: Int[Array, "batch seq"], inv_freq: Float[Array, " half"]
    ) -> tuple[Array, Array, Array]:
        """Rotated queries ``[b, t, heads, hd]`` and keys, plus values ``[b, t, kv_heads, hd]``."""
        q = jnp.einsum("btd,dhk->bthk", x, self.q[...])
        k = jnp.einsum("btd,dhk->bthk", x, self.k[...])
        v = jnp.einsum("btd,dhk->bthk", x, self.v[...])
        if self.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend(
        self,
        q: Float[Array, "batch seq heads head_dim"],
        keys: Float[Array, "batch slots kv_heads head_dim"],
        values: Float[Array, "batch slots kv_heads head_dim"],
        valid: Bool[Array, "batch seq slots"],
    ) -> Float[Array, "batch seq embed"]:
        """Grouped-query attention of ``q`` over ``keys``/``values`` where ``valid``; scores in float32."""
        b, t, h, hd = q.shape
        kv_heads = keys.shape[2]
        qg = q.reshape(b, t, kv_heads, h // kv_heads, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=jnp.float32) * self.scale
        scores = jnp.where(valid[:, None, None, :, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, h, hd)
        return jnp.einsum("bthk,hkd->btd", out, self.o[...])


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), dtype, d**-0.5)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), dtype, d**-0.5)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), dtype, f**-0.5)

    def __call__(self, x: Float[Array, "batch seq embed"]) -> Float[Array, "batch seq embed"]:
        return (jax.nn.silu(x @ self.gate[...]) * (x @ self.up[...])) @ self.down[...]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def finish(self, x: Float[Array, "batch seq embed"], attn_out: Float[Array, "batch seq embed"]) -> Array:
        """Residual add of the attention output, then the MLP block."""
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """A causal LM: embedding, ``num_layers`` stacked decoder layers, final norm, LM head."""

    def __init__(self, cfg: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, 1.0)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, dtype=dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype, cfg.hidden_size**-0.5)

    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"],
        cache: KVCache | None,
        logits_at: Int[Array, "batch n"] | None,
        layers: Params | tuple[Params, ...],
    ) -> tuple[Float[Array, "batch seq_or_n vocab"], KVCache | None]:
        """``layers``: the layer weights, stacked or per layer (``self.layers`` only gives their structure)."""
        cfg = self.config
        inv_freq = jnp.asarray(np.asarray(rope_inverse_frequencies(cfg), np.float32))
        x = jnp.take(self.embed[...], tokens, axis=0)
        over_layers = functools.partial(_over_layers, nnx.graphdef(self.layers), layers)

        if cache is None:
            causal = (positions[:, None, :] <= positions[:, :, None]) & (positions[:, None, :] >= 0)

            def body(h, layer):
                q, k, v = layer.attn.project(layer.attn_norm(h), positions, inv_freq)
                return layer.finish(h, layer.attn.attend(q, k, v, causal))

            x = over_layers(body, x)
            new_cache = None
        else:
            # Slot bookkeeping is shared by all layers. New keys/values are scattered straight into the
            # full cache buffers carried by the scan (an in-place update), then the layer's slice is read.
            rows = jnp.arange(tokens.shape[0])[:, None]
            slots = cache.length[:, None] + jnp.arange(tokens.shape[1])[None, :]
            pos = cache.pos.at[rows, slots].set(positions, mode="drop")
            length = cache.length + tokens.shape[1]
            slot_ids = jnp.arange(cache.num_slots)
            valid = (
                (slot_ids[None, None, :] < length[:, None, None])
                & (pos[:, None, :] >= 0)
                & (pos[:, None, :] <= positions[:, :, None])
            )

            def body(carry, layer):
                h, k_all, v_all, i = carry
                q, k, v = layer.attn.project(layer.attn_norm(h), positions, inv_freq)
                k_all = k_all.at[i, rows, slots].set(k.astype(k_all.dtype), mode="drop")
                v_all = v_all.at[i, rows, slots].set(v.astype(v_all.dtype), mode="drop")
                h = layer.finish(h, layer.attn.attend(q, k_all[i], v_all[i], valid))
                return h, k_all, v_all, i + 1

            x, k_all, v_all, _ = over_layers(body, (x, cache.k, cache.v, 0))
            new_cache = KVCache(k=k_all, v=v_all, pos=pos, length=length)

        if logits_at is not None:
            # Only these columns need logits (e.g. the last prompt token): the LM head over the whole
            # sequence would cost batch x seq x vocab floats.
            x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
        x = self.final_norm(x)
        head = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)
        return logits, new_cache


def _over_layers(layer_def: nnx.GraphDef, layers: Params | tuple[Params, ...], body: Any, carry: Any) -> Any:
    """``carry = body(carry, layer)`` for each decoder layer in turn: a Python loop over per-layer
    buffers (``layers`` a tuple), or ``lax.scan`` over stacked ones (the layer index in ``carry`` is then
    traced; in the loop it stays a Python int, so cache writes are static-index updates in place)."""
    if isinstance(layers, tuple):
        for p in layers:
            carry = body(carry, nnx.merge(layer_def, p))
        return carry
    return jax.lax.scan(lambda c, p: (body(c, nnx.merge(layer_def, p)), None), carry, layers)[0]


@functools.lru_cache(maxsize=None)
def _graphdef_and_abstract(cfg: LlamaConfig, dtype_name: str) -> tuple[nnx.GraphDef, nnx.State]:
    model = nnx.eval_shape(lambda: Llama(cfg, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0)))
    return nnx.split(model)


def abstract_params(cfg: LlamaConfig, dtype: Any = jnp.float32) -> Params:
    """The params pytree as ``jax.ShapeDtypeStruct`` leaves (no memory allocated)."""
    return _graphdef_and_abstract(cfg, jnp.dtype(dtype).name)[1].to_pure_dict()


def param_logical_axes(cfg: LlamaConfig) -> Params:
    """The params pytree with a tuple of logical axis names per leaf (stacked layers get "layers")."""
    state = _graphdef_and_abstract(cfg, "float32")[1]
    axes = jax.tree.map(
        lambda v: tuple(v.get_metadata()["logical_axes"]), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    pure = nnx.State(axes).to_pure_dict() if not isinstance(axes, dict) else axes
    abstract = abstract_params(cfg)
    return jax.tree.map(
        lambda a, s: ("layers",) * (len(s.shape) - len(a)) + a, pure, abstract, is_leaf=lambda x: isinstance(x, tuple)
    )


def init_params(cfg: LlamaConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (for training from scratch and tests)."""
    model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(params=key))
    return nnx.state(model, nnx.Param).to_pure_dict()


def forward(
    cfg: LlamaConfig,
    params: Params,
    tokens: Int[Array, "batch seq"],
    positions: Int[Array, "batch seq"],
    cache: KVCache | None = None,
    logits_at: Int[Array, "batch n"] | None = None,
) -> tuple[Float[Array, "batch seq_or_n vocab"], KVCache | None]:
    """Logits (float32, padded vocab) for ``tokens`` at ``positions`` (-1 marks padding).

    With a cache, the new tokens' keys/values are written at each row's ``cache.length`` and they attend
    to everything already cached at positions <= their own; the updated cache is returned. Without a
    cache, tokens attend causally to each other. ``logits_at`` (column indices per row) restricts the
    output to those columns: ``[batch, n, vocab]``. Pure: call it under ``jax.jit`` with ``cfg`` static.
    """
    graphdef, abstract = _graphdef_and_abstract(cfg, "float32")
    # The module gets the stacked layers' shapes only; their buffers, in either layout, go in as ``layers``.
    model = nnx.merge(graphdef, {**params, "layers": abstract.to_pure_dict()["layers"]})
    return model(tokens, positions, cache, logits_at, params["layers"])


def run_params(params: Params) -> Params:
    """``params`` in the layout ``forward`` runs fastest with where they are (see the module docstring).

    Stacked params on one CPU device come back with per-layer layer weights that are zero-copy views of
    the stacked buffers (which they keep alive); anything else comes back as it is. The runtime views
    only 64-byte aligned slices and copies others: copies of under ``_MAX_COPIED_BYTES`` per layer (a
    bias or norm of a tiny model) are accepted, a larger one keeps the stacked params, so the weights
    are never held twice.
    """
    layers = params["layers"]
    if isinstance(layers, tuple) or any(len(x.devices()) != 1 or x.platform() != "cpu" for x in jax.tree.leaves(layers)):
        return params
    per_layer = tuple({} for _ in range(jax.tree.leaves(layers)[0].shape[0]))
    for path, x in jax.tree_util.tree_leaves_with_path(layers):
        host = np.asarray(x)  # on CPU: the device buffer itself (read-only), not a copy
        sharding = NamedSharding(x.sharding.mesh, PartitionSpec()) if isinstance(x.sharding, NamedSharding) else x.sharding
        for i, layer in enumerate(per_layer):
            view = jax.device_put(host[i], sharding)
            if view.unsafe_buffer_pointer() != x.unsafe_buffer_pointer() + i * view.nbytes and view.nbytes >= _MAX_COPIED_BYTES:
                return params
            _set(layer, [k.key for k in path], view)
    return {**params, "layers": per_layer}


def _set(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
