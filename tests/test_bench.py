"""The benchmark scripts run on tiny configurations and report what docs/BENCHMARKS.md quotes: positive,
finite rates, a utilisation between 0 and 1, and the FLOPs of a U-Net training step as counted by hand.

No timing is asserted (a shared machine makes every rate noisy); the FLOP count is exact.
"""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model
from tests.script_fixtures import export_pairs, processed, run_train, sigint_default, train_argv  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
WIDTH, SIZE, BATCH = 4, 32, 2  # a tiny U-Net, so the run takes seconds
RATES = ("train_slices_per_s", "baseline_train_slices_per_s", "infer_slices_per_s", "loader_slices_per_s")


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                          "--matmul-size", "512", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
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


def test_dicom_speed_times_infer_and_each_stage_on_a_series_that_reads_back_as_its_phantom(tmp_path):
    size, slices = 64, 20
    out = subprocess.run([sys.executable, "bench/dicom_speed.py", "--size", str(size), "--slices", str(slices),
                          "--width", "4", "--repeat", "1", "--work", str(tmp_path), "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    stages = result["stages_seconds"]
    for key in ("read series (read_case)", "predict (preprocess, U-Net, upsample)", "lungs from HU (utils.lungs)",
                "write NIfTI masks", "report html"):  # task "lesion": no lung head, so the HU lungs run
        assert math.isfinite(stages[key]) and stages[key] > 0, (key, stages)
    assert result["stages_total_seconds"] == pytest.approx(
        sum(v for k, v in stages.items() if not k.startswith(("of which", "also"))))
    assert result["infer_py_seconds"] > 0 and result["meets_target"] is (result["infer_py_seconds"] <= 30)
    case = f"series_{size}x{size}x{slices}"
    written = {p.name for p in (tmp_path / "out_infer").iterdir()}
    assert {f"{case}_{n}" for n in ("lesion.nii.gz", "lung.nii.gz", "report.json", "montage.png",
                                    "report.html")} <= written
    # the series: one int16 file per slice with a rescale intercept, read back as the phantom's HU
    import pydicom

    from data.readers import read_case
    from data.transforms import to_axial_slices

    bench = load_bench("dicom_speed")
    files = sorted((tmp_path / case).iterdir())
    assert len(files) == slices
    ds = pydicom.dcmread(files[0])
    assert (ds.PixelRepresentation, ds.BitsAllocated, float(ds.RescaleIntercept)) == (1, 16, -1024.0)
    p = bench.phantom(size, slices)
    np.testing.assert_array_equal(read_case(tmp_path / case).image, to_axial_slices(p["image"], p["affine"]))


def test_score_folds_gives_the_cross_validations_figures_of_a_fold(processed, tmp_path):
    """bench/score_folds.py rebuilds a fold's validation pairs from the checkpoint alone and scores them as
    the cross-validation did: the same per-image Dice and threshold-averaged Dice as cv.json's fold."""
    data = tmp_path / "pairs"
    export_pairs(processed, None, data, "Imgs", "GT", n=12)
    run_train(train_argv(data, tmp_path / "cv", "--folds", "3", "--tta"))
    cv = json.loads((tmp_path / "cv" / "cv.json").read_text())
    averaged = cv["last_epoch"]["dice_threshold_averaged"]
    assert averaged[0] != averaged[2]  # so scoring another fold's pairs would show
    bench = load_bench("score_folds")
    for fold in (0, 2):
        row = bench.score_fold(tmp_path / "cv" / f"fold{fold}" / "last.pth", device="cpu", out=tmp_path / f"s{fold}")
        assert row["fold"] == fold and row["n"] == cv["last_epoch"]["n"][fold]
        for key in ("dice", "dice_threshold_averaged"):
            assert row[key] == pytest.approx(cv["last_epoch"][key][fold], abs=1e-9)
        with open(tmp_path / f"s{fold}" / "per_image.csv") as f:  # --out: each slice's scores, kept
            dice = [float(r["dice"]) for r in csv.DictReader(f) if r["structure"] == "lesion"]
        assert len(dice) == row["n"] and sum(dice) / len(dice) == pytest.approx(row["dice"], abs=1e-6)


def test_volume_speed_times_every_repeat_into_a_fresh_folder_and_lists_the_probability_map(monkeypatch):
    """Each --repeat predicts the scan anew (into a folder of its own: a second run into the same folder
    would skip the case as done and time nothing), and --save-probs' map is listed with its size."""
    bench = load_bench("volume_speed")
    bench_infer, runs = bench.infer_volumes, []

    def infer_volumes(predictor, sources, out, *args, save_probs=None, **kwargs):  # records what each repeat wrote
        bench_infer(predictor, sources, out, *args, save_probs=save_probs, **kwargs)
        runs.append((out, sorted(p.name for p in out.iterdir()), sorted(p.name for p in save_probs.iterdir())))

    monkeypatch.setattr(bench, "infer_volumes", infer_volumes)
    res = bench.main(bench.get_args_parser().parse_args(["--slices", "3", "--task", "lesion", "--repeat", "2",
                                                         "--save-probs"]))
    assert len(runs) == 2 and runs[0][0] != runs[1][0]
    assert runs[0][1:] == runs[1][1:]  # the second repeat wrote everything the first did
    assert {"scan_lesion.nii.gz", "scan_lung.nii.gz", "scan_report.json"} <= set(runs[1][1])
    assert runs[1][2] == ["scan_lesion.nii.gz"]
    assert set(res["outputs"]) == set(runs[1][1]) | {"probs1/scan_lesion.nii.gz"}
    assert all(size > 0 for size in res["bytes"].values()) and set(res["bytes"]) == set(res["outputs"])
    assert len(res["seconds_all"]) == 2 and res["seconds"] == min(res["seconds_all"]) > 0
    assert res["volume_shape"] == [512, 512, 3]


def test_ctrl_c_bench_stops_a_real_training_run_with_one_line(processed):
    proc = subprocess.run(["bash", "bench/ctrl_c.sh", "1", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable, "DATA": str(processed)},
                          preexec_fn=sigint_default)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [ln for ln in proc.stdout.splitlines() if ln.startswith("run ")]
    assert len(runs) == 1 and runs[0].endswith("[ok]") and "exit 130" in runs[0] and "interrupted" in runs[0], \
        proc.stdout
    assert proc.stdout.splitlines()[-1] == "1 of 1 runs stopped with exit 130 and one line"
