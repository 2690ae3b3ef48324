"""Cache consistency: prefill + single-token steps reproduce one full forward, also left-padded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eft_jax.models import llama
from eft_jax.models.config import FULL, SLIDING, LlamaConfig
from eft_jax.models.kv_cache import KVCache
from tolerances import logits_tolerance

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=100.0, qkv_bias=True)
forward = jax.jit(llama.forward, static_argnums=0)


def _cache(batch, slots):
    return KVCache.zeros(num_layers=CFG.num_layers, batch=batch, slots=slots, num_kv_heads=CFG.num_kv_heads,
                         head_dim=CFG.head_dim, dtype=jnp.float32)


def _tol(reference) -> float:
    """Cached and full forwards differ only by rounding: float32 eps x max |logit| x sqrt(longest reduction
    (MLP 64) x 3 layers) x LAMBDA = 8 (~4e-5 here, observed <= 1.5e-6); a wrong position, a stale or
    missing cache slot moves the logits by O(1)."""
    return logits_tolerance(reference, hidden=CFG.hidden_size, intermediate=CFG.intermediate_size,
                            layers=CFG.num_layers, seq=16)


def _full(params, tokens):
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(forward(CFG, params, jnp.asarray(tokens), jnp.asarray(positions))[0])


def _prefill_then_steps(cfg, params, tokens, prompt_len):
    """Logits of a prefill of ``prompt_len`` tokens into a 16-slot cache, then one step per remaining token,
    concatenated ``[batch, seq, vocab]``; and the final cache."""
    pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    cache = KVCache.zeros(num_layers=cfg.num_layers, batch=tokens.shape[0], slots=16, num_kv_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, dtype=jnp.float32)
    logits, cache = forward(cfg, params, tokens[:, :prompt_len], pos[:, :prompt_len], cache)
    got = [np.asarray(logits)]
    for t in range(prompt_len, tokens.shape[1]):
        logits, cache = forward(cfg, params, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    return np.concatenate(got, axis=1), cache


@pytest.mark.parametrize("prompt_len,steps", [(5, 7), (1, 4)])
def test_prefill_then_steps_equals_full_forward(prompt_len, steps):
    params = llama.init_params(CFG, jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, 97, size=(2, prompt_len + steps))
    full = _full(params, tokens)

    got, cache = _prefill_then_steps(CFG, params, tokens, prompt_len)
    np.testing.assert_allclose(got, full, atol=_tol(full), rtol=0)
    assert np.asarray(cache.length).tolist() == [prompt_len + steps] * 2


# Sliding-window configs (window 4, shorter than the 12-token sequences): Mistral-style (every layer
# slides) and Gemma-3-style (sliding and full layers, their own rope bases, q/k norms, sandwich norms,
# soft-capping, GeGLU, scaled embeddings).
WINDOWED = {
    "mistral": dataclasses.replace(CFG, sliding_window=4, layer_types=(SLIDING,) * 3),
    "gemma": dataclasses.replace(
        CFG, qkv_bias=False, sliding_window=4, layer_types=(SLIDING, FULL, SLIDING), local_rope_theta=10.0,
        norm_plus_one=True, qk_norm="head", post_norms=True, mlp_activation="gelu_tanh", embed_scale=True,
        query_scale=0.3, attn_softcap=2.0, final_softcap=5.0, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(WINDOWED))
@pytest.mark.parametrize("prompt_len,steps", [(5, 7), (2, 10)])
def test_windowed_prefill_then_steps_equals_full_forward(name, prompt_len, steps):
    """Across the window boundary: the cached steps' keys leave the window exactly as in the full forward
    (and the window really cuts: the same model without windows gives other logits)."""
    cfg = WINDOWED[name]
    params = llama.init_params(cfg, jax.random.key(3))
    tokens = np.random.RandomState(3).randint(0, 97, size=(2, prompt_len + steps))
    pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    full = np.asarray(forward(cfg, params, jnp.asarray(tokens), jnp.asarray(pos))[0])
    unwindowed = np.asarray(forward(dataclasses.replace(cfg, layer_types=None), params, jnp.asarray(tokens),
                                    jnp.asarray(pos))[0])
    assert np.abs(unwindowed[:, 4:] - full[:, 4:]).max() > 100 * _tol(full)

    got, _ = _prefill_then_steps(cfg, params, tokens, prompt_len)
    np.testing.assert_allclose(got, full, atol=_tol(full), rtol=0)


def test_windowed_per_layer_loop_equals_scan():
    """The per-layer run layout (a Python loop, static windows) and the scan (windows traced per layer)."""
    cfg = WINDOWED["gemma"]
    params = llama.init_params(cfg, jax.random.key(4))
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 97, size=(2, 12)))
    pos = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    scanned = np.asarray(forward(cfg, params, tokens, pos)[0])
    looped = np.asarray(forward(cfg, llama.run_params(params, transpose=True), tokens, pos)[0])
    np.testing.assert_allclose(looped, scanned, atol=_tol(scanned), rtol=0)


def test_left_padded_rows_match_their_unpadded_forward():
    params = llama.init_params(CFG, jax.random.key(1))
    rng = np.random.RandomState(1)
    short, long = rng.randint(0, 97, size=4), rng.randint(0, 97, size=9)
    tokens = np.stack([np.concatenate([np.zeros(5, int), short]), long])
    positions = np.stack([np.r_[[-1] * 5, np.arange(4)], np.arange(9)])
    logits, cache = forward(CFG, params, tokens, positions, _cache(2, 12))
    short_full, long_full = _full(params, short[None])[0], _full(params, long[None])[0]
    np.testing.assert_allclose(np.asarray(logits)[0, 5:], short_full, atol=_tol(short_full), rtol=0)
    np.testing.assert_allclose(np.asarray(logits)[1], long_full, atol=_tol(long_full), rtol=0)
    # One more token each: the padded row continues at position 4, the other at 9.
    nxt = np.array([[3], [4]])
    step, _ = forward(CFG, params, nxt, np.array([[4], [9]]), cache)
    for row, full in ((0, _full(params, np.r_[short, 3][None])[0, -1]), (1, _full(params, np.r_[long, 4][None])[0, -1])):
        np.testing.assert_allclose(np.asarray(step)[row, 0], full, atol=_tol(full), rtol=0)


def test_rewind_forgets_rejected_tokens():
    params = llama.init_params(CFG, jax.random.key(2))
    tokens = np.random.RandomState(2).randint(0, 97, size=(1, 8))
    pos = np.arange(8)[None]
    _, cache = forward(CFG, params, tokens[:, :6], pos[:, :6], _cache(1, 10))
    cache = cache.rewind(jnp.array([4]))  # drop tokens 4 and 5, then write different ones
    other = np.array([[11, 12]])
    logits, _ = forward(CFG, params, other, pos[:, 4:6], cache)
    expect = _full(params, np.concatenate([tokens[:, :4], other], axis=1))[:, 4:]
    np.testing.assert_allclose(np.asarray(logits), expect, atol=_tol(expect), rtol=0)


def test_logits_at_selects_columns_of_the_full_forward():
    params = llama.init_params(CFG, jax.random.key(3))
    tokens = np.random.RandomState(3).randint(0, 97, size=(2, 7))
    full = _full(params, tokens)
    at = np.array([[6, 2], [0, 5]])
    positions = np.broadcast_to(np.arange(7), tokens.shape)
    got, _ = forward(CFG, params, tokens, positions, logits_at=at)
    want = np.take_along_axis(full, at[:, :, None], axis=1)
    np.testing.assert_allclose(np.asarray(got), want, atol=_tol(want), rtol=0)  # bit-exact here; same bound


def test_attention_over_the_filled_window_equals_the_full_cache():
    """Random caches with ragged lengths (and a left-padded row): a decode step over the first W slots
    (``decode.window_caches``, W >= every row's length + 1) gives the logits of the whole-cache step,
    and writing the window back leaves the full cache exactly as the whole-cache step does."""
    from eft_jax.decode import unwindow_caches, window_caches

    params = llama.init_params(CFG, jax.random.key(3))
    rng = np.random.RandomState(3)
    batch, slots = 4, 40
    lengths = np.array([3, 17, 9, 1])
    pos = np.full((batch, slots), -1)
    for b, n in enumerate(lengths):
        pos[b, :n] = np.arange(n) - (2 if b == 2 else 0)  # row 2: two left-padding slots (-1, -2 -> masked)
    pos = np.where(pos < 0, -1, pos)
    kv_shape = (CFG.num_layers, batch, slots, CFG.num_kv_heads, CFG.head_dim)
    cache = KVCache(k=jnp.asarray(rng.standard_normal(kv_shape), jnp.float32),
                    v=jnp.asarray(rng.standard_normal(kv_shape), jnp.float32),
                    pos=jnp.asarray(pos, jnp.int32), length=jnp.asarray(lengths, jnp.int32))
    token = rng.randint(0, 97, size=(batch, 1))
    position = (pos.max(axis=1) + 1)[:, None]

    full_logits, full_cache = forward(CFG, params, token, position, cache)
    (part,) = window_caches((cache,), (32,))  # 32 >= 17 + 1
    logits, part = forward(CFG, params, token, position, part)
    (merged,) = unwindow_caches((cache,), (part,))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full_logits), atol=_tol(np.asarray(full_logits)),
                               rtol=0)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(full_cache), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# The non-Llama blocks: GPT-NeoX style (LayerNorms with biases, parallel residual, a quarter of each head
# rotated, non-gated exact GELU, biases everywhere), Falcon-7B style (one shared input norm, multi-query) and
# GPT-2 style (learned absolute positions, no rope, sequential LayerNorm blocks).
BLOCKS = {
    "neox_parallel_partial_rotary": dataclasses.replace(
        CFG, num_kv_heads=4, norm_type="layernorm", parallel_residual=True, rotary_dim=2, mlp_gated=False,
        mlp_activation="gelu", o_bias=True, mlp_bias=True, rms_norm_eps=1e-5),
    "falcon_shared_norm": dataclasses.replace(
        CFG, num_kv_heads=1, qkv_bias=False, norm_type="layernorm", parallel_residual=True, shared_input_norm=True,
        mlp_gated=False, mlp_activation="gelu", tie_word_embeddings=True),
    "gpt2_learned_positions": dataclasses.replace(
        CFG, num_kv_heads=4, norm_type="layernorm", position_embedding="learned", max_position_embeddings=32,
        mlp_gated=False, mlp_activation="gelu_tanh", o_bias=True, mlp_bias=True, tie_word_embeddings=True),
}


def _perturbed(cfg, seed):
    """Random init with norm scales and biases (ones and zeros at init) moved, so each one matters."""
    params = llama.init_params(cfg, jax.random.key(seed))

    def move(path, x):
        name = path[-1].key
        if name not in ("scale", "bias") and not name.endswith("_bias"):
            return x
        rng = np.random.default_rng(abs(hash(jax.tree_util.keystr(path))) % 2**32)
        return x + jnp.asarray(rng.normal(0.0, 0.2, x.shape), x.dtype)
    return jax.tree_util.tree_map_with_path(move, params)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_other_blocks_prefill_then_steps_equals_full_forward(name):
    cfg = BLOCKS[name]
    params = _perturbed(cfg, 5)
    tokens = np.random.RandomState(5).randint(0, 97, size=(2, 12))
    pos = np.broadcast_to(np.arange(12), tokens.shape)
    full = np.asarray(forward(cfg, params, jnp.asarray(tokens), jnp.asarray(pos))[0])
    got, _ = _prefill_then_steps(cfg, params, tokens, 5)
    np.testing.assert_allclose(got, full, atol=_tol(full), rtol=0)
    # Positions matter (a gap before the 7th token moves the later logits: rope sees the distances, a learned
    # table the absolute positions), and the per-layer contraction-minor layout runs the same model.
    gapped = np.asarray(forward(cfg, params, jnp.asarray(tokens), jnp.asarray(pos + 3 * (pos >= 6)))[0])
    np.testing.assert_array_equal(gapped[:, :6], full[:, :6])
    assert np.abs(gapped[:, 6:] - full[:, 6:]).max() > 100 * _tol(full)
    looped = np.asarray(forward(cfg, llama.run_params(params, transpose=True), jnp.asarray(tokens),
                                jnp.asarray(pos))[0])
    np.testing.assert_allclose(looped, full, atol=_tol(full), rtol=0)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_other_blocks_left_padding(name):
    """A left-padded row (positions -1; a learned table's padding rows read row 0) gives its unpadded logits."""
    cfg = BLOCKS[name]
    params = _perturbed(cfg, 6)
    rng = np.random.RandomState(6)
    short, long = rng.randint(0, 97, size=4), rng.randint(0, 97, size=9)
    tokens = np.stack([np.concatenate([np.zeros(5, int), short]), long])
    positions = np.stack([np.r_[[-1] * 5, np.arange(4)], np.arange(9)])
    cache = KVCache.zeros(num_layers=cfg.num_layers, batch=2, slots=12, num_kv_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, dtype=jnp.float32)
    logits, _ = forward(cfg, params, tokens, positions, cache)
    for row, (toks, cols) in enumerate(((short, slice(5, None)), (long, slice(None)))):
        want = np.asarray(forward(cfg, params, jnp.asarray(toks[None]), jnp.arange(len(toks))[None])[0])[0]
        np.testing.assert_allclose(np.asarray(logits)[row, cols], want, atol=_tol(want), rtol=0)
