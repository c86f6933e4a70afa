"""The benchmark script runs on a tiny configuration and reports what docs/BENCHMARKS.md quotes: positive,
finite rates, a utilisation between 0 and 1, and the FLOPs of a U-Net training step as counted by hand.

No timing is asserted (a shared machine makes every rate noisy); the FLOP count is exact.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model

ROOT = Path(__file__).resolve().parents[1]
WIDTH, SIZE, BATCH = 4, 32, 2  # a tiny U-Net, so the run takes seconds
RATES = ("train_slices_per_s", "baseline_train_slices_per_s", "infer_slices_per_s", "loader_slices_per_s")


def unet_train_flops_per_slice(width: int, size: int, out_channels: int) -> float:
    """FLOPs of one forward + backward pass of the U-Net over one size x size slice, by hand.

    Every convolution is a multiply and an add per weight and output pixel: 2 * N * C_in * C_out * k * k *
    H_out * W_out (a transposed convolution: per input pixel). The backward pass computes the weight gradient
    (the same again) and the input gradient (the same again, except where the input needs no gradient: the
    image). Pooling, normalisation, activations and the loss are not counted, as FlopCounterMode counts none.
    """
    model = build_model("unet", 1, out_channels, width=width)
    total = 0

    def count(module, inputs, output):
        nonlocal total
        c_out, c_in, kh, kw = module.weight.shape
        if isinstance(module, nn.ConvTranspose2d):  # weight (C_in, C_out, k, k); work per input pixel
            pixels = inputs[0].shape[0] * inputs[0].shape[2] * inputs[0].shape[3]
        else:
            pixels = output.shape[0] * output.shape[2] * output.shape[3]
        forward = 2 * c_out * c_in * kh * kw * pixels
        total += forward * (2 + inputs[0].requires_grad)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            module.register_forward_hook(count)
    model(torch.zeros(1, 1, size, size))
    return float(total)


@pytest.mark.parametrize("placement", ["--no-data-on-device", "--data-on-device"])
def test_speed_reports_positive_rates_a_utilisation_and_the_flops_of_a_training_step(placement):
    out = subprocess.run([sys.executable, "bench/speed.py", "--model", "unet", "--width", str(WIDTH), "--size",
                          str(SIZE), "--batch-size", str(BATCH), "--steps", "1", "--warmup", "1", placement,
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (*RATES, "speedup_vs_baseline", "train_tflops", "matmul_peak_tflops"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert 0 < result["mfu"] < 1, result["mfu"]
    assert result["data_on_device"] is (placement == "--data-on-device")
    # U-Net on the lesion task: its default loss (bce_dice) trains one sigmoid channel
    expected = unet_train_flops_per_slice(WIDTH, SIZE, out_channels=1)
    assert result["train_gflop_per_slice"] * 1e9 == pytest.approx(expected, rel=1e-9)
    for key in RATES:  # the human-readable lines quote the same rates
        assert key in out.stdout
