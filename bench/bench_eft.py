"""EFT decoding throughput against decoding the large model alone, in the same engine and run.

Random-weight Llama-shaped models (no checkpoint needed). For each batch size it measures, side by
side in one process:

- tokens/s of a plain decode chunk of the large model alone, and of the EFT chunk (large base +
  small base + small fine-tune), and their ratio, next to the ideal ratio (the three models' weight
  bytes over the large model's: decode is memory-bound, so that is what EFT should cost);
- the time per step spent outside the three forwards (combine + filter + sample + record), measured
  directly: the same post-forward work run alone in a scan on fixed logits.

``--layers per-layer`` runs the forward over separate per-layer weight buffers (a Python loop over layers)
instead of ``lax.scan`` over the stacked ones, to see whether the scan copies weights on this backend.

Usage: python bench/bench_eft.py [--preset cpu|gpu] [--batches 1,8,64] [--steps 64] [--layers stacked|per-layer]
Measures, prints; asserts nothing. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from eft_jax import decode
from eft_jax.model import Model, param_shardings
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.sampling import SamplingParams
from eft_jax.sharding import TENSOR_PARALLEL, single_device_mesh

PRESETS = {
    # Small enough for a 2-core CPU; the vocabulary is realistic (it dominates combine + sample).
    "cpu": dict(
        large=dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64),
        small=dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64),
        vocab=32000, dtype="float32", prompt=32,
    ),
    # Llama-3-8B-shaped large and two Llama-3.2-1B-shaped small models, bf16.
    "gpu": dict(
        large=dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128),
        small=dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64),
        vocab=128256, dtype="bfloat16", prompt=128,
    ),
}


def random_model(shape: dict, vocab: int, dtype: str, seed: int) -> Model:
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, rope_theta=500000.0, **shape)
    mesh = single_device_mesh()
    shardings = param_shardings(cfg, mesh, TENSOR_PARALLEL)
    params = jax.jit(lambda k: llama.init_params(cfg, k, jnp.dtype(dtype)), out_shardings=shardings)(jax.random.key(seed))
    return Model(cfg, params, None, mesh, TENSOR_PARALLEL, f"random-{seed}")


def _combine_sample_chunk(plan: decode.Plan, logits: tuple, weights, state: decode.DecodeState) -> decode.DecodeState:
    """Only what a step does after the forwards (combine, filter, sample, record), ``plan.chunk`` times."""

    def step(state, i):
        # Perturb the logits per step so XLA cannot hoist the work out of the loop.
        shifted = tuple(x + i.astype(x.dtype) * 1e-3 for x in logits)
        return decode._choose_and_record(plan, state, shifted, weights, jnp.int32(0)), None

    state, _ = jax.lax.scan(step, state, jnp.arange(plan.chunk))
    return state


combine_sample_chunk = jax.jit(_combine_sample_chunk, static_argnums=0, donate_argnames=("state",))


def per_layer(params: dict) -> dict:
    """``params`` with the stacked layer leaves split into one buffer per layer (copies)."""
    layers = params["layers"]
    if isinstance(layers, tuple):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n))}


def time_decode(models: list[Model], batch: int, steps: int, prompt: int, chunk_fn, layers: str = "stacked") -> float:
    """Seconds per decode step (median of 3 timed runs of ``steps`` steps, after a warm-up)."""
    vocab = models[0].config.vocab_size
    plan = decode.Plan(
        configs=tuple(m.config for m in models), vocab=vocab, n_ft=len(models) - 2 if len(models) > 1 else 0,
        base_top_p=None, sampling=SamplingParams(temperature=1.0), stop_ids=(), pad_id=0, chunk=steps,
    )
    params = tuple(per_layer(m.run_params) if layers == "per-layer" else m.run_params for m in models)
    weights = jnp.ones((max(plan.n_ft, 1),), jnp.float32)
    rng = np.random.RandomState(0)
    toks = [jnp.asarray(rng.randint(0, vocab, size=(batch, prompt)), jnp.int32) for _ in models]
    pos = [jnp.broadcast_to(jnp.arange(prompt, dtype=jnp.int32), (batch, prompt)) for _ in models]
    stream = jnp.arange(batch, dtype=jnp.int32)
    max_new = jnp.full((batch,), 10**6, jnp.int32)
    out_len = 1 + steps

    layouts = tuple(m.cache_layout(batch, prompt + out_len) for m in models)

    def fresh_state():
        rows = decode.NewRows(tuple(toks), tuple(pos), stream, max_new, layouts, out_len)
        return decode.start(plan, params, rows, weights, jnp.int32(0))

    if chunk_fn == "eft":
        run = lambda s: decode.decode_chunk(plan, params, weights, jnp.int32(0), s)  # noqa: E731
    else:
        logits = tuple(jax.random.normal(jax.random.key(i), (batch, m.config.vocab_size)) for i, m in enumerate(models))
        run = lambda s: combine_sample_chunk(plan, logits, weights, s)  # noqa: E731
    jax.block_until_ready(run(fresh_state()))  # compile + warm-up
    times = []
    for _ in range(3):
        state = jax.block_until_ready(fresh_state())
        start = time.perf_counter()
        jax.block_until_ready(run(state))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if jax.default_backend() == "gpu" else "cpu")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layers", choices=("stacked", "per-layer"), default="stacked",
                        help="weights as held (stacked, scanned; per-layer on one CPU device) or split per layer")
    args = parser.parse_args()
    p = PRESETS[args.preset]

    large = random_model(p["large"], p["vocab"], p["dtype"], 1)
    small_base = random_model(p["small"], p["vocab"], p["dtype"], 2)
    small_ft = random_model(p["small"], p["vocab"], p["dtype"], 3)
    trio = [large, small_base, small_ft]
    ideal = sum(m.weight_bytes for m in trio) / large.weight_bytes
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# bench_eft preset={args.preset} device={jax.devices()[0].device_kind} backend={jax.default_backend()} "
          f"host={platform.node()} commit={commit} date={time.strftime('%Y-%m-%d')}")
    print(f"# large {large.config.num_params / 1e6:.0f}M params, small {small_base.config.num_params / 1e6:.0f}M x2, "
          f"vocab {p['vocab']}, {p['dtype']}, prompt {p['prompt']}, {args.steps} steps per chunk, layers {args.layers}")
    print("| batch | large alone tok/s | EFT tok/s | EFT/large time ratio | ideal (weight bytes) | combine+sample per step "
          "| share of EFT step | EFT weight GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.batches.split(",")]:
        alone = time_decode([large], batch, args.steps, p["prompt"], "eft", args.layers)
        eft = time_decode(trio, batch, args.steps, p["prompt"], "eft", args.layers)
        overhead = time_decode(trio, batch, args.steps, p["prompt"], "combine")
        print(f"| {batch} | {batch / alone:,.0f} | {batch / eft:,.0f} | {eft / alone:.2f} | {ideal:.2f} | "
              f"{overhead * 1e3:.2f} ms | {overhead / eft:.1%} | "
              f"{sum(m.weight_bytes for m in trio) / eft / 1e9:.1f} |", flush=True)
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        print(f"# device memory in use: {stats.get('bytes_in_use', 0) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
