"""int8 weight-only quantization: symmetric per-output-channel scales for every projection matrix.

What is quantized (``QUANTIZED``): the decoder layers' projections - attention q, k, v, o and the MLP's
gate, up and down. Each weight ``W`` is stored as ``q = round(W / s)`` clipped to ``[-127, 127]`` (int8)
with one float32 scale per *output* channel, ``s = max |W| / 127`` over the contraction (input) axes, so
the absolute error of a weight is at most ``s / 2``. A channel of zeros gets ``s = 1`` (exact zeros). The
scale leaf sits beside its weight as ``<name>_scale`` with the weight's output axes (``attn.q_scale``
``[heads, head_dim]``, ``attn.o_scale`` ``[embed]``, ``mlp.up_scale`` ``[mlp]``), so it is sharded like
the matmul's output and never needs a collective.

Not quantized, by choice: the embedding table and the LM head (and norms, biases, position tables) stay
in the activation dtype. The head's logits feed the float32 EFT combination, where every vocabulary row
counts; the embedding is a gather, not a matmul; and together they are a small share of a large model
(Llama-2-70B: 0.52B of 69B parameters), the models this exists for.

Matmuls (``llama._dense``): the int8 weight is converted to the activation dtype as the dot's operand and
the scale multiplies the float32 accumulator after the dot, ``(x @ q) * s``, which equals ``x @ (q * s)``
up to float32 rounding. GPU and TPU compilers fuse that convert into the matmul. XLA:CPU does not: it
writes the whole converted matrix into a buffer of its own before the dot (checked in the compiled HLO).
So on CPU, in the contraction-minor run layout a single CPU device uses (``llama.MinorLayers``),
:func:`int8_matmul_blocked` runs the dot over blocks of output channels in a loop: only one block of at
most :data:`CPU_BLOCK_BYTES` is ever dequantized (tests/test_quant.py inspects the HLO for it).

Why not qwix (google/qwix): its post-training quantization intercepts Flax modules' dot/einsum calls and
replaces parameters with its own pytree types (``WithAux`` / ``QArray``) built from float parameters.
Here the parameters are plain dicts placed tensor by tensor from checkpoints into shardings, planned
by :mod:`eft_jax.memory` from abstract shapes, saved by orbax and run in three layouts (stacked under
``lax.scan``, per-layer views, per-layer ``[out, in]`` copies). Quantizing while loading, counting the
bytes, saving and restoring would each have to understand qwix's types, and its interception does not
give the CPU blocking above; the whole scheme is this module (under 200 lines).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int8

QUANTIZE_MODES = ("int8",)
INT8_MAX = 127
# Per-layer projection leaf -> its contraction axes in the canonical per-layer layout
# (q/k/v [embed, heads, head_dim], o [heads, head_dim, embed], gate/up [embed, mlp], down [mlp, embed]).
QUANTIZED: dict[tuple[str, ...], tuple[int, ...]] = {
    ("attn", "q"): (0,), ("attn", "k"): (0,), ("attn", "v"): (0,), ("attn", "o"): (0, 1),
    ("mlp", "gate"): (0,), ("mlp", "up"): (0,), ("mlp", "down"): (0,),
}
SCALE_SUFFIX = "_scale"
SCALE_DTYPE = np.float32
# XLA:CPU: the largest dequantized block of a weight held at once by int8_matmul_blocked (fits in L2/L3).
CPU_BLOCK_BYTES = 2 << 20


def check_quantize(quantize: str | None) -> str | None:
    """``quantize`` if it names a supported mode (or is None); ValueError naming the choices otherwise."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; use one of {', '.join(QUANTIZE_MODES)} or None")
    return quantize


def scale_path(path: Sequence[str]) -> tuple[str, ...]:
    """The scale leaf's path beside weight ``path`` (``("layers", "attn", "q")`` -> ``(..., "q_scale")``)."""
    return (*path[:-1], path[-1] + SCALE_SUFFIX)


def is_quantized_leaf(path: Sequence[str]) -> bool:
    """Whether the params leaf at ``path`` (from the root, e.g. ``("layers", "mlp", "up")``) is quantized."""
    return len(path) > 1 and path[0] == "layers" and tuple(path[1:]) in QUANTIZED


def quantize_int8(w: np.ndarray, contract: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of one weight (numpy, on the host).

    Args:
      w: a float weight, any layout; ``contract``: its contraction axes.
    Returns:
      ``(q, s)``: int8 ``q`` of ``w``'s shape and float32 ``s`` of ``w``'s shape without the contraction
      axes, with ``|w - q * s| <= s / 2`` element-wise (``s`` broadcast back over the contraction axes).
    """
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=tuple(contract), keepdims=True)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, np.squeeze(scale, axis=tuple(contract))


def dequantize(q: Int8[Array, "..."] | np.ndarray, scale: Any, contract: Sequence[int]) -> np.ndarray:
    """``q * s`` in float32 with ``s`` broadcast back over the contraction axes (host-side, for inspection)."""
    s = np.asarray(scale, np.float32)
    for axis in sorted(contract):
        s = np.expand_dims(s, axis)
    return np.asarray(q, np.float32) * s


def int8_matmul_blocked(
    x: Float[Array, "rows k"], w: Int8[Array, "n k"], scale: Float[Array, " n"],
    block_bytes: int | None = None,
) -> Float[Array, "rows n"]:
    """``x @ (w * scale[:, None]).T`` in float32, dequantizing one block of output channels at a time.

    ``w`` is ``[out, in]`` (contraction-minor). The output channels are split into the fewest equal blocks
    whose dequantized size (``x``'s dtype) is at most ``block_bytes`` (default :data:`CPU_BLOCK_BYTES`, read
    at trace time); a ``lax.scan`` over the blocks converts one block, runs its dot with float32 accumulation
    and scales the block's outputs, so no dequantized copy of the whole matrix exists (the loop body holds
    one block).
    """
    n, k = w.shape
    blocks = _blocks(n, k * jnp.dtype(x.dtype).itemsize, CPU_BLOCK_BYTES if block_bytes is None else block_bytes)
    if blocks == 1:
        return jnp.einsum("mk,nk->mn", x, w.astype(x.dtype), preferred_element_type=jnp.float32) * scale

    def one_block(carry: None, ws: tuple[Array, Array]) -> tuple[None, Array]:
        wb, sb = ws
        return carry, jnp.einsum("mk,nk->mn", x, wb.astype(x.dtype), preferred_element_type=jnp.float32) * sb

    _, ys = jax.lax.scan(one_block, None, (w.reshape(blocks, n // blocks, k), scale.reshape(blocks, n // blocks)))
    return ys.transpose(1, 0, 2).reshape(x.shape[0], n)  # [blocks, rows, n / blocks] -> [rows, n]


def _blocks(n: int, row_bytes: int, block_bytes: int) -> int:
    """The fewest blocks (a divisor of ``n``) whose rows of ``row_bytes`` stay within ``block_bytes`` (one row
    per block at least)."""
    least = min(n, max(1, math.ceil(n * row_bytes / block_bytes)))
    return next(b for b in range(least, n + 1) if n % b == 0)


def place_int8(
    shape: tuple[int, ...], read_layer: Callable[[int], np.ndarray], contract: Sequence[int],
    shardings: tuple[Any, Any],
) -> tuple[jax.Array, jax.Array]:
    """A stacked int8 weight of ``shape`` ``[layers, ...]`` and its float32 scales ``[layers, output axes]``,
    placed shard by shard into ``shardings`` (weight, scale).

    ``read_layer(i)``: layer ``i``'s float weight in our layout; ``contract``: its contraction axes. Each device's callback reads the layers its
    slice covers, quantizes each whole layer tensor (the scale needs the whole contraction axis, which may
    be split over devices) and cuts its slice; the scales found on the way are kept (a few KB per layer),
    so the scale leaf reads no tensor twice. The host holds one float layer tensor at a time, never the
    model in a float type.
    """
    layers = shape[0]
    scales: dict[int, np.ndarray] = {}
    last: dict[tuple, np.ndarray] = {}

    def quantized(i: int) -> np.ndarray:
        q, scales[i] = quantize_int8(read_layer(i), contract)
        return q

    def weight_shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in last:  # replicas ask one after another: keep only the last slice served
            last.clear()
            last[key] = np.stack([quantized(i)[index[1:]] for i in range(layers)[index[0]]])
        return last[key]

    def scale_shard(index: tuple[slice, ...]) -> np.ndarray:
        rows = range(layers)[index[0]]
        for i in rows:
            if i not in scales:  # a process that placed no weight shard of this layer
                quantized(i)
        return np.stack([scales[i][index[1:]] for i in rows])

    weight = jax.make_array_from_callback(shape, shardings[0], weight_shard)
    scale_shape = (layers, *(d for a, d in enumerate(shape[1:]) if a not in contract))
    return weight, jax.make_array_from_callback(scale_shape, shardings[1], scale_shard)


_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\w+)\[([\d,]*)\]")


def int8_converts(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(element type, shape) of every convert of an s8 array in an optimized HLO module's text (fusion
    bodies included): the dequantized buffers a compiled program holds. For tests and benchmarks."""
    shapes = {}
    for line in hlo.splitlines():
        m = _HLO_INSTRUCTION.match(line)
        if m:
            shapes[m.group(1)] = (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
    out = []
    for line in hlo.splitlines():
        m, c = _HLO_INSTRUCTION.match(line), re.search(r"\bconvert\(%([^),\s]+)\)", line)
        if m and c and shapes.get(c.group(1), ("",))[0] == "s8":
            out.append(shapes[m.group(1)])
    return out
