"""From logits to per-structure probabilities, shared by validation, evaluate.py and infer.py."""
from __future__ import annotations

import torch
from torch import nn

from utils.helpers import autocast

TASK_OUTPUTS = {"lesion": ("lesion",), "lung": ("lung",), "lung+lesion": ("lung", "lesion")}


def class_probs(logits: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    """Foreground probabilities of each structure a task predicts.

    Shape: logits (N, C, H, W) -> {name: (N, H, W) float32}. One channel is a sigmoid output; C >= 2 a
    softmax one. For lung+lesion (0 background, 1 lung, 2 lesion) the lung is classes 1 and 2 together,
    since lesions lie inside the lungs.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        (name,) = TASK_OUTPUTS[task]
        return {name: torch.sigmoid(logits[:, 0])}
    p = torch.softmax(logits, dim=1)
    foreground = 1 - p[:, 0]  # not p[:, 1:].sum(1), whose rounding can exceed 1
    if task == "lung+lesion":
        return {"lung": foreground, "lesion": p[:, 2]}
    (name,) = TASK_OUTPUTS[task]
    return {name: foreground}


def class_targets(target: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    """Binary ground truth of each structure, matching :func:`class_probs`. Shape: (N, H, W) -> {name: (N, H, W) bool}."""
    if task == "lung+lesion":
        return {"lung": target >= 1, "lesion": target == 2}
    (name,) = TASK_OUTPUTS[task]
    return {name: target >= 1}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, task: str, device: torch.device,
            dtype: torch.dtype | None = None, tta: bool = False) -> dict[str, torch.Tensor]:
    """Run the model in eval mode on a batch (N, 1, H, W) and return :func:`class_probs` on ``device``.

    The batch goes in channels_last (NHWC), the layout inference models are kept in (see
    :func:`inference_model`); the layout changes speed only, never the result. With ``tta`` the
    probabilities are averaged over the batch as it is and flipped left-right, up-down and both (flip
    test-time augmentation, as nnU-Net's mirroring): 4 forward passes.
    """
    model.eval()
    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
    total = None
    for dims in flips:
        with autocast(device, dtype):
            logits = model(images.flip(dims) if dims else images)
        probs = {k: (v.flip(dims) if dims else v) for k, v in class_probs(logits, task).items()}
        total = probs if total is None else {k: total[k] + v for k, v in probs.items()}
    return {k: v / len(flips) for k, v in total.items()} if tta else total


def inference_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to ``device`` in eval mode and channels_last layout (several times faster with bf16 on CPU)."""
    return model.to(device, memory_format=torch.channels_last).eval()
