"""The decoder of the Llama lineage (Llama 1/2/3, Mistral, Qwen2/3, Gemma 2/3, SmolLM2, TinyLlama) and of
GPT-2, GPT-NeoX / Pythia and Falcon, as Flax NNX modules. What a family changes (norm form, LayerNorm, q/k
norms, sandwich norms, parallel residual, GeGLU or a non-gated MLP, biases, embedding scale, learned
positions, soft-capping, sliding-window layers, per-layer-type rope) is a switch of its config
(:mod:`eft_jax.models.config`), set in one place per family (:mod:`eft_jax.models.families`).

The modules (:mod:`eft_jax.models.llama_nnx`, imported on first use: flax takes ~0.3 s to import) only
declare parameters (shape, initialiser and logical axes in one place) and hold the math. Everything outside
works on plain pytrees: ``init_params`` / ``abstract_params`` give a nested dict of arrays (the abstract tree
and its logical axes are also saved beside the compiled programs, :mod:`eft_jax.models.param_tree`), and
``forward`` is a pure function of (static config, params, tokens, positions, cache) that merges the params
into the module inside the traced function. This module holds that interface, the weight layouts and the
dense-dot forms the modules use.

Layer weights have three layouts, and ``forward`` runs any of them (the choice is made in :func:`run_params`):

- **stacked** (the canonical one: loading, sharding, training, checkpoints, export): each layer leaf has a
  leading ``layers`` axis and the layers run under ``lax.scan``, so compile time does not grow with
  depth. This is what runs on accelerators and on meshes of several devices.
- **per-layer views** (``params["layers"]`` a tuple of one dict per layer): a Python loop over the
  layers. On XLA:CPU a scan copies every layer's weights out of the stacked buffer before its matmuls, at
  every forward (a one-token decode step of an 853M float32 model: ~0.3 of the time to stream the weights
  once, against ~0.75 per-layer; bench/bench_cpu_decode.py). ``run_params`` gives this layout on one CPU
  device as *views* of the stacked buffers: no weight is copied and the memory is held once.
- **per-layer contraction-minor** (:class:`MinorLayers`): per-layer copies with every dense weight stored
  ``[out, in]``, PyTorch's ``Linear`` layout. XLA:CPU's batched dots (YNNPACK) run this form ~1.7x faster
  than ``[in, out]`` at batch 8 (and ~1.1x at batch 1): a 1.5B model's decode step at batch 8 goes from
  ~1.3 s to ~0.8 s. ``Model.run_params`` uses it on one CPU device and then drops the stacked copy.

Attention is :func:`eft_jax.models.attention.attention` (einsum reference on CPU, the platform's fused
attention on GPU/TPU).

With ``quantize="int8"`` (``Llama(..., quantize=...)``, ``abstract_params``) the layers' projections are
declared int8 with a float32 ``<name>_scale`` per output channel beside each (:mod:`eft_jax.models.quant`);
``forward`` tells the two apart by the weights' dtype and scales each dot's float32 result.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

from eft_jax.models import param_tree
from eft_jax.models.config import LlamaConfig, longrope_long_frequencies, rope_inverse_frequencies
from eft_jax.models.kv_cache import KVCache
from eft_jax.models.param_tree import Params, get_path, set_path
from eft_jax.models.quant import check_quantize, int8_matmul_blocked


# run_params: the largest per-layer slice that may be copied when the runtime cannot view it.
_MAX_COPIED_BYTES = 4096


def apply_rope(
    x: Float[Array, "batch seq heads head_dim"],
    positions: Int[Array, "batch seq"],
    inv_freq: Float[Array, "*rows half"],
    scale: float = 1.0,
) -> Float[Array, "batch seq heads head_dim"]:
    """Rotary embedding in the rotate-half layout of Hugging Face checkpoints (pairs (i, i + r/2)) over the
    first r = 2 * half dims of each head; the rest pass unchanged (partial rotary). ``inv_freq`` is shared
    ``[half]`` or per row ``[batch, half]``; cos and sin are multiplied by ``scale`` (longrope)."""
    freqs = inv_freq[None, None, :] if inv_freq.ndim == 1 else inv_freq[:, None, :]
    angles = positions.astype(jnp.float32)[:, :, None] * freqs  # [b, t, r/2]
    cos = (jnp.cos(angles) * scale)[:, :, None, :].astype(x.dtype)
    sin = (jnp.sin(angles) * scale)[:, :, None, :].astype(x.dtype)
    half = inv_freq.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def _dense(spec: str, x: Array, w: Array, scale: Array | None = None) -> Array:
    """``einsum(spec, x, w)`` accumulated in float32, then cast to ``x``'s dtype; ``spec`` starts with the
    batch axis on both ``x`` and the output. With ``scale`` (an int8 ``w``, see :mod:`eft_jax.models.quant`)
    the weight is converted to ``x``'s dtype as the dot's operand and the float32 result is multiplied by
    ``scale`` (the output's trailing axes) before the cast.

    For float32 this is the plain einsum. For bfloat16 it is the same arithmetic (XLA accumulates a bf16
    dot in float32 and rounds once), in the forms XLA:CPU runs fastest: a float32-output dot (a bf16-output
    one takes a slow generic path, ~6x at batch 8), never a single-row one (a one-row bf16 dot runs ~7x
    slower than the same dot with two rows, bench/bench_cpu_decode.py, so one row is computed twice), and
    one 2-D dot (:func:`_dot`).
    """
    if scale is not None:
        w = w.astype(x.dtype)
    out = _dot(spec, x, w)
    return (out if scale is None else out * scale).astype(x.dtype)


def _dot(spec: str, x: Array, w: Array) -> Array:
    """``einsum(spec, x, w)`` with a float32 result, computed for 16-bit operands as ONE 2-D dot ``[rows, k] x w``
    when ``spec`` has that form (``x``'s contracted axes trailing, ``w``'s leading or trailing, no batch axes: every weight
    dot of the model); a single bf16 row is doubled (``_two_rows_if_one``).

    Why 2-D: XLA:CPU's dot decomposer rewrites a dot with more than one free axis on an operand (``btd,...``)
    into a canonical ``[m, k] x [k, n]`` one, transposing the weight; outside a loop a later pass folds the
    transpose back into the dot. For bfloat16 the float normalization then wraps that transpose in
    converts (bf16 -> f32 -> bf16), and inside the decode ``while`` loop the loop-invariant code motion hoists
    the chain out of the loop before the fold: every bf16 weight was copied to ``[in, out]`` at every chunk
    call, and the loop's dots ran on that layout (a lone float32 transpose is not hoisted: float32 was not
    affected; docs/benchmarks.md, "CPU decode: weight layout"). A 2-D dot is already canonical: no transpose."""
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    contract = "".join(c for c in lhs if c in rhs and c not in out)
    rows, free = lhs[: len(lhs) - len(contract)], "".join(c for c in rhs if c not in contract)
    leading, trailing = rhs == contract + free, rhs == free + contract
    # Float32 keeps the einsum: it had no loop copies to remove, and the 2-D form moved float32 rounding
    # between calls of different shapes (a resumed OpenAI job no longer rewrote the uninterrupted run's bytes,
    # tests/test_openai_batch.py).
    plain = x.dtype == jnp.float32 and w.dtype == jnp.float32
    if plain or not (contract and lhs.endswith(contract) and out == rows + free and (leading or trailing)):
        return jnp.einsum(spec, _two_rows_if_one(x), w, preferred_element_type=jnp.float32)[: x.shape[0]]
    m, k = math.prod(x.shape[: len(rows)]), math.prod(x.shape[len(rows):])
    n_shape = w.shape[len(contract):] if leading else w.shape[: len(free)]
    w2 = w.reshape((k, -1) if leading else (-1, k))
    out2 = jnp.einsum("mk,kn->mn" if leading else "mk,nk->mn", _two_rows_if_one(x.reshape(m, k), row_axes=1), w2,
                      preferred_element_type=jnp.float32)[:m]
    return out2.reshape(*x.shape[: len(rows)], *n_shape)


def _two_rows_if_one(x: Array, row_axes: int = 2) -> Array:
    """``x`` doubled along axis 0 when its leading ``row_axes`` axes (a dense input's ``[batch, seq]``) hold a
    single row and it is not float32 (a one-row bf16 dot is ~7x slower on XLA:CPU than a two-row one, see
    ``_dense``); the caller keeps the first ``x.shape[0]`` rows of the result."""
    single = math.prod(x.shape[:row_axes]) == 1
    return jnp.concatenate([x, x], axis=0) if x.dtype != jnp.float32 and single else x


def _take_rows(table: Array, ids: Array) -> Array:
    """``jnp.take(table, ids, axis=0)``, for a table that may be a loop invariant (the embedding inside the
    decode loop). XLA:CPU has no bfloat16 gather: it converts the table to float32 for it; outside a loop
    that conversion is fused into the gather (only the gathered rows are read), inside one the loop-invariant
    code motion hoists it: the whole table was converted (a 152k x 1536 float32 copy, 933 MB) at every chunk
    call. Passing the table through an ``optimization_barrier`` together with ``ids`` makes it depend on the
    loop's values, so the conversion stays fused with the gather. (A gather of the table's bits as uint16
    has the same problem: the hoisted bitcast-convert is a full copy.) Float32 tables, and other backends
    (native bf16 gathers), need none of this."""
    if table.dtype != jnp.float32 and jax.default_backend() == "cpu":
        table, ids = jax.lax.optimization_barrier((table, ids))
    return jnp.take(table, ids, axis=0)


def _dense_minor(x: Float[Array, "batch seq k"], w: Array, scale: Float[Array, " n"] | None) -> Float[Array, "batch seq n"]:
    """``x @ w.T`` for a 2-D ``[out, in]`` weight of the contraction-minor run layout (one CPU device), as
    ``_dense``; an int8 ``w`` goes through :func:`quant.int8_matmul_blocked`, which never dequantizes the
    whole matrix at once (XLA:CPU would not fuse the conversion into the dot)."""
    if scale is None:
        return _dense("btd,nd->btn", x, w)
    b, t, k = x.shape
    rows = _two_rows_if_one(x.reshape(b * t, k), row_axes=1)
    return int8_matmul_blocked(rows, w, scale.reshape(-1))[: b * t].reshape(b, t, -1).astype(x.dtype)


@jax.tree_util.register_pytree_node_class
class MinorLayers(tuple):
    """Per-layer weights in the *contraction-minor* run layout: each dense weight stored ``[out, in]`` (the
    layout of PyTorch's ``Linear``), e.g. ``mlp.gate`` ``[mlp, embed]``, ``attn.q`` ``[heads, head_dim,
    embed]``, ``attn.o`` ``[embed, heads, head_dim]``; norms and biases as in the canonical layout. A
    tuple of one params dict per layer, tagged by its type so that ``forward`` knows the layout (with it,
    ``params["lm_head"]`` is ``[vocab, embed]``)."""

    def tree_flatten(self) -> tuple[tuple[Params, ...], None]:
        return tuple(self), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Any) -> MinorLayers:
        return cls(children)


def _layer_kinds(cfg: LlamaConfig, layers: Params | tuple[Params, ...], positions: Int[Array, "batch seq"]) -> Any:
    """What distinguishes one layer's attention from another's: its rope inverse frequencies and its
    sliding window (None for a model without sliding layers). Per layer for the Python loop; stacked
    arrays, traced inside the layer scan, so compile time stays flat in depth, for the scan."""
    full = np.asarray(rope_inverse_frequencies(cfg), np.float32)
    sliding = cfg.sliding_layers
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "longrope":
        # Per row: the long factors once the row's positions in this call pass the original context
        # (transformers decides per call, on the largest position id + 1; per row is the same for one row).
        long = np.asarray(longrope_long_frequencies(cfg), np.float32)
        beyond = jnp.max(positions, axis=1) + 1 > cfg.rope_scaling.original_max_position_embeddings
        full = jnp.where(beyond[:, None], long[None, :], full[None, :])  # [batch, half]
    if not any(sliding):
        kinds = [(jnp.asarray(full), None)] * cfg.num_layers
    else:
        local = full if cfg.local_rope_theta is None else jnp.broadcast_to(
            np.asarray(rope_inverse_frequencies(cfg, local=True), np.float32), jnp.shape(full))
        # A full layer's "window" is larger than any position difference.
        kinds = [(jnp.asarray(local if s else full), jnp.int32(cfg.sliding_window if s else np.iinfo(np.int32).max))
                 for s in sliding]
    if isinstance(layers, tuple):
        return kinds
    return jax.tree.map(lambda *xs: jnp.stack(xs), *kinds)


def abstract_params(cfg: LlamaConfig, dtype: Any = jnp.float32, quantize: str | None = None) -> Params:
    """The params pytree as ``jax.ShapeDtypeStruct`` leaves (no memory allocated); ``quantize`` ("int8"):
    int8 projections plus their float32 ``*_scale`` leaves (:mod:`eft_jax.models.quant`)."""
    return param_tree.abstract_params(cfg, jnp.dtype(dtype).name, check_quantize(quantize))


def param_logical_axes(cfg: LlamaConfig, quantize: str | None = None) -> Params:
    """The params pytree with a tuple of logical axis names per leaf (stacked layers get "layers")."""
    return param_tree.logical_axes(cfg, check_quantize(quantize))


def init_params(cfg: LlamaConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (for training from scratch and tests)."""
    from eft_jax.models import llama_nnx

    return llama_nnx.init_params(cfg, key, dtype)


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
    from eft_jax.models import llama_nnx  # flax, on the first trace only

    return llama_nnx.forward(cfg, params, tokens, positions, cache, logits_at)


def params_quantize(params: Params) -> str | None:
    """"int8" when ``params`` (any layout) hold int8 projections, else None (read from dtypes: static)."""
    layers = params["layers"]
    first = layers[0] if isinstance(layers, tuple) else layers
    return "int8" if first["attn"]["q"].dtype == jnp.int8 else None


# The contraction-minor run layout (MinorLayers): per-layer leaf -> axes permutation from the canonical
# per-layer shape. Leaves not listed (norms, biases, int8 scales: output axes only) keep their shape.
_MINOR_PERM: dict[tuple[str, ...], tuple[int, ...]] = {
    ("attn", "q"): (1, 2, 0), ("attn", "k"): (1, 2, 0), ("attn", "v"): (1, 2, 0),  # [d, h, hd] -> [h, hd, d]
    ("attn", "o"): (2, 0, 1),  # [h, hd, d] -> [d, h, hd]
    ("mlp", "gate"): (1, 0), ("mlp", "up"): (1, 0), ("mlp", "down"): (1, 0),
}  # (pos_embed is not a per-layer leaf: it keeps its [positions, embed] shape)


def to_minor(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    """One canonical leaf in the contraction-minor run layout (a view, no copy): ``path`` is the leaf's path
    in the params (``("layers", "attn", "q")`` for one layer's slice, ``("lm_head",)``, ...)."""
    if path == ("lm_head",):
        return x.T
    perm = _MINOR_PERM.get(path[1:]) if path[0] == "layers" else None
    return x if perm is None else x.transpose(perm)


def run_params(params: Params, *, transpose: bool = False, consume: bool = False) -> Params:
    """``params`` in the layout ``forward`` runs fastest with where they are (see the module docstring).

    Stacked params on one CPU device come back per layer; anything else comes back as it is.

    - ``transpose=False``: per-layer zero-copy *views* of the stacked buffers (which they keep alive). The
      runtime views only 64-byte aligned slices and copies others: copies of under ``_MAX_COPIED_BYTES``
      per layer (a bias or norm of a tiny model) are accepted, a larger one keeps the stacked params, so
      the weights are never held twice.
    - ``transpose=True``: per-layer *copies* in the contraction-minor layout (:class:`MinorLayers`, and
      the LM head ``[vocab, embed]``). XLA:CPU runs ``x @ W`` with ``W`` stored ``[out, in]`` faster than
      with ``[in, out]``: ~1.2x at batch 1, ~1.7x at batch 8 (its batched dots go to YNNPACK, which
      repacks an ``[in, out]`` operand; bench/bench_cpu_decode.py). With ``consume`` the stacked leaves
      are removed from ``params``' dicts as they are converted (the caller passes a structure it owns), so
      that a caller that holds no other reference never has a leaf in both layouts at once.
    """
    layers = params["layers"]
    if isinstance(layers, tuple) or any(len(x.devices()) != 1 or x.platform() != "cpu" for x in jax.tree.leaves(layers)):
        return params
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    per_layer = tuple({} for _ in range(num_layers))
    head = params.get("lm_head")
    # Leaf paths only: a list of the leaves themselves would keep every stacked buffer alive to the end.
    for keys in [[k.key for k in path] for path, _ in jax.tree_util.tree_leaves_with_path(layers)]:
        x = get_path(layers, keys)
        host = np.asarray(x)  # on CPU: the device buffer itself (read-only), not a copy
        sharding = _one_device(x)
        permuted = transpose and tuple(keys) in _MINOR_PERM
        for i, layer in enumerate(per_layer):
            if permuted:
                set_path(layer, keys, jax.device_put(np.ascontiguousarray(to_minor(("layers", *keys), host[i])), sharding))
                continue
            view = jax.device_put(host[i], sharding)
            if not transpose and view.unsafe_buffer_pointer() != x.unsafe_buffer_pointer() + i * view.nbytes \
                    and view.nbytes >= _MAX_COPIED_BYTES:
                return params
            set_path(layer, keys, view)
        if consume:
            _pop(layers, keys)
        del host, x
    out = {**params, "layers": MinorLayers(per_layer) if transpose else per_layer}
    if transpose and head is not None:
        if consume:
            del params["lm_head"]
        out["lm_head"] = jax.device_put(np.ascontiguousarray(to_minor(("lm_head",), np.asarray(head))), _one_device(head))
    return out


def stacked_params(params: Params) -> Params:
    """The canonical stacked layout of ``params`` in any layout (the inverse of :func:`run_params`): the
    same arrays when already stacked, else a copy."""
    layers = params["layers"]
    if not isinstance(layers, tuple):
        return params
    minor = isinstance(layers, MinorLayers)

    def stack(path: Any, *xs: Array) -> Array:
        perm = _MINOR_PERM.get(tuple(k.key for k in path)) if minor else None
        inverse = tuple(int(i) for i in np.argsort(perm)) if perm is not None else None
        host = np.stack([np.asarray(x) if inverse is None else np.asarray(x).transpose(inverse) for x in xs])
        return jax.device_put(host, _one_device(xs[0]))

    out = {**params, "layers": jax.tree_util.tree_map_with_path(stack, *layers)}
    if minor and "lm_head" in params:
        out["lm_head"] = jax.device_put(np.ascontiguousarray(np.asarray(params["lm_head"]).T),
                                        _one_device(params["lm_head"]))
    return out


def _one_device(x: Array) -> Any:
    """``x``'s sharding with the (size-1) layers axis dropped from a NamedSharding's spec."""
    return NamedSharding(x.sharding.mesh, PartitionSpec()) if isinstance(x.sharding, NamedSharding) else x.sharding


def _pop(tree: dict[str, Any], keys: list[str]) -> None:
    for key in keys[:-1]:
        tree = tree[key]
    del tree[keys[-1]]

