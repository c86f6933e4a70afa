#!/usr/bin/env bash
# The GPU rows of docs/BENCHMARKS.md and the GPU-only tests, in one go, on a machine with a CUDA GPU:
#
#     bash bench/gpu.sh [OUT_DIR]          # default OUT_DIR: bench-gpu/
#
# Writes into OUT_DIR:
#   <model>-<compile>.json   bench/speed.py's JSON line, U-Net and DeepLabV3, without and with --compile
#   train-<how>/history.csv  the demo's training (make demo's phantoms and split) on the GPU three ways: data on
#                            the device, the DataLoader, and --compile; validation Dice should agree within noise
#   test_cuda.log            tests/test_cuda.py
# Settings (environment): DEVICE (cuda), UNET_BATCH (128), DEEPLAB_BATCH (64; the fp32 baseline of the same
# batch must fit too), STEPS (30 timed steps), EPOCHS (8), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
mkdir -p "$out"

for model in unet deeplabv3; do
    batch=$([ "$model" = unet ] && echo "${UNET_BATCH:-128}" || echo "${DEEPLAB_BATCH:-64}")
    for compile in no-compile compile; do
        echo "== $model, batch $batch, --$compile"
        "$py" bench/speed.py --model "$model" --device "$device" --batch-size "$batch" --steps "${STEPS:-30}" \
              --warmup 5 --"$compile" --json | tee "$out/$model-$compile.log"
        tail -n 1 "$out/$model-$compile.log" > "$out/$model-$compile.json"
    done
done

data="$out/data"
if [ ! -f "$data/processed/splits.json" ]; then  # make demo's data
    "$py" -m data.synthetic --out "$data/synthetic" --patients 12 --seed 0
    "$py" -m data.preprocess --src "$data/synthetic" --out "$data/processed"
    "$py" -m data.split_data --data "$data/processed" --val 0.15 --test 0.15 --seed 0
fi
for run in device:--data-on-device dataloader:--no-data-on-device compile:--compile; do
    echo "== training, ${run#*:}"
    "$py" train.py --data "$data/processed" --model unet --epochs "${EPOCHS:-8}" --device "$device" --no-progress \
          --out "$out/train-${run%%:*}" "${run#*:}" | tee "$out/train-${run%%:*}.log"
done

# last, so that a failing test does not stop the measurements
"$py" -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
