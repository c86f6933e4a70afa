"""Prediction: from logits to per-structure probabilities, and a checkpoint's model ready to predict.

Shared by validation (train.py), evaluation (engine.evaluation) and inference (engine.batch, infer.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.labels import TASK_CLASS_INDICES, TASK_OUTPUTS, TYPE_TASKS, task_masks
from data.look import present_volume, restore_volume
from data.readers import Volume, read_case
from data.transforms import InputError, load_image_slice, normalize, read_image, resize_images
from models import model_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.helpers import amp_dtype, autocast, resolve_device


def main_structure(task: str) -> str:
    """The structure a task's 2D masks, figures and Inf-Net scores show: the lesion when the task predicts
    one, else its only output."""
    names = TASK_OUTPUTS[task]
    return "lesion" if "lesion" in names else names[0]


def lesion_types(task: str) -> dict[str, int]:
    """{type name: label value} of the lesion types a task tells apart; {} for a binary task.

    The names are the task's outputs that are not mask kinds (data.labels.TASK_OUTPUTS, task_masks).
    """
    if task not in TYPE_TASKS:
        return {}
    types = [n for n in TASK_OUTPUTS[task] if n not in task_masks(task)]
    return {name: i + 1 for i, name in enumerate(types)}


def type_prediction(probs: dict[str, torch.Tensor], task: str, threshold: float = 0.5) -> torch.Tensor:
    """The predicted lesion-type label map: lesion where the union's probability is above ``threshold``
    (so its union is exactly the "lesion" mask), each lesion pixel the type of highest probability.

    Shape: probs {name: (N, H, W)} (engine.predict.class_probs) -> int64 (N, H, W) on their device, 0 no
    lesion.
    """
    types = lesion_types(task)
    stacked = torch.stack([probs[name].float() for name in types])  # on the maps' device: no sync
    best = stacked.argmax(0) + 1  # ties go to the first type, as argmax does
    return torch.where(probs[main_structure(task)] > threshold, best, 0)


def class_probs(logits: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    """Foreground probabilities of each structure a task predicts (data.labels.TASK_OUTPUTS).

    Shape: logits (N, C, H, W) -> {name: (N, H, W) float32}. One channel is a sigmoid output; C >= 2 a
    softmax one, a structure being the sum of its classes (data.labels.TASK_CLASS_INDICES): for
    lung+lesion (0 background, 1 lung, 2 lesion) the lung is classes 1 and 2 together, since lesions lie
    inside the lungs.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        (name,) = TASK_OUTPUTS[task]
        return {name: torch.sigmoid(logits[:, 0])}
    p = torch.softmax(logits, dim=1)
    every_foreground = tuple(range(1, logits.shape[1]))
    probs = {}
    for name in TASK_OUTPUTS[task]:
        classes = TASK_CLASS_INDICES[task][name]
        # all foreground classes: 1 - p[:, 0], not their sum, whose rounding can exceed 1
        probs[name] = 1 - p[:, 0] if tuple(classes) == every_foreground else p[:, list(classes)].sum(1)
    return probs


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


class Predictor:
    """One checkpoint's model, or several averaged, with their input pipeline, ready to predict.

    Args:
        checkpoints: a .pth written by train.py, or a list of them (an ensemble: probabilities are averaged;
            they must share the task and the preprocessing).
        device: "auto", "cpu" or "cuda".
        amp: autocast policy (see utils.helpers.amp_dtype).
        tta: flip test-time augmentation (see :func:`predict`); None: as the first checkpoint's
            training run asked (train.py --tta), else off.
    """

    def __init__(self, checkpoints, device: str = "auto", amp: str = "auto", batch_size: int = 8,
                 tta: bool | None = None):
        paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        if not paths:
            raise InputError("no checkpoint given")
        ckpts = [load_checkpoint(p) for p in paths]
        self.ckpt = ckpts[0]
        self.task, self.prep = self.ckpt["task"], self.ckpt["preprocessing"]
        for path, c in zip(paths[1:], ckpts[1:]):
            if c["task"] != self.task or c["preprocessing"] != self.prep:
                raise InputError(f"{path}: predicts {c['task']!r} from {c['preprocessing']}, but {paths[0]} predicts "
                                 f"{self.task!r} from {self.prep}; only checkpoints that agree can be averaged")
        self.device = resolve_device(device)
        self.dtype = amp_dtype(self.device, amp)
        self.models = [inference_model(model_from_checkpoint(c, p), self.device) for c, p in zip(ckpts, paths)]
        self.batch_size = batch_size
        self.tta = bool(self.ckpt.get("inference", {}).get("tta", False)) if tta is None else tta

    def probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probability maps for preprocessed slices (N, S, S), predicted in batches and averaged over the
        models; {name: (N, S, S) float32 on CPU}."""
        batches = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size, None]
            per_model = [predict(m, batch, self.task, self.device, self.dtype, self.tta) for m in self.models]
            batches.append({k: torch.stack([p[k].float() for p in per_model]).mean(0).cpu() for k in per_model[0]})
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}

    def predict_images(self, paths: list[Path], on_error=None):
        """Yield (path, image (H, W) float32, {name: probability map (H, W) float32}) for 2D image files,
        the probabilities resized back to each image's own size.

        An image that cannot be read raises InputError; with ``on_error(path, message)`` given, it is passed
        there instead and the other images go on.
        """
        for start in range(0, len(paths), self.batch_size):
            batch, loaded = [], []
            for path in paths[start:start + self.batch_size]:
                try:
                    loaded.append(load_image_slice(path, self.prep))
                    batch.append(path)
                except InputError as e:
                    if on_error is None:
                        raise
                    on_error(path, str(e))
            if not batch:
                continue
            probs = self.probs(torch.stack([img for img, _ in loaded]))
            for j, (path, (_, shape)) in enumerate(zip(batch, loaded)):
                yield path, read_image(path), {k: resize_images(v[j:j + 1], shape)[0].clamp_(0, 1).numpy()
                                               for k, v in probs.items()}

    def volume_probs(self, volume: str | Path | Volume):
        """Probability maps of a volume: a file path (read by data.readers.read_case), or a Volume already read.

        The slices are shown to the models in the look of their training slices (data.look.present_volume:
        for a model trained on cropped 8-bit files, the window and crop it learned from); the probabilities
        go back to the full slices, 0 outside the crop.

        Returns:
            (the Volume, its slices (Z, S, S) in [0, 1] at full field of view for figures, {name: float32
            (Z, H, W)}), the maps in display orientation at the scan's in-plane size (see
            data.transforms.to_axial_slices).
        """
        vol = volume if isinstance(volume, Volume) else read_case(volume, prep=self.prep)
        shown, box = present_volume(vol.image, self.prep)
        probs = {name: restore_volume(p, box, vol.image.shape) for name, p in self.probs(shown).items()}
        look = self.prep.get("look")
        images = shown if not look else resize_images(normalize(vol.image, "window", look["window"]), self.prep["size"])
        return vol, images.numpy(), probs

    def predict_volume(self, volume: str | Path | Volume, threshold: float = 0.5, types: bool = False):
        """:meth:`volume_probs` thresholded by :func:`volume_masks`: masks in place of the maps."""
        vol, images, probs = self.volume_probs(volume)
        return vol, images, volume_masks(probs, self.task, threshold, types)


def volume_masks(probs: dict[str, torch.Tensor], task: str, threshold: float = 0.5,
                 types: bool = False) -> dict[str, np.ndarray]:
    """A volume's probability maps thresholded: {name: uint8 mask (Z, H, W)}. With ``types`` (a types task),
    "lesion" is the label map of the lesion types (:func:`type_prediction`) and the types' own maps are not
    returned."""
    kinds = task_masks(task) if types else probs
    masks = {name: (probs[name] > threshold).numpy().astype(np.uint8) for name in kinds}
    if types:
        masks["lesion"] = type_prediction(probs, task, threshold).numpy().astype(np.uint8)
    return masks
