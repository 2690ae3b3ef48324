"""int8 weight-only against bf16 on this CPU, side by side in one run, for a random model of realistic shape
(default: the 853M Llama shape of ``bench_cpu_decode.py``: vocab 32000, hidden 2048, MLP 5632, 16 layers,
32 heads, 8 kv heads).

1. Writes the model once as an HF checkpoint (bf16 safetensors) to a temporary directory.
2. Loads it twice, each in a fresh subprocess (``--load``), as bf16 and as int8 (bf16 activations): load
   time, the params' bytes and bytes per parameter, and the peak host memory while loading (a thread
   samples ``/proc/self/status`` every 5 ms): anonymous RSS (the process's own buffers; the safetensors
   file is memory-mapped, so its pages count as file-backed RSS, page cache that the kernel may drop) above
   the baseline after imports, against the model's bf16 bytes.
3. In this process, both models loaded, the one-token cached decode step (``llama.forward`` on
   ``Model.run_params``: one CPU device, the [out, in] per-layer layout) at batch 1 and 8, timed
   interleaved (best of ``--reps``): decode tokens/s = batch / step time.
4. The int8 step's compiled HLO (``quant.int8_converts``): how many s8 -> float converts it holds and the largest one (elements and
   bytes) against the largest projection matrix: no dequantized copy of a whole weight matrix.

``--plan``: instead, the memory plan (``eft_jax.memory``, from the configs alone) of the shipped 70B
configs (up- and down-scaling) with the 70B model(s) in int8 and with all three models in int8, on a TPU v5e-8 (mesh.model=8,
16 GB per chip) and on one H200 (141 GB): whether the trio fits and the largest batch that does (prompts
<= 1024 tokens, the configs' max_new_tokens and speculative k). The architectures are the published HF
config.json fields of each model.

Usage: python bench/bench_int8.py [--reps 5] [--batches 1,8] [--layers 16]
       python bench/bench_int8.py --plan
Measures, prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp

SHAPE_853M = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=32,
                  num_kv_heads=8, head_dim=64)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def load_in_this_process(path: str, quantize: str | None) -> dict:
    """Load ``path`` as bf16 (int8 projections with ``quantize``) while sampling the process's RSS."""
    from eft_jax.loading import load_model

    base_anon, base_rss = _status_kb("RssAnon"), _status_kb("VmRSS")
    peak = {"anon": base_anon, "rss": base_rss}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
            peak["rss"] = max(peak["rss"], _status_kb("VmRSS"))
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    model = load_model(path, dtype=jnp.bfloat16, quantize=quantize)
    jax.block_until_ready(model.params)
    took = time.perf_counter() - t
    done.set()
    thread.join()
    return {"quantize": quantize, "load_s": took, "weight_bytes": model.weight_bytes,
            "params": model.config.num_params, "peak_anon_above_base": (peak["anon"] - base_anon) * 1024,
            "peak_rss_above_base": (peak["rss"] - base_rss) * 1024}


def _load_report(path: str, quantize: str | None) -> dict:
    cmd = [sys.executable, __file__, "--load", path] + (["--quantize", quantize] if quantize else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


class Step:
    """The one-token cached forward of a model at ``batch`` rows, compiled once; ``__call__`` runs it."""

    def __init__(self, model, batch: int, filled: int = 64, slots: int = 128):
        from eft_jax.models import llama

        self.params = model.run_params
        cache = model.init_cache(batch, slots)
        pos = jnp.where(jnp.arange(slots) < filled, jnp.arange(slots), -1)
        self.cache = dataclasses.replace(cache, pos=jnp.broadcast_to(pos, (batch, slots)).astype(jnp.int32),
                                         length=jnp.full((batch,), filled, jnp.int32))
        self.tok = jnp.zeros((batch, 1), jnp.int32)
        self.pos = jnp.full((batch, 1), filled, jnp.int32)
        fn = jax.jit(lambda p, t, q, c: llama.forward(model.config, p, t, q, c)[0])
        self.compiled = fn.lower(self.params, self.tok, self.pos, self.cache).compile()

    def __call__(self) -> None:
        jax.block_until_ready(self.compiled(self.params, self.tok, self.pos, self.cache))


_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
HF_CONFIGS = {  # the published config.json fields that set the shapes
    "checkpoints/Llama-2-70b-hf": dict(_LLAMA, vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                       max_position_embeddings=4096, rope_theta=10000.0),
    "7b": dict(_LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0),
    "llama31_70b": dict(_LLAMA, vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192}),
    "llama31_8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192}),
}


def plan_shipped_configs() -> None:
    """The int8 memory plans of the shipped 70B configs (up- and down-scaling) (see the module docstring)."""
    from eft_jax import memory
    from eft_jax.config import load_config
    from eft_jax.models.families import config_from_hf

    repo = Path(__file__).resolve().parents[1]
    devices = {"TPU v5e-8 (8 x 16 GB, mesh.model=8)": (8, 16.0), "one H200 (141 GB, mesh.model=1)": (1, 141.0)}
    for name in ("llama2-upscale-70b-base-7b-chat", "llama3.1-upscale-70b-base-8b-instruct",
                 "llama2-downscale-7b-base-70b-chat", "llama3.1-downscale-8b-base-70b-instruct"):
        base = load_config(repo / "configs" / f"{name}.yaml")
        specs = {}
        for model, entry in base.models.items():
            key = "checkpoints/Llama-2-70b-hf" if "Llama-2-70b" in entry.path else (
                "7b" if "Llama-2-7b" in entry.path else ("llama31_70b" if "70B" in entry.path else "llama31_8b"))
            specs[model] = memory.ModelSpec(config_from_hf(HF_CONFIGS[key], where=key), "bfloat16")
        large = [m for m, entry in base.models.items() if "70" in entry.path]
        variants = {"bf16": [], "70B int8": [f"models.{m}.quantize=int8" for m in large],
                    "all int8": [f"models.{m}.quantize=int8" for m in base.models]}
        print(f"\n{name} (batch {base.job.batch_size}, prompts <= 1024 tokens, max_new_tokens "
              f"{base.job.max_new_tokens}, speculative k={base.speculative.k}), per device:")
        for device, (model_axis, gb) in devices.items():
            for label, overrides in variants.items():
                # (absolute paths: the checkpoints need not exist, nor be taken for Hub ids)
                paths = [f"models.{m}.path=/nonexistent/{m}" for m in base.models]
                config = load_config(repo / "configs" / f"{name}.yaml",
                                     overrides + paths + [f"mesh.model={model_axis}"])
                axes = {"data": 1, "model": model_axis}
                workload = memory.config_workload(config, 1024)
                mem = memory.DeviceMemory(int(gb * 1e9), "bench")
                plan = memory.plan_memory(config, specs, axes, workload, mem)
                most = memory.largest_batch(config, specs, axes, dataclasses.replace(workload, batch_size=4096), mem)
                weights = sum(m.weights for m in plan.models)
                print(f"  {device:36s} {label:18s} weights {weights / 1e9:6.1f} GB, total at batch "
                      f"{plan.batch} {plan.total / 1e9:6.1f} GB: {'fits' if plan.fits else 'does NOT fit'}; "
                      f"largest batch that fits: {most or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--layers", type=int, default=SHAPE_853M["num_layers"])
    parser.add_argument("--plan", action="store_true", help="the int8 memory plans of the shipped 70B configs")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # subprocess mode: load, print a JSON line
    parser.add_argument("--quantize", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load_in_this_process(args.load, args.quantize)))
        return
    if args.plan:
        plan_shipped_configs()
        return

    from eft_jax.loading import load_model
    from eft_jax.models import llama, quant
    from eft_jax.models.config import LlamaConfig
    from eft_jax.train.export import export_hf

    cfg = LlamaConfig(**{**SHAPE_853M, "num_layers": args.layers})
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        params = llama.init_params(cfg, jax.random.key(0), jnp.bfloat16)
        export_hf(cfg, params, tmp, dtype=jnp.bfloat16)
        del params
        bf16_bytes = cfg.num_params * 2
        print(f"model: {cfg.num_params / 1e6:.0f}M parameters ({args.layers} layers), bf16 weights "
              f"{bf16_bytes / 1e9:.3f} GB; {jax.device_count()} CPU device(s), {os.cpu_count()} cores; "
              f"jax {jax.__version__}")

        print("\nloading (each in a fresh process):")
        print(f"  {'weights':8s} {'load s':>7s} {'GB':>7s} {'bytes/param':>11s} {'peak anon RSS GB':>16s} "
              f"{'/ bf16 size':>11s} {'peak RSS GB':>11s}")
        for quantize in (None, "int8"):
            r = _load_report(tmp, quantize)
            print(f"  {quantize or 'bf16':8s} {r['load_s']:7.1f} {r['weight_bytes'] / 1e9:7.3f} "
                  f"{r['weight_bytes'] / r['params']:11.3f} {r['peak_anon_above_base'] / 1e9:16.3f} "
                  f"{r['peak_anon_above_base'] / bf16_bytes:11.2f} {r['peak_rss_above_base'] / 1e9:11.3f}")

        models = {"bf16": load_model(tmp, dtype=jnp.bfloat16),
                  "int8": load_model(tmp, dtype=jnp.bfloat16, quantize="int8")}
        print("\ndecode step (one token, 64 cached, best of %d, interleaved):" % args.reps)
        print(f"  {'batch':>5s} {'bf16 ms':>8s} {'int8 ms':>8s} {'bf16 tok/s':>10s} {'int8 tok/s':>10s} "
              f"{'int8/bf16':>9s}")
        for batch in (int(b) for b in args.batches.split(",")):
            steps = {name: Step(m, batch) for name, m in models.items()}
            for step in steps.values():
                step()
            best = {name: math.inf for name in steps}
            for _ in range(args.reps):
                for name, step in steps.items():
                    t = time.perf_counter()
                    step()
                    best[name] = min(best[name], time.perf_counter() - t)
            print(f"  {batch:5d} {best['bf16'] * 1e3:8.1f} {best['int8'] * 1e3:8.1f} {batch / best['bf16']:10.1f} "
                  f"{batch / best['int8']:10.1f} {best['bf16'] / best['int8']:9.2f}")

        found = quant.int8_converts(steps["int8"].compiled.as_text())
        largest = max(found, key=lambda s: math.prod(s[1]))
        layer = models["int8"].run_params["layers"][0]
        biggest = max(w.size for g in ("attn", "mlp") for w in layer[g].values() if w.dtype == jnp.int8)
        print(f"\nint8 step HLO: {len(found)} converts of s8 arrays; the largest {largest[0]}{list(largest[1])} = "
              f"{math.prod(largest[1])} elements ({math.prod(largest[1]) * 2 / 2**20:.2f} MiB as bf16), against "
              f"{biggest} elements in the largest projection matrix")


if __name__ == "__main__":
    main()
