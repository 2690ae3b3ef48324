"""Grouped-query attention over a cache, with the visibility mask taken from token positions.

One function, :func:`attention`, with two implementations behind it:

- ``"einsum"``: the reference. Two einsums and a float32 softmax, written out here; it is what the
  tests compare everything against, and the default on CPU (XLA:CPU has no fused attention kernel, and at
  decode shapes these einsums are a small part of a step).
- ``"platform"``: ``jax.nn.dot_product_attention`` with XLA's implementation, the default on GPU/TPU
  (exact attention, no approximation: it agrees with the reference up to rounding; on CPU the tests
  check it against the reference).
- ``"cudnn"``: the same call with ``implementation="cudnn"`` (cuDNN flash attention: GPU only, float16 /
  bfloat16, head_dim a multiple of 8 up to 128). Opt-in: it has not been run on a GPU by this project
  yet, and cuDNN's support for an arbitrary visibility mask at decode shapes varies by version.

Which one runs: ``impl`` when given, else :data:`DEFAULT_IMPL` when set (a user can set
``eft_jax.models.attention.DEFAULT_IMPL`` before compiling, or the environment variable
``EFT_JAX_ATTENTION=einsum|platform|cudnn``), else ``"einsum"`` on CPU and ``"platform"`` on GPU/TPU,
from ``jax.default_backend()`` at trace time. The choice is made while tracing, so it is fixed per
compiled program.

Visibility: key slot ``s`` of row ``b`` is visible to query ``t`` iff ``s < kv_length[b]`` (slots past a
row's fill pointer are stale or empty), ``k_pos[b, s] >= 0`` (-1 marks an empty slot or left padding),
``k_pos[b, s] <= q_pos[b, t]`` (causal by position, not by slot index, so left-padded rows and rows of
different lengths need no special case) and, in a sliding-window layer, ``q_pos[b, t] - k_pos[b, s] <
window`` (the query sees itself and the ``window - 1`` positions before it, as in Hugging Face's masks).

Soft-capping (Gemma 2: ``scores -> cap * tanh(scores / cap)`` before masking) is done by the einsum path
only: ``jax.nn.dot_product_attention`` has no such option, so a soft-capped call runs the einsum whatever
the implementation asked for. A query with no visible key (a padding query) gets a zero
output in every implementation, never NaN; its output is never used.
"""

from __future__ import annotations

import os
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

Impl = Literal["einsum", "platform", "cudnn"]

DEFAULT_IMPL: Impl | None = os.environ.get("EFT_JAX_ATTENTION") or None  # type: ignore[assignment]

# A finite "minus infinity" for masked scores: a row with nothing visible then gets a finite uniform
# average (zeroed afterwards) instead of exp(-inf - (-inf)) = NaN.
_MASKED = -1e30


def visible(
    q_pos: Int[Array, "batch seq"],
    k_pos: Int[Array, "batch slots"],
    kv_length: Int[Array, " batch"] | None = None,
    window: int | Int[Array, ""] | None = None,
) -> Bool[Array, "batch seq slots"]:
    """Which key slots each query may attend to (see the module docstring); ``kv_length`` None: all slots;
    ``window`` None: no sliding window."""
    ok = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if kv_length is not None:
        ok &= jnp.arange(k_pos.shape[1])[None, None, :] < kv_length[:, None, None]
    if window is not None:
        ok &= q_pos[:, :, None] - k_pos[:, None, :] < window
    return ok


def resolve_impl(impl: Impl | None = None) -> Impl:
    """The implementation :func:`attention` runs for ``impl`` (None: the default, see the module docstring)."""
    impl = impl or DEFAULT_IMPL or ("einsum" if jax.default_backend() == "cpu" else "platform")
    if impl not in ("einsum", "platform", "cudnn"):
        raise ValueError(f"attention impl must be 'einsum', 'platform' or 'cudnn', got {impl!r}")
    return impl


def attention(
    q: Float[Array, "batch seq heads head_dim"],
    k: Float[Array, "batch slots kv_heads head_dim"],
    v: Float[Array, "batch slots kv_heads head_dim"],
    q_pos: Int[Array, "batch seq"],
    k_pos: Int[Array, "batch slots"],
    kv_length: Int[Array, " batch"] | None = None,
    *,
    scale: float | None = None,
    window: int | Int[Array, ""] | None = None,
    softcap: float | None = None,
    impl: Impl | None = None,
    platform_implementation: Literal["xla", "cudnn"] | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
    """softmax(q k^T * scale, over the visible slots) v, per query head; ``heads`` a multiple of ``kv_heads``
    (query head ``h`` reads kv head ``h // (heads // kv_heads)``). Scores and softmax in float32; the output
    has ``q``'s dtype. ``scale`` defaults to ``head_dim ** -0.5``; ``window`` (a sliding window in positions)
    and ``softcap``: see the module docstring. ``impl``: see the module docstring;
    ``platform_implementation`` overrides the ``jax.nn.dot_product_attention`` backend that ``"platform"``
    (``"xla"``) or ``"cudnn"`` would pick.
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    if h % kv_heads:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kv_heads})")
    scale = hd**-0.5 if scale is None else scale
    mask = visible(q_pos, k_pos, kv_length, window)  # [b, t, s]
    any_visible = jnp.any(mask, axis=-1)[:, :, None, None]  # [b, t, 1, 1]

    impl = "einsum" if softcap is not None else resolve_impl(impl)
    if impl == "einsum":
        qg = q.reshape(b, t, kv_heads, h // kv_heads, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        # A float32-output dot: XLA:CPU's bf16-output dots take a slow path (see ``llama._dense``).
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32).reshape(b, t, h, hd)
    else:
        backend = platform_implementation or ("cudnn" if impl == "cudnn" else "xla")
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None, :, :],
                                           scale=scale, implementation=backend)
    return jnp.where(any_visible, out, jnp.zeros((), out.dtype)).astype(q.dtype)
