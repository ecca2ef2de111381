#!/usr/bin/env bash
# The store and transfer numbers of bench/RESULTS.md on one GPU (the tiered store's
# issue: the cpu tier <-> this GPU, the cuda_ipc copy call, 32 agents over an 8K prefix).
# Usage: bench/gpu_store.sh [outdir]   (each part's output is also written there)
# TESTS=1 runs tests/gpu first. Each part has a time limit, so one slow part cannot
# eat a lent machine's whole call.
set -u
out=${1:-/tmp}
mkdir -p "$out"
run() {  # run NAME SECONDS COMMAND...: the command's output, also into $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | tail -16
}
if [ "${TESTS:-0}" = 1 ]; then
  run gpu_tests 260 python3 -m pytest -q -p no:cacheprovider tests/gpu
fi
T="python3 -m services.cli bench transfer --gpu --transport cuda_ipc --block-kib 1792"
run transfer_512mib 150 $T --mib 512 --repeat 5 --log-dir "$out/store-512mib"
run transfer_64mib 90 $T --mib 64 --repeat 5 --log-dir "$out/store-64mib"
run copy_kernel 40 python3 -m bench.copy_kernel
run agents 150 python3 -m services.cli bench agents --device cuda \
  --model dummy:qwen3-0.6b --dtype bfloat16 --agents 32 --prefix-len 8192 --task-len 64 \
  --output-len 4
