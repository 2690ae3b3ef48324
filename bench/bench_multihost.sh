#!/bin/bash
# The default toy job: 1 process (8 CPU devices, 2x4 mesh) vs 2 processes x 4 devices (one 2x4 mesh), side by
# side, with a cold compile cache and then twice warm; prints wall times and whether the outputs are identical.
# Usage: bash bench/bench_multihost.sh  (OUT=dir for outputs and logs; needs a free local port 29500-30499)
set -e
OUT=$(realpath -m "${OUT:-/tmp/eft-multihost}")
rm -rf "$OUT/cache" && mkdir -p "$OUT"  # the first round compiles from scratch
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu EFT_JAX_COMPILE_CACHE=$OUT/cache
P=examples/prompts.jsonl
for round in cold warm1 warm2; do
  rm -f $OUT/one*.jsonl $OUT/two*.jsonl
  s=$(date +%s.%N)
  XLA_FLAGS=--xla_force_host_platform_device_count=8 eft-jax generate --prompts $P --out $OUT/one.jsonl --no-progress mesh.data=2 mesh.model=4 > $OUT/one.$round.log 2>&1
  m=$(date +%s.%N)
  port=$((29500 + RANDOM % 1000))
  for i in 0 1; do
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
      eft-jax generate --prompts $P --out $OUT/two.jsonl --no-progress mesh.distributed=true mesh.data=2 mesh.model=4 > $OUT/two.$round.p$i.log 2>&1 &
  done; wait
  e=$(date +%s.%N)
  same=$(cmp -s $OUT/one.jsonl $OUT/two.jsonl && echo identical || echo DIFFERENT)
  echo "$round: 1 process $(echo "$m - $s" | bc) s; 2 processes $(echo "$e - $m" | bc) s; outputs $same; parts: $(wc -l < $OUT/two.shard-0-of-2.jsonl) + $(wc -l < $OUT/two.shard-1-of-2.jsonl) lines"
done
