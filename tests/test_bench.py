"""The benchmark scripts run and report what docs/BENCHMARKS.md quotes (tiny sizes; no timing asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("placement", ["--no-data-on-device", "--data-on-device"])
def test_speed_json_reports_every_rate_and_the_flop_utilisation(placement):
    out = subprocess.run([sys.executable, "bench/speed.py", "--model", "unet", "--size", "32", "--batch-size", "2",
                          "--steps", "1", "--warmup", "1", placement, "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("train_slices_per_s", "baseline_train_slices_per_s", "infer_slices_per_s", "loader_slices_per_s",
                "train_gflop_per_slice", "matmul_peak_tflops"):
        assert result[key] > 0, key
    assert result["data_on_device"] is (placement == "--data-on-device")
    assert result["speedup_vs_baseline"] == result["train_slices_per_s"] / result["baseline_train_slices_per_s"]
    assert result["mfu"] == pytest.approx(result["train_tflops"] / result["matmul_peak_tflops"])
    assert result["train_tflops"] == pytest.approx(result["train_slices_per_s"] * result["train_gflop_per_slice"] / 1e3)
