"""The two layouts of the layer weights (``eft_jax.models.llama``): per-layer views on one CPU device run
the same math as the scanned stacked layers, share their memory, and the scanned program stays flat in
depth."""

import dataclasses
import re
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from eft_jax.model import Model
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.models.kv_cache import KVCache
from eft_jax.sharding import REPLICATED, make_mesh, single_device_mesh
from tolerances import float32_tolerance, logits_tolerance

CFG = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=112, num_layers=4, num_heads=6, num_kv_heads=2,
                  head_dim=8, qkv_bias=True)
_forward = jax.jit(llama.forward, static_argnums=0)


def _random_params(cfg: LlamaConfig) -> dict:
    # Biases and norm scales random too (init gives zeros/ones), so a layer mixed up with another shows.
    params = llama.init_params(cfg, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape) if x.ndim <= 3 else x, params)


def test_per_layer_views_share_the_stacked_buffers():
    params = _random_params(CFG)
    per_layer = llama.run_params(params)["layers"]
    assert isinstance(per_layer, tuple) and len(per_layer) == CFG.num_layers
    for i, layer in enumerate(per_layer):
        for stacked, view in zip(jax.tree.leaves(params["layers"]), jax.tree.leaves(layer), strict=True):
            np.testing.assert_array_equal(np.asarray(view), np.asarray(stacked[i]))
            if view.nbytes % 64 == 0:  # the runtime views 64-byte aligned slices: no second copy
                assert view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + i * view.nbytes


def test_per_layer_loop_gives_the_scanned_logits():
    params = _random_params(CFG)
    per_layer = llama.run_params(params)
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, CFG.vocab_size, (3, 10)))
    positions = jnp.broadcast_to(jnp.arange(10), (3, 10)).at[0, :3].set(-1)  # a left-padded row
    want, _ = _forward(CFG, params, tokens, positions)
    got, _ = _forward(CFG, per_layer, tokens, positions)
    # Same float32 math, possibly fused differently: the rounding bound eps x max|logit| x
    # sqrt(longest reduction (MLP 112) x layers) x LAMBDA (tests/tolerances.py); a layer run with another
    # layer's weights or cache moves the logits by O(max|logit|).
    tol = logits_tolerance(np.asarray(want), hidden=CFG.hidden_size, intermediate=CFG.intermediate_size,
                           layers=CFG.num_layers, seq=10)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=0)

    # Cached: a prefill of 6 tokens then 4 one-token steps, both layouts from one empty cache.
    caches = [KVCache.zeros(num_layers=CFG.num_layers, batch=3, slots=12, num_kv_heads=CFG.num_kv_heads,
                            head_dim=CFG.head_dim, dtype=jnp.float32) for _ in range(2)]
    for start, stop in [(0, 6), (6, 7), (7, 8), (8, 9), (9, 10)]:
        step = [_forward(CFG, p, tokens[:, start:stop], positions[:, start:stop], c)
                for p, c in zip((params, per_layer), caches, strict=True)]
        (want_step, want_cache), (got_step, got_cache) = step
        np.testing.assert_allclose(np.asarray(got_step), np.asarray(want_step), atol=tol, rtol=0)
        # Against the uncached forward: two computations, each within tol of the exact logits.
        real = np.asarray(positions[:, start:stop] >= 0)  # a padding query's output is never used
        np.testing.assert_allclose(np.asarray(got_step)[real], np.asarray(want[:, start:stop])[real], atol=2 * tol, rtol=0)
        caches = [want_cache, got_cache]
    np.testing.assert_array_equal(np.asarray(caches[0].length), np.asarray(caches[1].length))
    np.testing.assert_allclose(np.asarray(caches[1].k), np.asarray(caches[0].k), atol=tol, rtol=0)


def test_model_runs_per_layer_on_one_cpu_device_and_stacked_on_a_mesh():
    params = _random_params(CFG)
    one = Model(CFG, params, None, single_device_mesh(), REPLICATED, "random")
    assert isinstance(one.run_params["layers"], tuple)
    assert one.params["layers"]["attn"]["q"].shape[0] == CFG.num_layers  # the canonical layout is kept
    mesh = make_mesh(data=2, model=4)
    on_mesh = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert isinstance(Model(CFG, on_mesh, None, mesh, REPLICATED, "random").run_params["layers"], dict)


def _hlo_chars(cfg: LlamaConfig, params: dict) -> int:
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = KVCache.zeros(num_layers=cfg.num_layers, batch=1, slots=8, num_kv_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, dtype=jnp.float32)
    text = _forward.lower(cfg, params, tokens, tokens, cache).compile().as_text()
    return len(re.sub(r"\d+", "0", text))  # layer counts in shapes must not count as growth


def test_scanned_program_does_not_grow_with_depth_and_the_loop_does():
    shallow, deep = (dataclasses.replace(CFG, num_layers=n) for n in (2, 16))
    shallow_params, deep_params = (llama.abstract_params(c) for c in (shallow, deep))
    scanned = _hlo_chars(shallow, shallow_params), _hlo_chars(deep, deep_params)
    assert scanned[1] <= 1.02 * scanned[0], scanned
    # The per-layer loop is unrolled by design (CPU only, where compile time is small next to decoding).
    per_layer = (_hlo_chars(c, {**p, "layers": tuple(jax.tree.map(lambda x: x[0], p["layers"]) for _ in range(c.num_layers))})
                 for c, p in ((shallow, llama.init_params(shallow, jax.random.key(0))),
                              (deep, llama.init_params(deep, jax.random.key(0)))))
    small, large = per_layer
    assert large > 4 * small


def test_contraction_minor_copies_give_the_scanned_logits_and_convert_back():
    params = _random_params(CFG)
    struct = jax.tree.map(lambda x: x, params)  # run_params(consume=True) empties this structure, not params
    minor = llama.run_params(struct, transpose=True, consume=True)
    assert isinstance(minor["layers"], llama.MinorLayers) and len(minor["layers"]) == CFG.num_layers
    assert minor["layers"][0]["mlp"]["gate"].shape == (CFG.intermediate_size, CFG.hidden_size)
    assert minor["lm_head"].shape == (CFG.vocab_size, CFG.hidden_size)
    assert jax.tree.leaves(struct["layers"]) == [] and "lm_head" not in struct
    # Exactly the canonical values, moved: stacked_params inverts the conversion bit for bit.
    back = llama.stacked_params(minor)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)

    rng = np.random.RandomState(1)
    tokens = jnp.asarray(rng.randint(0, CFG.vocab_size, (3, 10)))
    positions = jnp.broadcast_to(jnp.arange(10), (3, 10)).at[1, :4].set(-1)
    want, _ = _forward(CFG, params, tokens, positions)
    got, _ = _forward(CFG, minor, tokens, positions)
    tol = logits_tolerance(np.asarray(want), hidden=CFG.hidden_size, intermediate=CFG.intermediate_size,
                           layers=CFG.num_layers, seq=10)  # same math, other summation order (see above)
    real = np.asarray(positions >= 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=tol, rtol=0)


def test_model_holds_the_weights_once_in_the_cpu_run_layout():
    params = _random_params(CFG)
    model = Model(CFG, params, None, single_device_mesh(), REPLICATED, "random")
    bytes_before = model.weight_bytes
    run = model.run_params
    assert isinstance(run["layers"], llama.MinorLayers)
    assert model._stacked is None  # released: only the run layout is held
    assert model.weight_bytes == bytes_before and model.dtype == jnp.float32
    # ``params`` is rebuilt canonical on access, equal to what was loaded.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), model.params, params)
    # A second Model on the same run params shares them (no conversion, no copy).
    twin = model.replace(source="twin", params=run)
    assert twin.run_params["layers"][0]["mlp"]["gate"] is run["layers"][0]["mlp"]["gate"]


def test_bf16_single_row_dense_equals_the_plain_dot():
    # One bf16 row is computed as two identical rows (XLA:CPU's fast path); the result must be the same
    # dot: float32 accumulation of the same bf16 products, rounded once to bf16 (one bf16 ulp apart at most).
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(1, 1, 64), jnp.bfloat16)
    w = jnp.asarray(rng.randn(32, 64), jnp.bfloat16)
    got = np.asarray(llama._dense("btd,fd->btf", x, w).astype(jnp.float32))
    exact = np.asarray(x.astype(jnp.float32))[0, 0] @ np.asarray(w.astype(jnp.float32)).T
    # float32 accumulation (bound of tests/tolerances.py) then one bf16 rounding (half a bf16 ulp, 2**-8 rel).
    tol = float32_tolerance(np.abs(np.asarray(x, np.float32)).max() * np.abs(np.asarray(w, np.float32)).max(), 64) \
        + np.abs(exact) * 2.0**-8
    np.testing.assert_array_less(np.abs(got[0, 0] - exact), tol + 1e-30)



def _dot_rows(jaxpr) -> list[tuple[str, int]]:
    """(left operand dtype, rows) of every weight dot (a ``dot_general`` without batch dims; attention's dots
    have them) in a jaxpr and its sub-jaxprs: rows = the product of the left operand's non-contracted dims."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), (batch, _) = eqn.params["dimension_numbers"]
            aval = eqn.invars[0].aval
            if not batch:
                out.append((aval.dtype.name, int(np.prod([d for i, d in enumerate(aval.shape) if i not in contract]))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _dot_rows(sub)
    return out


def test_no_bf16_dot_of_one_row_in_a_one_token_forward():
    # Regression: the LM head of a one-token, one-row bf16 step ran as a one-row dot, ~12x slower on XLA:CPU
    # than two rows (a 152k-vocabulary head: 212 ms against 18 ms). Every bf16 dot the model emits (projections
    # and head, tied or not, every layout) must have at least two rows.
    for tied in (False, True):
        cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), llama.init_params(cfg, jax.random.key(0)))
        if tied:
            params.pop("lm_head", None)
        cache = KVCache.zeros(num_layers=cfg.num_layers, batch=1, slots=8, num_kv_heads=cfg.num_kv_heads,
                              head_dim=cfg.head_dim, dtype=jnp.bfloat16)
        tok, pos = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)
        for layout in (params, llama.run_params(params), llama.run_params(params, transpose=True)):
            jaxpr = jax.make_jaxpr(lambda p, c: llama.forward(cfg, p, tok, pos, c))(layout, cache).jaxpr
            weight_dots = [d for d in _dot_rows(jaxpr) if d[0] == "bfloat16"]
            assert weight_dots and all(rows >= 2 for _, rows in weight_dots), (tied, type(layout["layers"]), weight_dots)


def _materialized_2d(hlo: str, smallest: int) -> list[str]:
    """2-D arrays with both dims >= ``smallest`` that the compiled program writes (outside fusions, other than
    parameters, tuple elements and bitcasts): ``weight_shaped_ops`` of bench/bench_cpu_decode.py, which
    reports them for the benchmark."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_cpu_decode.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.weight_shaped_ops(hlo, smallest)


def test_no_weight_is_copied_or_converted_inside_the_decode_loop():
    # Regression (issue 12, bf16 on CPU): inside a while loop (decode.decode_chunk), XLA:CPU's dot decomposer
    # turned every 3-D bf16 weight dot into [m, k] x [k, n] by transposing the weight, and loop-invariant code
    # motion hoisted that transpose out of the loop before it could be folded back into the dot: every weight
    # was copied to [in, out] at every chunk call (and the loop's dots ran on that layout); the bf16 embedding
    # gather converted the whole table to float32 the same way. A 1-layer Qwen2.5-1.5B-shaped model: 54 ms a
    # step in the loop against 24 ms bare. Now the weight dots are 2-D and the lookup keeps its conversion
    # fused: the compiled loop must write no array of a weight's size (activations have 1-2 rows here, the
    # cache 5 dims). The CPU run layouts only: a scan over stacked layers copies each layer's weights out of
    # the stacked buffer by design (see llama's module docstring).
    for tied in (False, True):
        cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
        for dtype in (jnp.bfloat16, jnp.float32):
            params = llama.init_params(cfg, jax.random.key(0), dtype)
            if tied:
                params.pop("lm_head", None)
            cache = KVCache.zeros(num_layers=cfg.num_layers, batch=1, slots=8, num_kv_heads=cfg.num_kv_heads,
                                  head_dim=cfg.head_dim, dtype=dtype)

            def loop(p, cache, cfg=cfg):
                def body(c):
                    i, cache, t = c
                    logits, cache = llama.forward(cfg, p, t, jnp.zeros_like(t) + i, cache)
                    return i + 1, cache, jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
                return jax.lax.while_loop(lambda c: c[0] < 4, body, (0, cache, jnp.zeros((1, 1), jnp.int32)))[2]

            layouts = (llama.run_params(params, transpose=True), llama.run_params(params))
            for layout in layouts if dtype == jnp.bfloat16 else layouts[:1]:  # float32: the CPU run layout
                ops = _materialized_2d(jax.jit(loop).lower(layout, cache).compile().as_text(), 16)
                assert not ops, (tied, jnp.dtype(dtype).name, type(layout["layers"]).__name__, ops)


def test_two_d_dots_and_the_lookup_equal_the_plain_ops():
    # ``_dot`` (every weight-dot form the model uses, as one 2-D dot) gives the einsum's values, and
    # ``_take_rows`` (through an optimization barrier for 16-bit tables) jnp.take's, out-of-range ids included.
    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.randn(3, 2, 4, 8), jnp.float32)
    cases = [("btd,dhk->bthk", x[:, :, 0], rng.randn(8, 3, 5)), ("bthk,hkd->btd", x, rng.randn(4, 8, 6)),
             ("btd,nd->btn", x[:, :, 0], rng.randn(7, 8)), ("btd,dv->btv", x[:, :, 0], rng.randn(8, 9))]
    for dtype in (jnp.float32, jnp.bfloat16):
        for spec, lhs, w in cases:
            lhs, w = lhs.astype(dtype), jnp.asarray(w, dtype)
            for rows in (lhs, lhs[:1, :1]):  # one bf16 row is doubled
                want = jnp.einsum(spec, rows, w, preferred_element_type=jnp.float32)
                got = llama._dot(spec, rows, w)
                assert got.shape == want.shape and got.dtype == jnp.float32
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
        table = jnp.asarray(rng.randn(10, 4), dtype)
        ids = jnp.asarray([[0, 9, 3], [-1, 12, 5]])  # negative wraps; past the end reads NaN, as jnp.take does
        want, got = jnp.take(table, ids, axis=0), jax.jit(llama._take_rows)(table, ids)
        assert got.dtype == table.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("variant", ["gqa", "tied", "qwen2_bias", "phi3", "gpt_neox", "gpt2", "falcon_new", "gemma3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loader_builds_the_cpu_run_layout_directly(tmp_path, variant, dtype):
    """On one CPU device ``load_model`` reads the checkpoint straight into the run layout: the same arrays,
    bit for bit, as placing the canonical layout on a mesh and converting it (``llama.run_params``), for
    families with fused or ``[in, out]`` tensors too; nothing stacked is held."""
    from eft_jax.loading import load_model
    from tiny import write_checkpoint

    write_checkpoint(tmp_path, variant, seed=3, max_shard_size="20KB")  # sharded safetensors
    direct = load_model(tmp_path, dtype=dtype, sharding="replicated")
    assert direct._stacked is None and isinstance(direct.run_params["layers"], llama.MinorLayers)
    canonical = load_model(tmp_path, dtype=dtype, mesh=make_mesh(data=4, model=2), sharding="replicated").params
    want = llama.run_params(jax.device_put(jax.device_get(canonical), jax.devices()[0]), transpose=True)
    got = direct.run_params
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype == jnp.dtype(dtype) and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _rewrite_aligned(path: Path) -> None:
    """Rewrite a safetensors file with every tensor at a 64-byte aligned address of the file (where the CPU
    runtime would use memory-mapped bytes in place), the header padded with spaces as the format allows."""
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body, entries, offset = bytearray(), {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            entries[name] = info
            continue
        begin, end = info["data_offsets"]
        offset += -offset % 64
        body += bytes(offset - len(body)) + data[8 + n + begin:8 + n + end]
        entries[name] = {**info, "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    text = json.dumps(entries).encode()
    text += b" " * (-(8 + len(text)) % 64)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(body))


def test_loaded_weights_do_not_alias_the_checkpoint_file(tmp_path):
    """The loader copies out of the memory-mapped safetensors even where the runtime could use the file's
    pages as they are (aligned tensors of the model's dtype): rewriting the file in place (a re-export to
    the same directory) leaves a loaded model's weights as they were."""
    import struct

    from eft_jax.loading import load_model
    from tiny import write_checkpoint

    write_checkpoint(tmp_path, "gqa", seed=3)
    for f in tmp_path.glob("*.safetensors"):
        _rewrite_aligned(f)
    model = load_model(tmp_path, dtype="float32", sharding="replicated")
    before = [np.array(x) for x in jax.tree.leaves(model.run_params)]
    for f in tmp_path.glob("*.safetensors"):
        with open(f, "r+b") as fh:
            (header,) = struct.unpack("<Q", fh.read(8))
            fh.seek(8 + header)
            fh.write(bytes(f.stat().st_size - 8 - header))  # every tensor's bytes zeroed in place
    for a, b in zip(jax.tree.leaves(model.run_params), before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
