"""Device and precision set-up, seeding, atomic file writes, and the figures the scripts draw."""
from __future__ import annotations

import contextlib
import csv
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from base import InputError, atomic_write


# ----------------------------------------------------------------------------- device and precision
def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 natively (AVX-512 BF16 / AMX); elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype to use, or None for full fp32.

    auto: bf16 on a CUDA GPU that supports it (else fp16), bf16 on a CPU with native bf16, else fp32.
    """
    if amp == "off":
        return None
    if amp not in ("auto", "bf16", "fp16"):
        raise InputError(f"--amp must be auto, bf16, fp16 or off, got {amp!r}")
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if amp == "fp16":
        raise InputError("--amp fp16 is for CUDA; on CPU use bf16 or off")
    return torch.bfloat16 if (amp == "bf16" or cpu_has_bf16()) else None


def precision_words(device: torch.device, dtype: torch.dtype | None) -> str:
    """How a run computes, for its first line: " with bfloat16 autocast", or on a CPU without native bf16 a
    warning that fp32 there is several times slower (docs/BENCHMARKS.md, "On dev-cpu-zen3")."""
    if dtype is not None:
        return f" with {str(dtype).replace('torch.', '')} autocast"
    if device.type == "cpu" and not cpu_has_bf16():
        return (" in fp32 (this CPU has no native bf16, AVX-512 BF16 or AMX: training is several times slower"
                " than on one that has; a GPU is faster still)")
    return ""


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for a device and dtype (a no-op context for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also asks torch for deterministic kernels.

    Otherwise cuDNN times its convolution algorithms on the first batch of each shape and keeps the
    fastest (``cudnn.benchmark``): training slices all have one size, so that search is paid once.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


# ----------------------------------------------------------------------------- writing files
def save_png(array: np.ndarray, path: str | Path) -> None:
    """Save a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    with atomic_write(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Write a list of dicts as CSV (columns from the first row), atomically."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)


# ----------------------------------------------------------------------------- figures
def mask_to_png(mask: np.ndarray) -> np.ndarray:
    """Binary mask -> uint8 image, white (255) = infection."""
    return (np.asarray(mask) > 0).astype(np.uint8) * 255


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 40, 40), alpha: float = 0.45) -> np.ndarray:
    """Blend a binary mask in colour over an image: grayscale (H, W) in [0, 1], or uint8 gray / RGB
    (H, W, 3), so overlays can be stacked. Returns uint8 (H, W, 3)."""
    img = np.asarray(image, dtype=np.float32)
    if np.asarray(image).dtype == np.uint8 or img.max(initial=0) > 1.0:
        img = img / 255.0
    rgb = np.clip(img, 0, 1) * 255
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    m = np.asarray(mask) > 0
    rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color, dtype=np.float32)
    return rgb.astype(np.uint8)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # scripts run headless; no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Training curves: losses and validation Dice/IoU per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(epochs, [h["val_dice"] for h in history], label="val Dice")
    b.plot(epochs, [h["val_iou"] for h in history], label="val IoU")
    b.set(xlabel="epoch", ylim=(0, 1), title="validation (pooled)")
    b.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_cases(images, truths, preds, titles: list[str], path: str | Path) -> None:
    """A figure with one row per case: CT, ground truth over CT, prediction over CT."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(max(n, 1), 3, figsize=(9, 3 * max(n, 1)), squeeze=False)
    for row, (img, gt, pr, title) in enumerate(zip(images, truths, preds, titles)):
        for ax, pic, name in zip(axes[row], (img, overlay(img, gt, (40, 220, 40)), overlay(img, pr)),
                                 ("CT", "ground truth", "prediction")):
            ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None, vmin=0, vmax=1 if pic.ndim == 2 else None)
            ax.set_title(f"{name}\n{title}" if name == "prediction" else name, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
