"""The Flax NNX modules of :mod:`eft_jax.models.llama`: parameter declarations (shape, initialiser and logical
axes in one place) and the math, plus what needs them (``forward``'s merge of params into the module, random
init, the abstract parameter tree). Imported on first use, not by :mod:`eft_jax.models.llama` itself: flax takes
~0.3 s to import, and a process that runs only saved programs (:mod:`eft_jax.programs`) with a saved parameter
tree (:mod:`eft_jax.models.param_tree`) never needs it.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from eft_jax.models.attention import attention
from eft_jax.models.config import LlamaConfig
from eft_jax.models.kv_cache import KVCache
from eft_jax.models.llama import (
    MinorLayers,
    Params,
    _dense,
    _dense_minor,
    _dot,
    _layer_kinds,
    _take_rows,
    apply_rope,
    params_quantize,
)
from eft_jax.models.quant import QUANTIZED, scale_path


def _import_nnx() -> Any:
    """``flax.nnx``, without the IPython import it makes to ask whether it runs in a notebook (to colour its
    reprs): ~0.4 s of a job's start-up where IPython is installed. IPython not imported yet means this
    process is no IPython session, so the answer (no) is the same without asking."""
    if "IPython" in sys.modules:
        from flax import nnx
        return nnx
    sys.modules["IPython"] = None  # type: ignore[assignment]  # `import IPython` raises ImportError
    try:
        from flax import nnx
    finally:
        if sys.modules.get("IPython", 0) is None:
            del sys.modules["IPython"]
    return nnx


nnx = _import_nnx()


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
    """RMS normalisation over the last axis, scaled by ``w`` or, with ``plus_one`` (Gemma), by ``1 + w``."""

    def __init__(self, shape: tuple[int, ...], eps: float, *, dtype: Any, rngs: nnx.Rngs, plus_one: bool = False,
                 float32_scale: bool = False, axes: tuple[str, ...] = ("embed",)):
        self.scale = _param(rngs, shape, axes, dtype, 0.0 if plus_one else None)
        self.eps = eps
        self.plus_one = plus_one
        self.float32_scale = float32_scale or plus_one

    def __call__(self, x: Float[Array, "... *dims"]) -> Float[Array, "... *dims"]:
        """Normalised over the trailing axes that ``scale`` covers (one axis, or heads x head_dim)."""
        axes = tuple(range(-self.scale.ndim, 0))
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=axes, keepdims=True) + self.eps)
        if self.float32_scale:  # Gemma and OLMo 2 scale in float32, then cast
            w = self.scale[...].astype(jnp.float32)
            return (h * (1.0 + w if self.plus_one else w)).astype(x.dtype)
        # Llama casts back, then scales: the order Hugging Face uses.
        return self.scale[...] * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """Mean-centred normalisation over the last axis with a scale and a bias (GPT-2, GPT-NeoX, Falcon),
    computed and scaled in float32, then cast (as PyTorch's ``LayerNorm`` does)."""

    def __init__(self, shape: tuple[int, ...], eps: float, *, dtype: Any, rngs: nnx.Rngs,
                 axes: tuple[str, ...] = ("embed",)):
        self.scale = _param(rngs, shape, axes, dtype, None)
        self.bias = _param(rngs, shape, axes, dtype, 0.0)
        self.eps = eps

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        h = x.astype(jnp.float32)
        h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def _quantize_declarations(module: nnx.Module, group: str, quantize: str | None) -> None:
    """With ``quantize`` ("int8"), redeclare ``module``'s projections of ``group`` ("attn" / "mlp") as int8 with
    a float32 scale per output channel beside each (``<name>_scale``, the weight's axes without its
    contraction axes): see :mod:`eft_jax.models.quant`."""
    if quantize is None:
        return
    for (g, name), contract in QUANTIZED.items():
        if g != group or not hasattr(module, name):
            continue
        w = getattr(module, name)
        axes = tuple(w.get_metadata()["logical_axes"])
        setattr(module, name, nnx.Param(jnp.zeros(w.shape, jnp.int8), logical_axes=axes))
        out = tuple(i for i in range(len(axes)) if i not in contract)
        setattr(module, scale_path((name,))[0], nnx.Param(jnp.ones(tuple(w.shape[i] for i in out), jnp.float32),
                                                          logical_axes=tuple(axes[i] for i in out)))


def _weight(module: nnx.Module, name: str) -> tuple[Array, Array | None]:
    """A projection's weight and its int8 scale (None when it is not quantized)."""
    scale = getattr(module, scale_path((name,))[0], None)
    return getattr(module, name)[...], None if scale is None else scale[...]


def _block_norm(cfg: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
    """One hidden-width norm of the kind ``cfg.norm_type`` names."""
    if cfg.norm_type == "layernorm":
        return LayerNorm((cfg.hidden_size,), cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
    return RMSNorm((cfg.hidden_size,), cfg.rms_norm_eps, dtype=dtype, rngs=rngs, plus_one=cfg.norm_plus_one,
                   float32_scale=cfg.norm_float32_scale)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs, quantize: str | None = None):
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = d**-0.5
        self.q = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dtype, std)
        self.k = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), dtype, std)
        self.v = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), dtype, std)
        self.o = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dtype, (h * hd) ** -0.5)
        if cfg.o_bias:
            self.o_bias = _param(rngs, (d,), ("embed",), dtype, 0.0)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), dtype, 0.0)
            self.k_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), dtype, 0.0)
            self.v_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), dtype, 0.0)
        if cfg.qk_norm:
            norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs, plus_one=cfg.norm_plus_one,
                                     float32_scale=cfg.norm_float32_scale)
            if cfg.qk_norm == "head":  # over head_dim, one weight shared by all heads
                self.q_norm = norm((hd,), axes=("head_dim",))
                self.k_norm = norm((hd,), axes=("head_dim",))
            else:  # "width": over all heads of the projection together
                self.q_norm = norm((h, hd), axes=("heads", "head_dim"))
                self.k_norm = norm((k, hd), axes=("kv_heads", "head_dim"))
        _quantize_declarations(self, "attn", quantize)
        self.qkv_bias = cfg.qkv_bias
        self.has_o_bias = cfg.o_bias
        self.qk_norm = cfg.qk_norm
        self.rope = cfg.position_embedding == "rope"
        self.scale = cfg.query_scale if cfg.query_scale is not None else hd**-0.5
        self.softcap = cfg.attn_softcap
        longrope = cfg.rope_scaling is not None and cfg.rope_scaling.kind == "longrope"
        self.rope_scale = cfg.rope_scaling.attention_factor if longrope else 1.0

    def project(
        self,
        x: Float[Array, "batch seq embed"],
        positions: Int[Array, "batch seq"],
        inv_freq: Float[Array, " half"],
        minor: bool = False,
    ) -> tuple[Array, Array, Array]:
        """Rotated queries ``[b, t, heads, hd]`` and keys, plus values ``[b, t, kv_heads, hd]``. ``minor``:
        the weights are in the contraction-minor run layout (see :func:`run_params`)."""
        weights = [_weight(self, name) for name in ("q", "k", "v")]
        if minor:
            # [heads, hd, embed] viewed as 2-D [heads * hd, embed] (a free reshape): XLA:CPU canonicalises a
            # dot with several free weight axes by transposing (copying) the weight at every call.
            b, t, _ = x.shape
            q, k, v = (_dense_minor(x, w.reshape(-1, w.shape[-1]), s).reshape(b, t, w.shape[0], w.shape[1])
                       for w, s in weights)
        else:
            q, k, v = (_dense("btd,dhk->bthk", x, w, s) for w, s in weights)
        if self.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if not self.rope:  # learned absolute positions, added to the embeddings
            return q, k, v
        rope = functools.partial(apply_rope, positions=positions, inv_freq=inv_freq, scale=self.rope_scale)
        return rope(q), rope(k), v

    def attend(
        self,
        q: Float[Array, "batch seq heads head_dim"],
        keys: Float[Array, "batch slots kv_heads head_dim"],
        values: Float[Array, "batch slots kv_heads head_dim"],
        q_pos: Int[Array, "batch seq"],
        k_pos: Int[Array, "batch slots"],
        kv_length: Int[Array, " batch"] | None,
        minor: bool = False,
        window: Int[Array, ""] | None = None,
    ) -> Float[Array, "batch seq embed"]:
        """Grouped-query attention of ``q`` over ``keys``/``values`` (``attention.attention``: visibility
        from positions, scores in float32; ``window``: this layer's sliding window, None: none), then the
        output projection."""
        out = attention(q, keys, values, q_pos, k_pos, kv_length, scale=self.scale, window=window,
                        softcap=self.softcap)
        o, scale = _weight(self, "o")
        if minor:  # [embed, heads, hd] as 2-D [embed, heads * hd], as in ``project``
            b, t, h, hd = out.shape
            out = _dense_minor(out.reshape(b, t, h * hd), o.reshape(o.shape[0], h * hd), scale)
        else:
            out = _dense("bthk,hkd->btd", out, o, scale)
        return out + self.o_bias[...] if self.has_o_bias else out


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs, quantize: str | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        if cfg.mlp_gated:
            self.gate = _param(rngs, (d, f), ("embed", "mlp"), dtype, d**-0.5)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), dtype, d**-0.5)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), dtype, f**-0.5)
        if cfg.mlp_bias:
            if cfg.mlp_gated:
                self.gate_bias = _param(rngs, (f,), ("mlp",), dtype, 0.0)
            self.up_bias = _param(rngs, (f,), ("mlp",), dtype, 0.0)
            self.down_bias = _param(rngs, (d,), ("embed",), dtype, 0.0)
        _quantize_declarations(self, "mlp", quantize)
        self.activation = cfg.mlp_activation
        self.gated, self.bias = cfg.mlp_gated, cfg.mlp_bias

    def __call__(self, x: Float[Array, "batch seq embed"], minor: bool = False) -> Float[Array, "batch seq embed"]:
        """Gated MLP, ``down(act(gate x) * up x)``: SwiGLU (silu) or GeGLU (tanh-approximated gelu, Gemma); or,
        not gated, ``down(act(up x))`` (GPT-2, GPT-NeoX, Falcon; exact or tanh gelu), with biases where the
        config has them; ``minor``: weights in the contraction-minor run layout (gate/up ``[mlp, embed]``)."""
        def dense(h: Array, name: str, spec: str) -> Array:
            w, scale = _weight(self, name)
            return _dense_minor(h, w, scale) if minor else _dense(spec, h, w, scale)

        act = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "gelu": functools.partial(jax.nn.gelu, approximate=False)}[self.activation]
        up = dense(x, "up", "btd,df->btf")
        if self.bias:
            up = up + self.up_bias[...]
        if self.gated:
            gate = dense(x, "gate", "btd,df->btf")
            h = act(gate + self.gate_bias[...] if self.bias else gate) * up
        else:
            h = act(up)
        out = dense(h, "down", "btf,fd->btd")
        return out + self.down_bias[...] if self.bias else out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs, quantize: str | None = None):
        norm = functools.partial(_block_norm, cfg, dtype=dtype, rngs=rngs)
        if cfg.pre_norms:
            self.attn_norm = norm()
            if not cfg.shared_input_norm:  # Falcon-7B: one norm feeds both blocks
                self.mlp_norm = norm()
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs, quantize=quantize)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs, quantize=quantize)
        if cfg.post_norms:  # Gemma, OLMo 2: each block's output is normalised before the residual add
            self.attn_post_norm = norm()
            self.mlp_post_norm = norm()
        self.pre, self.post = cfg.pre_norms, cfg.post_norms
        self.parallel, self.shared_norm = cfg.parallel_residual, cfg.shared_input_norm

    def attn_input(self, x: Float[Array, "batch seq embed"]) -> Float[Array, "batch seq embed"]:
        return self.attn_norm(x) if self.pre else x

    def finish(self, x: Float[Array, "batch seq embed"], attn_out: Float[Array, "batch seq embed"],
               minor: bool = False) -> Array:
        """Residual add of the attention output, then the MLP block; or, parallel (GPT-NeoX, Falcon), the MLP
        of the block's input, both outputs added to it at once."""
        if self.parallel:
            out = self.mlp(self.attn_norm(x) if self.shared_norm else self.mlp_norm(x), minor)
            return (out + attn_out) + x
        if self.post:
            attn_out = self.attn_post_norm(attn_out)
        x = x + attn_out
        out = self.mlp(self.mlp_norm(x) if self.pre else x, minor)
        return x + (self.mlp_post_norm(out) if self.post else out)


class Llama(nnx.Module):
    """A causal LM: embedding, ``num_layers`` stacked decoder layers, final norm, LM head. ``quantize``
    ("int8"): the layers' projections are int8 with per-output-channel scales (:mod:`eft_jax.models.quant`)."""

    def __init__(self, cfg: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs, quantize: str | None = None):
        self.config = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, 1.0)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, dtype=dtype, rngs=rngs, quantize=quantize)

        self.layers = make_layers(rngs)
        self.final_norm = _block_norm(cfg, dtype=dtype, rngs=rngs)
        if cfg.position_embedding == "learned":  # GPT-2: one row per absolute position
            self.pos_embed = _param(rngs, (cfg.max_position_embeddings, cfg.hidden_size), ("positions", "embed"),
                                    dtype, 0.02)
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
        """``layers``: the layer weights, stacked, per layer, or per layer contraction-minor
        (:class:`MinorLayers`; the LM head is then ``[vocab, embed]``); ``self.layers`` only gives their
        structure."""
        cfg = self.config
        minor = isinstance(layers, MinorLayers)
        x = _take_rows(self.embed[...], tokens)
        if cfg.embed_scale:  # Gemma: sqrt(hidden), rounded to the weights' dtype first
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), x.dtype)
        if cfg.position_embedding == "learned":
            # Clipped into the table: padding (-1, masked out) reads row 0; requests past the context are refused
            # earlier (eft_jax.requests), as transformers refuses positions past the table.
            rows = jnp.clip(positions, 0, cfg.max_position_embeddings - 1)
            x = x + _take_rows(self.pos_embed[...], rows)
        over_layers = functools.partial(_over_layers, nnx.graphdef(self.layers), layers,
                                        _layer_kinds(cfg, layers, positions))

        if cache is None:
            # Tokens attend causally to each other (by position; -1 marks padding).
            def body(h, layer, kind):
                inv_freq, window = kind
                q, k, v = layer.attn.project(layer.attn_input(h), positions, inv_freq, minor)
                out = layer.attn.attend(q, k, v, positions, positions, None, minor, window)
                return layer.finish(h, out, minor)

            x = over_layers(body, x)
            new_cache = None
        else:
            # Slot bookkeeping is shared by all layers. New keys/values are scattered straight into the
            # full cache buffers (an in-place update), then the layer's slice is read.
            rows = jnp.arange(tokens.shape[0])[:, None]
            slots = cache.length[:, None] + jnp.arange(tokens.shape[1])[None, :]
            pos = cache.pos.at[rows, slots].set(positions, mode="drop")
            length = cache.length + tokens.shape[1]

            def body(carry, layer, kind):
                h, k_all, v_all, i = carry
                inv_freq, window = kind
                q, k, v = layer.attn.project(layer.attn_input(h), positions, inv_freq, minor)
                k_all = k_all.at[i, rows, slots].set(k.astype(k_all.dtype), mode="drop")
                v_all = v_all.at[i, rows, slots].set(v.astype(v_all.dtype), mode="drop")
                out = layer.attn.attend(q, k_all[i], v_all[i], positions, pos, length, minor, window)
                return layer.finish(h, out, minor), k_all, v_all, i + 1

            x, k_all, v_all, _ = over_layers(body, (x, cache.k, cache.v, 0))
            new_cache = KVCache(k=k_all, v=v_all, pos=pos, length=length)

        if logits_at is not None:
            # Only these columns need logits (e.g. the last prompt token): the LM head over the whole
            # sequence would cost batch x seq x vocab floats.
            x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
        x = self.final_norm(x)
        # A tied head is the embedding [vocab, embed]: already contraction-minor. One row is computed as two,
        # and as one 2-D dot, as in ``_dense`` (a one-row bf16 head dot of a 152k vocabulary took 212 ms against
        # 18 ms for two; a 3-D one, inside the decode loop, a transposed copy of the head at every call).
        if cfg.tie_word_embeddings or minor:
            head = self.embed[...] if cfg.tie_word_embeddings else self.lm_head[...]
            logits = _dot("btd,vd->btv", x, head)
        else:
            logits = _dot("btd,dv->btv", x, self.lm_head[...])
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
        return logits, new_cache


def _over_layers(layer_def: nnx.GraphDef, layers: Params | tuple[Params, ...], kinds: Any, body: Any,
                 carry: Any) -> Any:
    """``carry = body(carry, layer, kind)`` for each decoder layer in turn: a Python loop over per-layer
    buffers (``layers`` a tuple; ``kinds`` a list of per-layer values), or ``lax.scan`` over stacked ones
    (``kinds`` then a pytree of arrays with a leading layers axis, scanned alongside; the layer index in
    ``carry`` is traced; in the loop it stays a Python int, so cache writes are static-index updates in
    place)."""
    if isinstance(layers, tuple):
        for p, kind in zip(layers, kinds, strict=True):
            carry = body(carry, nnx.merge(layer_def, p), kind)
        return carry
    return jax.lax.scan(lambda c, xs: (body(c, nnx.merge(layer_def, xs[0]), xs[1]), None), carry, (layers, kinds))[0]


@functools.lru_cache(maxsize=None)
def _graphdef_and_abstract(cfg: LlamaConfig, dtype_name: str, quantize: str | None = None
                           ) -> tuple[nnx.GraphDef, nnx.State]:
    model = nnx.eval_shape(lambda: Llama(cfg, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0), quantize=quantize))
    return nnx.split(model)


def param_tree(cfg: LlamaConfig, dtype_name: str, quantize: str | None) -> tuple[Params, Params]:
    """The params pytree as ``jax.ShapeDtypeStruct`` leaves in ``dtype_name`` (int8 projections and float32 scales
    with ``quantize``), and the same tree with each leaf's logical axis names (stacked layers get "layers")."""
    state = _graphdef_and_abstract(cfg, dtype_name, quantize)[1]
    abstract = state.to_pure_dict()
    axes = jax.tree.map(
        lambda v: tuple(v.get_metadata()["logical_axes"]), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    pure = nnx.State(axes).to_pure_dict() if not isinstance(axes, dict) else axes
    logical = jax.tree.map(lambda a, s: ("layers",) * (len(s.shape) - len(a)) + a, pure, abstract,
                           is_leaf=lambda x: isinstance(x, tuple))
    return abstract, logical


def init_params(cfg: LlamaConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (see :func:`eft_jax.models.llama.init_params`)."""
    model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(params=key))
    return nnx.state(model, nnx.Param).to_pure_dict()


def forward(cfg: LlamaConfig, params: Params, tokens: Array, positions: Array, cache: KVCache | None,
            logits_at: Array | None) -> tuple[Array, KVCache | None]:
    """:func:`eft_jax.models.llama.forward`: the params merged into the module, inside the traced function."""
    graphdef, abstract = _graphdef_and_abstract(cfg, "float32", params_quantize(params))
    # The module gets the stacked layers' shapes only; their buffers, in either layout, go in as ``layers``.
    model = nnx.merge(graphdef, {**params, "layers": abstract.to_pure_dict()["layers"]})
    return model(tokens, positions, cache, logits_at, params["layers"])
