"""The attention implementations side by side on the current backend: agreement and time.

For decode shapes (1 query per row over a long, raggedly filled cache) and prefill shapes (a whole
left-padded prompt), each implementation of :func:`eft_jax.models.attention.attention` ("einsum", the
reference; "platform", ``jax.nn.dot_product_attention`` with XLA; "cudnn", GPU only) is run in bfloat16
and compared with the einsum reference computed in float32 at "highest" matmul precision from the same
bf16-rounded inputs. The difference is printed in units of bf16's epsilon x max|v| (the output's scale):
a figure of a few units is rounding; one of hundreds would mean a wrong mask. Time is the best of
``--reps`` calls of the jitted function.

Usage: python bench/bench_attention.py [--reps 20]
Measures, prints; asserts nothing. Meant for GPU/TPU (on CPU "cudnn" is skipped).
"""

from __future__ import annotations

import argparse
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from eft_jax.models.attention import attention

# (name, batch, queries, cache slots, heads, kv heads, head_dim): Llama-3-8B attention geometry.
SHAPES = [
    ("decode b16 s2048", 16, 1, 2048, 32, 8, 128),
    ("decode b64 s1024", 64, 1, 1024, 32, 8, 128),
    ("verify b16 t5 s2048", 16, 5, 2048, 32, 8, 128),
    ("prefill b4 t512", 4, 512, 512, 32, 8, 128),
]


def case(batch: int, queries: int, slots: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """bf16 q/k/v; rows filled to ragged lengths (the rest of each row's slots empty, position -1), the
    queries at the last positions of each row; in prefill shapes rows are left-padded instead."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, queries, heads, head_dim)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((batch, slots, kv_heads, head_dim)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((batch, slots, kv_heads, head_dim)), jnp.bfloat16)
    if queries == slots:  # prefill: left padding of random width, positions 0.. after it
        pad = rng.integers(0, slots // 2, batch)
        k_pos = np.arange(slots)[None, :] - pad[:, None]
        k_pos = np.where(k_pos < 0, -1, k_pos)
        q_pos, kv_length = k_pos.copy(), np.full(batch, slots)
    else:  # decode / verify: row b filled to length[b]; its queries are the last `queries` filled slots
        length = rng.integers(queries + 1, slots + 1, batch)
        k_pos = np.where(np.arange(slots)[None, :] < length[:, None], np.arange(slots)[None, :], -1)
        q_pos = length[:, None] - queries + np.arange(queries)[None, :]
        kv_length = length
    as_i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return q, k, v, as_i32(q_pos), as_i32(k_pos), as_i32(kv_length)


def best_time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# bench_attention device={jax.devices()[0].device_kind} backend={jax.default_backend()} "
          f"jax={jax.__version__} commit={commit} date={time.strftime('%Y-%m-%d')}")
    impls = ["einsum", "platform"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    print("| shape | impl | max abs diff / (bf16 eps x max abs v) | time (ms) | time / einsum |")
    print("|---|---|---:|---:|---:|")
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    for name, *shape in SHAPES:
        q, k, v, q_pos, k_pos, kv_length = case(*shape)
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(lambda *a: attention(*a, impl="einsum"))(
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), q_pos, k_pos, kv_length)
        scale = eps * float(jnp.max(jnp.abs(v.astype(jnp.float32))))
        einsum_time = None
        for impl in impls:
            fn = jax.jit(lambda *a, impl=impl: attention(*a, impl=impl))
            try:
                out = fn(q, k, v, q_pos, k_pos, kv_length)
                t = best_time(fn, (q, k, v, q_pos, k_pos, kv_length), args.reps)
            except Exception as e:  # noqa: BLE001 (a backend that refuses a shape is a result here)
                print(f"| {name} | {impl} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | - | - |")
                continue
            diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) / scale
            einsum_time = einsum_time or t
            print(f"| {name} | {impl} | {diff:.2f} | {t * 1e3:.3f} | {t / einsum_time:.2f} |", flush=True)


if __name__ == "__main__":
    main()
