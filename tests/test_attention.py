"""``eft_jax.models.attention.attention``: the einsum reference and the platform path
(``jax.nn.dot_product_attention``, implementation "xla" on CPU) against an independent float64 numpy
softmax, with ragged lengths, left padding, grouped-query heads, several queries per row and queries
that see no key at all."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eft_jax.models.attention import attention, resolve_impl
from tolerances import float32_tolerance

B, T, S, H, KV, D = 4, 3, 16, 6, 2, 8


def _case(seed: int = 0):
    """Random q/k/v, and positions for: a full row, a left-padded row, a row whose fill pointer stops
    short of stale slots, and a row whose first query is padding (sees nothing)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32) * 2
    k = rng.standard_normal((B, S, KV, D)).astype(np.float32) * 2
    v = rng.standard_normal((B, S, KV, D)).astype(np.float32)
    k_pos = np.tile(np.arange(S), (B, 1))
    k_pos[1, :5] = -1  # left padding: positions start after 5 padding slots
    k_pos[1, 5:] = np.arange(S - 5)
    k_pos[3, :] = -1  # a row with an empty cache so far ...
    k_pos[3, 10:] = np.arange(6)
    kv_length = np.array([S, S, 9, S], np.int32)  # row 2: slots 9.. are stale (past the fill pointer)
    q_pos = np.array([[13, 14, 15], [8, 9, 10], [6, 7, 8], [-1, 0, 5]], np.int32)  # row 3: a padding query
    return q, k, v, q_pos.astype(np.int32), k_pos.astype(np.int32), kv_length


def _numpy_reference(q, k, v, q_pos, k_pos, kv_length):
    """float64 softmax attention written out per row, query and head; zeros where nothing is visible."""
    out = np.zeros(q.shape, np.float64)
    group = H // KV
    for b in range(B):
        for t in range(T):
            vis = (k_pos[b] >= 0) & (k_pos[b] <= q_pos[b, t]) & (np.arange(S) < kv_length[b])
            if not vis.any():
                continue
            for h in range(H):
                kk, vv = k[b, vis, h // group].astype(np.float64), v[b, vis, h // group].astype(np.float64)
                s = kk @ q[b, t, h].astype(np.float64) / math.sqrt(D)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ vv
    return out


def _tolerance(q, k, v):
    """Rounding bound of float32 attention against exact arithmetic: the scores' dot products (length D,
    terms up to max|q| max|k|) carry eps x |q||k| sqrt(D) x LAMBDA; a score error e moves the softmax
    weights by at most 2e relative (p e^{+-2e}), so the output (a convex mix of values, |v| <= max|v|)
    moves by 2e max|v| plus its own sum of S terms: eps x max|v| sqrt(S) x LAMBDA."""
    score_err = float32_tolerance(np.abs(q).max() * np.abs(k).max() / math.sqrt(D), D)
    return 2 * score_err * np.abs(v).max() * 2 + float32_tolerance(np.abs(v).max(), S)


@pytest.mark.parametrize("impl", ["einsum", "platform"])
def test_attention_matches_numpy_reference(impl):
    q, k, v, q_pos, k_pos, kv_length = _case()
    fn = jax.jit(lambda *a: attention(*a, impl=impl, platform_implementation="xla"))
    got = np.asarray(fn(q, k, v, q_pos, k_pos, kv_length))
    want = _numpy_reference(q, k, v, q_pos, k_pos, kv_length)
    assert np.isfinite(got).all()  # the padding query (row 3, query 0) too
    np.testing.assert_array_equal(got[3, 0], 0.0)
    np.testing.assert_allclose(got, want, atol=_tolerance(q, k, v), rtol=0)


def test_platform_equals_einsum_reference():
    q, k, v, q_pos, k_pos, kv_length = _case(1)
    ref = jax.jit(lambda *a: attention(*a, impl="einsum"))(q, k, v, q_pos, k_pos, kv_length)
    got = jax.jit(lambda *a: attention(*a, impl="platform", platform_implementation="xla"))(
        q, k, v, q_pos, k_pos, kv_length)
    # Two float32 computations of the same values, each within _tolerance of the exact ones.
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2 * _tolerance(q, k, v), rtol=0)


def test_all_masked_rows_give_zeros_not_nan():
    q, k, v, q_pos, _, _ = _case()
    k_pos = np.full((B, S), -1, np.int32)  # nothing cached anywhere
    for impl in ("einsum", "platform"):
        out = np.asarray(attention(q, k, v, q_pos, k_pos, None, impl=impl, platform_implementation="xla"))
        np.testing.assert_array_equal(out, 0.0)


def test_kv_length_none_sees_every_slot_and_bf16_runs():
    q, k, v, q_pos, k_pos, _ = _case(2)
    full = np.full((B,), S, np.int32)
    a = attention(q, k, v, q_pos, k_pos, None, impl="einsum")
    b = attention(q, k, v, q_pos, k_pos, full, impl="einsum")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out = attention(*bf, q_pos, k_pos, None, impl="platform", platform_implementation="xla")
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_default_impl_is_einsum_on_cpu_and_can_be_overridden(monkeypatch):
    import eft_jax.models.attention as attention_module

    assert resolve_impl() == ("einsum" if jax.default_backend() == "cpu" else "platform")
    monkeypatch.setattr(attention_module, "DEFAULT_IMPL", "platform")
    assert resolve_impl() == "platform"
    assert resolve_impl("einsum") == "einsum"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("flash")  # type: ignore[arg-type]
