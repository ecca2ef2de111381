#!/usr/bin/env bash
# The engine numbers of bench/RESULTS.md on one GPU (dummy weights, bf16).
# Usage: bench/gpu_engine.sh [outdir]   (each run also writes its JSON there)
# Headline numbers come from runs without --profile (which syncs per section);
# ASYNC=on/off sets model.async_scheduling (auto: the engine default); PROFILE=1 adds a profiled run of the first two workloads.
set -u
out=${1:-/tmp}
B="python3 -m services.cli bench offline --device cuda --no-tqdm --attention-backend ${BACKEND:-triton} --async-scheduling ${ASYNC:-auto}"
DECODE="--model dummy:llama-3.1-8b --num-seqs 1 --min-input 128 --max-input 128 --min-output 256 --max-output 256"
TPUT="--model dummy:qwen3-0.6b --num-seqs 256 --min-input 100 --max-input 1024 --min-output 512 --max-output 512 --max-num-seqs 256 --max-num-batched-tokens 8192"
echo "== batch-1 decode, llama-3.1-8b, 128 in / 256 out"
$B $DECODE --json "$out/decode_8b.json"
echo "== qwen3-0.6b, 256 seqs, in U(100,1024), out 512"
$B $TPUT --json "$out/tput_06b.json"
if [ "${PROFILE:-0}" = 1 ]; then
  echo "== profiled: batch-1 decode, llama-3.1-8b"; $B $DECODE --profile
  echo "== profiled: qwen3-0.6b, 256 seqs"; $B $TPUT --profile
fi
echo "== TTFT, one 512-token prompt, qwen3-0.6b"
$B --model dummy:qwen3-0.6b --num-seqs 1 --min-input 512 --max-input 512 \
   --min-output 1 --max-output 1 --warmup 3 --json "$out/ttft_06b.json"
echo "== prefill of one 8192-token prompt, llama-3.1-8b"
$B --model dummy:llama-3.1-8b --num-seqs 1 --min-input 8192 --max-input 8192 \
   --min-output 1 --max-output 1 --max-num-batched-tokens 8192 --warmup 2 \
   --json "$out/prefill_8b.json"
