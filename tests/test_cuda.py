"""On a GPU: what the CPU-only suite cannot check. Every test here is skipped where CUDA is absent (CI).

    python -m pytest -q tests/test_cuda.py                      # on a machine with a CUDA GPU
    GPU_TESTS_DEVICE=cpu python -m pytest -q tests/test_cuda.py  # the same checks with the CPU standing in

The second line only checks the tests' own logic; it says nothing about CUDA. Not covered here, for want
of a second GPU: NCCL and SyncBatchNorm under torchrun (tests/test_distributed.py covers DDP on gloo).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from data.augment import BatchAugment, SpatialAugment
from engine.evaluation import evaluate
from tests.script_fixtures import processed, run_train, train_argv, trained  # noqa: F401
from utils.checkpoint import load_checkpoint

DEVICE = torch.device(os.environ.get("GPU_TESTS_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


def gpu_argv(data, out, *extra: str, **kwargs) -> list[str]:
    """train_argv on DEVICE, with the data on the device also when the CPU stands in for the GPU."""
    return train_argv(data, out, "--device", str(DEVICE), "--data-on-device", *extra, **kwargs)


def blobs(n: int = 8, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(n, size // 8, size // 8, generator=g) > 0.7).long()
    masks = masks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    return masks[:, None].float() * 0.6 + 0.2 + 0.05 * torch.rand(n, 1, size, size, generator=g), masks


@pytest.mark.parametrize("augment", [BatchAugment(), SpatialAugment(p=1.0)], ids=["batch", "spatial"])
def test_augmentation_draws_the_same_transforms_on_the_gpu_as_on_the_cpu(augment):
    # the draws come from the CPU generator: a seeded run sees the same augmented data on any device
    images, masks = blobs()
    torch.manual_seed(7)
    cpu_images, cpu_masks = augment(images, masks)
    torch.manual_seed(7)
    gpu_images, gpu_masks = augment(images.to(DEVICE), masks.to(DEVICE))
    assert gpu_images.device.type == DEVICE.type and gpu_masks.dtype == torch.int64
    # nearest-neighbour sampling of the warp may round a border pixel the other way
    assert (gpu_masks.cpu() == cpu_masks).float().mean() > 0.995
    assert (gpu_images.cpu() - cpu_images).abs().mean() < 1e-3


def test_training_on_the_gpu_holds_the_data_there_and_learns(processed, tmp_path, capsys):
    argv = gpu_argv(processed, tmp_path, "--lr", "1e-2", "--sched", "none", "--no-augment", epochs=6, width=8)
    result = run_train(argv)
    first = capsys.readouterr().out.splitlines()[0]
    assert f"on {DEVICE.type}" in first and "bfloat16 autocast" in first and "data held on" in first
    losses = [h["train_loss"] for h in result["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0], losses
    ckpt = load_checkpoint(tmp_path / "last.pth")  # loads on the CPU
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())


def test_the_gpu_default_puts_the_data_on_the_device_when_it_fits(processed, tmp_path, capsys):
    if DEVICE.type != "cuda":
        pytest.skip("the default is on for CUDA only")
    run_train(train_argv(processed, tmp_path, "--device", "cuda", epochs=1))
    assert "data held on cuda" in capsys.readouterr().out.splitlines()[0]


def test_fp16_autocast_scales_the_loss_and_trains(processed, tmp_path):
    if DEVICE.type != "cuda":
        pytest.skip("fp16 autocast is for CUDA only")
    result = run_train(gpu_argv(processed, tmp_path, "--amp", "fp16", epochs=2))
    assert all(math.isfinite(h["train_loss"]) for h in result["history"])
    assert load_checkpoint(tmp_path / "last.pth")["scaler"]["scale"] > 0  # the GradScaler ran


def test_inductor_compiled_training_matches_eager(processed, tmp_path, capsys):
    runs = [run_train(gpu_argv(processed, tmp_path / str(i), "--amp", "off", "--no-augment", *flags, epochs=1))
            for i, flags in enumerate(([], ["--compile"]))]
    assert "torch.compile" in capsys.readouterr().out
    a, b = (r["history"][0] for r in runs)
    # same weights, data and order: only kernel choices (and TF32 where enabled) differ
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=2e-2)


def test_the_gpu_scores_a_checkpoint_as_the_cpu_does(trained, processed, tmp_path):
    ckpt = trained["out"] / "best_model.pth"
    cpu = evaluate(ckpt, processed, out=tmp_path / "cpu", device="cpu", amp="off", progress=False)
    gpu = evaluate(ckpt, processed, out=tmp_path / "gpu", device=str(DEVICE), amp="bf16", progress=False)
    a, b = (r["structures"]["lesion"] for r in (cpu, gpu))
    assert b["pooled"]["dice"] == pytest.approx(a["pooled"]["dice"], abs=0.01)
    assert b["auc"] == pytest.approx(a["auc"], abs=0.005)
