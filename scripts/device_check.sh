#!/usr/bin/env bash
# The real-size device check (issue 17): bench forward, trace, stream and activations on the published Qwen3-Omni
# 30B-A3B architecture with random weights, built in bfloat16 on the GPU, in under 8 minutes. Each
# bench's JSON (or its error log) goes to $OUT (default: device-figures/). Run from the repository
# root with the project's environment: `make install && OUT=... .venv/bin/bash scripts/device_check.sh`.
set -uo pipefail
out=${OUT:-device-figures}
model=${MODEL:-qwen3-omni-30b-a3b-random}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
status=0
for bench in forward trace stream activations; do
  start=$(date +%s)
  if timeout 110 "$python" -m omnilab.cli bench "$bench" --model "$model" --device cuda --json \
      > "$out/$bench.json" 2> "$out/$bench.log"; then
    echo "bench $bench: $(( $(date +%s) - start )) s"
  else
    echo "bench $bench failed after $(( $(date +%s) - start )) s; see $out/$bench.log"
    status=1
  fi
done
exit $status
