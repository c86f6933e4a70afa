#!/usr/bin/env bash
# The GPU rows of docs/BENCHMARKS.md and the GPU-only tests, in one go, on a machine with a CUDA GPU:
#
#     bash bench/gpu.sh [OUT_DIR]          # default OUT_DIR: bench-gpu/
#
# Writes OUT_DIR/<model>-<compile>.json (bench/speed.py's JSON line) and OUT_DIR/test_cuda.log.
# UNET_BATCH / DEEPLAB_BATCH set the batch sizes (defaults 128 / 64: the fp32 baseline of the same batch
# must fit too). PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
for model in unet deeplabv3; do
    batch=$([ "$model" = unet ] && echo "${UNET_BATCH:-128}" || echo "${DEEPLAB_BATCH:-64}")
    for compile in no-compile compile; do
        echo "== $model, batch $batch, --$compile"
        "$py" bench/speed.py --model "$model" --device cuda --batch-size "$batch" --steps 30 --warmup 5 \
              --"$compile" --json | tee "$out/$model-$compile.log"
        tail -n 1 "$out/$model-$compile.log" > "$out/$model-$compile.json"
    done
done
"$py" -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
