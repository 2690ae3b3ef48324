#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, in one run (a lent GPU is scarce: everything it should measure
# runs back to back, each step under its own time limit so that one slow step cannot take the others down).
#
# Usage, from the repository root on a GPU machine with jax[cuda], flax, transformers and this package's
# other dependencies installed (`pip install -e .` on a connected machine):
#     bash bench/gpu_checks.sh [LOG_DIR [STEP ...]]
# Each step's output goes to the terminal and to LOG_DIR/<step>.log (default: outputs/gpu-checks). With STEP
# names, only those steps run (all of them take about 18 minutes; a lent GPU allows at most 10 per command).
set -u
LOG_DIR=${1:-outputs/gpu-checks}
shift || true
ONLY=" $* "
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  [[ "$ONLY" == "  " || "$ONLY" == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import jax, flax, transformers; print(\"jax\", jax.__version__, \"flax\", flax.__version__,
  \"transformers\", transformers.__version__, jax.devices())"; git rev-parse --short HEAD'
# Exactness of the attention paths on this backend, and their speed.
step attention 60 python3 bench/bench_attention.py
# The embedded default job, end to end, from process start to the finished output file: cold (compiles),
# then warm (the compile cache), as a user runs it.
step default_job 90 python3 -c '
import subprocess, sys, time
for run in ("cold", "warm"):
    out = f"outputs/gpu-demo-{run}.jsonl"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "eft_jax.cli", "generate", "--prompts", "examples/prompts.jsonl",
                    "--out", out, "--overwrite", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    print(f"default job {run}: {time.perf_counter() - start:.1f} s, {sum(1 for _ in open(out))} samples")
'
# EFT decode cost against the large model alone (Llama-3-8B + 2 x Llama-3.2-1B shapes, bf16).
step bench_eft 170 python3 bench/bench_eft.py --preset gpu --batches 1,16,64 --steps 32
# The same over per-layer weight buffers, and with XLA's dynamic-slice fusion: does the layer scan copy
# each layer's weights on the GPU (the first run streamed weights at ~0.31 of the copy bandwidth)?
step bench_eft_per_layer 170 python3 bench/bench_eft.py --preset gpu --batches 1,16 --steps 32 --layers per-layer
step bench_eft_slice_fusion 170 env XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true \
  python3 bench/bench_eft.py --preset gpu --batches 1,16 --steps 32
# Speculative EFT (8B-shaped base, 1.5B drafter, acceptance calibrated to 0.8), k = 4 against k = 0.
step bench_speculative 150 python3 bench/bench_speculative.py --synthetic gpu --batches 1,16 --ks 4 \
  --repeats 2 --ignore-eos --max-new-tokens 64
# Continuous against static batching on the toy trio (long-tailed lengths), samples compared.
step bench_batching 80 python3 bench/bench_batching.py --prompts 512 --batch-size 64 --jobs long-tailed,natural
# int8 weights on this backend (issue 13): bf16 vs int8 decode step side by side, and the int8 step's compiled
# HLO - how many s8 -> float converts it holds and the largest, against the largest projection (a fused
# dequantizing dot holds none the size of a weight matrix).
step bench_int8 170 python3 bench/bench_int8.py --layers 4 --reps 3 --batches 1,16
