"""Training as plain functions that train.py wires together (torchvision's references/segmentation shape).

    build_datasets / data_on_device   what a run trains and validates on, and where the data sits
    build_loss / make_optimizer / make_scheduler   small factories (tests inject their own through Hooks)
    train_step / train_one_epoch      one optimizer step; one epoch of them with the divergence checks
    validate                          loss and pooled metrics over the validation set
    resume / save                     restore a run from OUT/last.pth; write best/last/history/curves

Crash safety and the Ctrl-C message are described in train.py's docstring and docs/RELIABILITY.md.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from base import InputError
from data.dataset import PairAugment, PairFolderDataset, SliceArrayDataset, dataset_bytes, find_pair_dirs, pair_files
from data.labels import (IGNORE_INDEX, TASK_CLASSES, TYPE_TASKS, class_targets, lesion_classes, structure_slug,
                         task_masks)
from data.look import describe_images
from data.split_data import kfold
from data.transforms import make_preprocessing
from engine.predict import class_probs, lesion_types, main_structure, type_prediction
from engine.semi import SemiSupervised
from utils import distributed
from utils.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from utils.cli import raise_if_interrupted
from utils.helpers import autocast, plot_curves, write_csv
from utils.losses import WEIGHTED, get_loss, loss_mode, output_channels
from utils.metrics import SegmentationMeter, metrics_from_counts

OUTPUTS = ("last.pth", "best_model.pth", "history.csv", "curves.png")
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_score", "history")
SEMI_KEYS = ("student", "semi_state")  # and of a semi-supervised run
PLOT_EVERY_S = 30.0  # curves.png is redrawn at most this often (and after the last epoch)
LOCK_HOLDER = "another train.py run"  # what a second run into the same OUT is told holds it


class TrainingDiverged(FloatingPointError):
    """The loss (or the weights) stopped being finite; the weights of that epoch were not saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: where it stopped (``where``), the checkpoint that holds the run and its epochs
    (``saved``, or None), and, as its message, how to resume."""

    def __init__(self, where: str, saved: tuple[Path | str, int] | None = None):
        super().__init__(where, saved)  # as args, so that it pickles (a fold of --fold-jobs sends it back)
        self.where, self.saved = where, saved

    def stopped(self) -> str:
        """Where the run stopped and what is on disk, without how to resume."""
        if self.saved is None:
            return f"interrupted at {self.where}; no epoch had finished, nothing was saved"
        return f"interrupted at {self.where}; {self.saved[0]} holds epoch {self.saved[1]}"

    def __str__(self) -> str:
        return self.stopped() + (f": resume with --resume {self.saved[0]}" if self.saved else "")


# ----------------------------------------------------------------------------- factories
def default_loss(model: str, task: str) -> str:
    """--loss when none is given: bce_dice for the U-Net on a two-class task, else ce_dice."""
    return "bce_dice" if (model == "unet" and TASK_CLASSES[task] == 2) else "ce_dice"


def build_loss(name: str, task: str, batch_dice: bool = True,
               class_weights: Sequence[float] | None = None) -> tuple[Callable, int]:
    """The criterion of ``--loss name`` for a task, and the output channels the model needs for it.

    The loss's mode (binary: one sigmoid channel; multiclass: one softmax channel per class) is decided
    by :func:`utils.losses.loss_mode`, and the channels by :func:`utils.losses.output_channels`. A types
    task's criterion skips the pixels labelled data.labels.IGNORE_INDEX (``--other-labels ignore``);
    ``class_weights`` (one per class, see :func:`class_weights`) weigh its cross-entropy.

    Returns:
        (criterion(outputs, target) -> scalar, output channels)
    """
    classes = TASK_CLASSES[task]
    try:
        mode = loss_mode(name, classes)
    except ValueError:
        raise InputError(f"--loss {name} is binary; task {task!r} has {classes} classes: "
                         f"use --loss {', '.join(WEIGHTED)}") from None
    if class_weights is not None and name not in WEIGHTED:
        raise InputError(f"--class-weights weigh the cross-entropy: use --loss {', '.join(WEIGHTED)}, not {name}")
    ignore = IGNORE_INDEX if task in TYPE_TASKS else None
    union = None
    if name == "ce_dice_union":  # the union it trains: the lesion (the types, in a types task)
        union = lesion_classes(task)
        if union is None:
            raise InputError(f"--loss ce_dice_union trains the union of the lesion classes; "
                             f"task {task!r} has no lesion")
    criterion = get_loss(name, mode, classes, batch_dice=batch_dice, ignore_index=ignore, class_weights=class_weights,
                         union=union)
    return criterion, output_channels(mode, classes)


def class_weights(dataset, num_classes: int) -> list[float]:
    """Cross-entropy weights from a training set's class frequencies: 1 / sqrt(frequency) per class.

    The square root tempers plain inverse frequency, whose weight for a class at 0.1% of the pixels
    (consolidation) would be 1000x background's; CE's weighted mean makes the scale irrelevant, so the
    weights are divided by background's. A class absent from the set gets the largest present weight.
    Reads every training item once (flips and turns do not change the counts; IGNORE_INDEX is not counted).

    Returns:
        num_classes weights, background first.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for i in range(len(dataset)):
        target = np.asarray(dataset[i][1]).ravel()
        counts += np.bincount(target[target != IGNORE_INDEX], minlength=num_classes)[:num_classes]
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = 1 / np.sqrt(counts[present] / counts.sum())
    weights[~present] = weights.max() if present.any() else 1.0
    return [float(w) for w in weights / weights[0]]


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (weight decay as an L2 term in the gradient) or AdamW (decoupled weight decay)."""
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return kind(params, lr=lr, weight_decay=weight_decay)


def loader_workers(workers: int | None, device: torch.device) -> int:
    """DataLoader workers: ``workers`` (--workers) when given, else 0 on the CPU and 4 on CUDA."""
    return workers if workers is not None else (4 if device.type == "cuda" else 0)


def make_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int):
    """Per-iteration LR schedule: linear warm-up then cosine decay to zero; torch's one-cycle (30% rise
    from lr/25, cosine fall to lr/25e4, momentum cycled the other way); or constant."""
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "onecycle":
        # one step more than training takes, so that the rate after the last step (the one history.csv
        # records) is the cycle's end and not an extrapolation past it
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"],
                                                   total_steps=total_steps + 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def checks_loss_each_step(device: torch.device) -> bool:
    """Whether each step's loss is checked before it touches the weights.

    On the CPU reading a scalar is free; on a GPU it is a sync per step, so there non-finite losses are
    counted on the device and read once per epoch, and the weights are checked before anything is saved.
    """
    return device.type == "cpu"


# ----------------------------------------------------------------------------- data
def build_datasets(data: str | Path, task: str, size: int, val_fraction: float, seed: int, augment: str,
                   folds: int = 0, fold: int = 0, look_window=None, look_crop: str | None = None, log=print,
                   other_labels: str = "background", train_subset: int = 0):
    """Training and validation datasets from either data kind, and the preprocessing record they share.

    ``augment`` other than "none" gives the training items flips, 90-degree turns and intensity jitter
    (``PairAugment``); "strong" adds the batch warp of ``SpatialAugment``, which the training loop applies.

    With ``folds`` > 0 (pair folders), validation is fold ``fold`` of a seeded K-fold partition of the
    pairs and training the other folds. With ``train_subset`` N > 0 (pair folders), training keeps a seeded N
    of its pairs and validation is unchanged: how a recipe does with fewer labelled slices. The draw is a
    prefix of one seeded order, so a smaller subset lies inside a larger one.

    Pair folders' preprocessing record holds their look (data.look.describe_images: the HU window and crop
    the image files show, measured on all of the folder's images, so every fold records the same, unless
    ``look_window`` / ``look_crop`` give it); ``log`` gets the line saying how it was found.

    The types tasks (data.labels.TYPE_TASKS) read the lesion labels (pair folders: label or palette masks,
    COVID-SemiSeg's MultiClassInfection-Train/GT); ``other_labels`` says what a lesion label that is no type
    becomes ("background", or "ignore": data.labels.IGNORE_INDEX, skipped by the loss and validation).

    Returns:
        (train_set, val_set, preprocessing record, "arrays" | "pairs")
    """
    data = Path(data)
    aug = PairAugment() if augment != "none" else None
    if (data / "images.npy").is_file():
        if folds:
            raise InputError(f"{data}: --folds is for folders of image-mask pairs; preprocessed volumes are split "
                             f"by patient with data.split_data")
        if look_window is not None or look_crop is not None:
            raise InputError(f"{data}: --look-window/--look-crop describe image files; preprocessed volumes are "
                             f"in HU, their look is their preprocessing")
        if train_subset:
            raise InputError(f"{data}: --train-subset is for folders of image-mask pairs; for fewer patients of "
                             f"preprocessed volumes, split them with data.split_data")
        train = SliceArrayDataset(data, "train", task, aug, other_labels=other_labels)
        return train, SliceArrayDataset(data, "val", task, other_labels=other_labels), train.preprocessing, "arrays"
    if find_pair_dirs(data, "train", task) is None:
        raise InputError(f"{data}: no training data. Make the synthetic default with `make demo`, or run "
                         f"`python -m data.synthetic --out data/synthetic && python -m data.preprocess "
                         f"--src data/synthetic --out {data} && python -m data.split_data --data {data}`; "
                         f"or point --data at a folder of image-mask pairs (train_images/ + train_masks/, Imgs/ + GT/)")
    if task_masks(task) != ("lesion",):
        raise InputError(f"{data}: image-mask pair folders hold lesion masks only; --task {task} needs preprocessed volumes")
    train_dirs, val_dirs = find_pair_dirs(data, "train", task), find_pair_dirs(data, "val", task)
    train_pairs = pair_files(*train_dirs)
    every = train_pairs + (pair_files(*val_dirs) if val_dirs is not None and val_dirs != train_dirs else [])
    look, how = describe_images([image for image, _ in every], look_window, look_crop)
    if how:
        log(how)
    prep = {**make_preprocessing(size, "minmax"), "look": look}
    if folds:  # cross-validation over every pair of the folder
        if val_dirs is not None and val_dirs != train_dirs:
            train_pairs += pair_files(*val_dirs)
        held_out = set(kfold(len(train_pairs), folds, seed)[fold])
        val_pairs = [p for i, p in enumerate(train_pairs) if i in held_out]
        train_pairs = [p for i, p in enumerate(train_pairs) if i not in held_out]
    elif val_dirs is not None and val_dirs != train_dirs:
        val_pairs = pair_files(*val_dirs)
    else:  # one folder of pairs: hold out a seeded fraction of the files for validation
        order = np.random.default_rng(seed).permutation(len(train_pairs))
        n_val = max(1, round(val_fraction * len(train_pairs)))
        if len(train_pairs) - n_val < 1:
            raise InputError(f"{train_dirs[0]}: {len(train_pairs)} pair(s) are too few to hold out a validation part")
        val_pairs = [train_pairs[i] for i in sorted(order[:n_val])]
        train_pairs = [train_pairs[i] for i in sorted(order[n_val:])]
    if train_subset:
        if not 1 <= train_subset <= len(train_pairs):
            raise InputError(f"{data}: --train-subset {train_subset}: training has {len(train_pairs)} pairs here; "
                             f"give 1 to {len(train_pairs)}")
        order = np.random.default_rng([seed, 1]).permutation(len(train_pairs))  # a stream of its own, not kfold's
        train_pairs = [train_pairs[i] for i in sorted(order[:train_subset])]
    return (PairFolderDataset(train_pairs, prep, aug, task=task, other_labels=other_labels),
            PairFolderDataset(val_pairs, prep, task=task, other_labels=other_labels), prep, "pairs")


def data_on_device(choice: bool | None, device: torch.device, *datasets) -> bool:
    """--data-on-device: as asked, or by default on CUDA when the datasets take under a quarter of the GPU's
    free memory (the rest is the model's); elsewhere the DataLoader, whose workers overlap with compute."""
    if choice is not None:
        return choice
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(dataset_bytes(d) for d in datasets) < free / 4


def data_record(data: str | Path, kind: str, train_set, val_set) -> dict:
    """What identifies a run's data for --resume: which cases (or pair files) it trains and validates on.

    The items are named and counted (a fingerprint of the sorted names), not located: a folder moved or
    copied elsewhere is the same data, while another dataset, another split, fold or validation fraction
    is not. The resolved path is recorded for the message.
    """
    names = [sorted(d.case_of(i) for i in range(len(d))) for d in (train_set, val_set)]
    digest = hashlib.sha256(repr(names).encode()).hexdigest()[:16]
    return {"path": str(Path(data).resolve()), "kind": kind, "train": len(train_set), "val": len(val_set),
            "items": digest}


# ----------------------------------------------------------------------------- where a run is (Ctrl-C, NaN)
@dataclass
class Progress:
    """Where a run is, for the one-line messages of Ctrl-C and of a diverged loss.

    ``stage`` is "setting up", "step k/n", "validation", "saving" or "done" (after the epoch); ``saved`` is
    the checkpoint to resume from if training stops now, and the epochs it holds.
    """
    epochs: int
    out: Path
    advice: str  # what to try when the loss diverges
    epoch: int = 0  # 0-based
    stage: str = "setting up"
    saved: tuple[Path | str, int] | None = None
    plotted: float = -math.inf  # time.monotonic() when curves.png was last drawn

    def at(self, epoch: int, stage: str) -> None:
        """Record where the run is; a Ctrl-C that was swallowed on the way here stops it now."""
        raise_if_interrupted()
        self.epoch, self.stage = epoch, stage

    def where(self) -> str:
        e = f"epoch {self.epoch + 1}/{self.epochs}"
        if self.stage == "done":
            return f"after {e}"
        return f"{e}, {self.stage}" if self.stage.startswith("step") else f"{e} ({self.stage})"

    def diverged(self, what: str) -> TrainingDiverged:
        """One line: what went wrong, what is on disk, what to try."""
        kept = f"{self.saved[0]} still holds epoch {self.saved[1]}" if self.saved else f"nothing was saved to {self.out}/"
        return TrainingDiverged(f"{what}; stopped before saving these weights ({kept}). {self.advice}")

    def interrupted(self) -> TrainingInterrupted:
        # the unfinished epoch is dropped: resuming redoes it from its start, exactly as an unbroken run would
        return TrainingInterrupted(self.where(), self.saved)


def divergence_advice(lr: float, amp: str) -> str:
    return f"Try a lower --lr (now {lr:g})" + (" or --amp off" if amp != "off" else "") + "."


# ----------------------------------------------------------------------------- one epoch
def train_step(net, criterion, optimizer, scheduler, scaler, images: torch.Tensor, masks: torch.Tensor,
               device: torch.device, dtype: torch.dtype | None, fmt=torch.contiguous_format,
               augments: Sequence[Callable] = (), check: Callable[[torch.Tensor], None] | None = None,
               semi: SemiSupervised | None = None, unlabeled: torch.Tensor | None = None):
    """One optimizer step on a batch as it comes from the loader.

    The batch moves to ``device``, goes through the batch ``augments``, the forward pass runs under
    autocast in ``dtype``; ``check(loss)`` runs before the backward pass (raise there to stop before the
    weights change). With fp16 the scaler skips a step whose gradients overflowed. With ``semi`` (a
    semi-supervised run) the step also learns from the batch ``unlabeled`` (engine.semi) and moves the
    teacher after the optimizer step.

    Shape: images (N, C, H, W), masks (N, H, W), unlabeled (M, C, H, W). Returns (the loss, detached; N).
    """
    images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
    for augment in augments:
        images, masks = augment(images, masks)
    images = images.contiguous(memory_format=fmt)
    if semi is not None:
        loss = semi.loss(net, images, unlabeled, device, dtype, fmt, criterion, masks)
    else:
        with autocast(device, dtype):
            outputs = net(images)
        loss = criterion(outputs, masks)
    if check is not None:
        check(loss)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    if semi is not None:
        semi.update()
    return loss.detach(), len(images)


def train_one_epoch(net, model, criterion, optimizer, loader, scheduler, scaler, device: torch.device,
                    dtype: torch.dtype | None, epoch: int, progress: Progress, fmt=torch.contiguous_format,
                    augments: Sequence[Callable] = (), check_each_step: bool = True,
                    ctx: distributed.Context = distributed.Context(), show_progress: bool = False,
                    semi: SemiSupervised | None = None, unlabeled=None) -> float:
    """Train ``net`` (``model``, possibly wrapped in DDP or compiled) for epoch ``epoch`` (0-based) of ``loader``.

    Non-finite losses: with ``check_each_step`` (the CPU) the first one stops training before it touches
    the weights; otherwise they are counted on the device and read once at the end of the epoch, where fp16
    may have skipped a few overflowing steps but any other non-finite loss is fatal. The weights are
    checked before the caller validates and saves them.

    A semi-supervised run (``semi``) takes one batch of the iterator ``unlabeled`` with each labelled one.

    Returns the mean finite training loss over the epoch (all ranks). Raises TrainingDiverged.
    """
    epochs, steps = progress.epochs, len(loader)
    net.train()
    running, seen = torch.zeros((), device=device), torch.zeros((), device=device)
    bad = torch.zeros((), dtype=torch.long, device=device)

    def check(loss: torch.Tensor) -> None:
        # every rank must stop together, or the others would wait forever in the gradient all-reduce
        if distributed.all_reduce_sum((~torch.isfinite(loss.detach())).float(), ctx) > 0:
            raise progress.diverged(f"training loss became {float(loss.detach())} at {progress.where()}")

    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None if show_progress else True)
    for step, (images, masks) in enumerate(bar, 1):
        progress.at(epoch, f"step {step}/{steps}")
        loss, n = train_step(net, criterion, optimizer, scheduler, scaler, images, masks, device, dtype, fmt,
                             augments, check if check_each_step else None, semi,
                             next(unlabeled) if semi is not None else None)
        finite = torch.isfinite(loss)  # stays on the device: no sync per step
        running += torch.where(finite, loss, 0.0) * n
        seen += finite * n
        bad += ~finite
    progress.at(epoch, "validation")
    # one sync per epoch
    for t in (running, seen, bad):
        distributed.all_reduce_sum(t, ctx)
    n_bad, train_loss = int(bad), float(running) / max(float(seen), 1.0)
    if n_bad and (not scaler.is_enabled() or n_bad == steps):
        raise progress.diverged(f"training loss was not finite in {n_bad} of {steps} steps of epoch {epoch + 1}/{epochs}")
    if not weights_finite(model):
        raise progress.diverged(f"the weights stopped being finite in epoch {epoch + 1}/{epochs}")
    return train_loss


def weights_finite(model: torch.nn.Module) -> bool:
    """True when every floating-point parameter and buffer is finite (one device sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


@torch.no_grad()
def validate(model, loader, criterion, task: str, device, dtype, threshold: float = 0.5,
             fmt=torch.contiguous_format, ctx: distributed.Context = distributed.Context()) -> dict:
    """Loss and pooled metrics over a whole loader (counts accumulated over the set, not batch means).

    Under torchrun each rank scores its own share of the validation set and the loss and TP/FP/FN/TN
    counts are summed over ranks, so the figures are those of the whole set. ``score`` ranks epochs for
    best_model.pth: the mean Dice of the structures present in the validation ground truth, or minus the
    loss when none is (a validation set without lesion has no Dice). For a types task those structures are
    its classes (lung, ground-glass opacity, consolidation), not the lesion union, which would count the
    lesions twice: a rare type (consolidation) weighs as much as a common one, as in the per-class figures
    the types are judged by. Pixels labelled IGNORE_INDEX count in no score (nor in the loss).
    """
    model.eval()
    names = list(class_targets(torch.zeros(1, 1, 1, dtype=torch.long), task))
    meters = {name: SegmentationMeter() for name in names}
    total, n = torch.zeros((), device=device), 0
    for images, masks in loader:
        images = images.to(device, non_blocking=True, memory_format=fmt)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
        total += criterion(logits, masks) * len(images)
        n += len(images)
        probs, targets = class_probs(logits, task), class_targets(masks, task)
        if task in TYPE_TASKS:  # ignored pixels: predicted and true nowhere, so no TP, FP or FN
            kept = masks != IGNORE_INDEX
            probs = {name: p * kept for name, p in probs.items()}
            # each type as the label map gives it (type_prediction), the rule evaluation and infer.py use
            labels = type_prediction(probs, task, threshold)
            probs.update({name: (labels == value).float() for name, value in lesion_types(task).items()})
        for name, meter in meters.items():
            meter.update(probs[name], targets[name], threshold)
    counts = [[m.pooled()[k] for k in ("tp", "fp", "fn", "tn")] for m in meters.values()]
    summed = distributed.all_reduce_sum(torch.tensor([float(total), n, *sum(counts, [])], dtype=torch.float64,
                                                     device=device), ctx).tolist()
    loss = summed[0] / max(summed[1], 1)
    per = {name: [int(v) for v in summed[2 + 4 * i: 6 + 4 * i]] for i, name in enumerate(names)}
    pooled = {name: metrics_from_counts(*c) for name, c in per.items()}
    ranked = [name for name in names if not (task in TYPE_TASKS and name == main_structure(task))]
    present = [pooled[name]["dice"] for name in ranked if per[name][0] + per[name][2] > 0]  # tp + fn: in the truth
    main = main_structure(task)
    result = {"loss": loss, "dice": pooled[main]["dice"], "iou": pooled[main]["iou"],
              "score": float(np.mean(present)) if present else -loss}
    if len(pooled) > 1:
        # named as in file names ("ggo_dice"): they become history.csv's columns
        result.update({f"{structure_slug(name)}_dice": p["dice"] for name, p in pooled.items()})
    return result


@dataclass
class Hooks:
    """The parts of a run that tests swap: the loss, optimizer and validation factories, and the rule for
    checking the loss at every step. Each default is this module's function of the same role."""
    loss: Callable = build_loss
    optimizer: Callable = make_optimizer
    validate: Callable = validate
    check_each_step: Callable[[torch.device], bool] = checks_loss_each_step


def history_row(epoch: int, train_loss: float, val: dict, lr: float, seconds: float) -> dict:
    """One row of history.csv."""
    return {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"], "val_dice": val["dice"],
            "val_iou": val["iou"], **{f"val_{k}": v for k, v in val.items() if k.endswith("_dice")},
            "val_score": val["score"], "lr": lr, "seconds": seconds}


# ----------------------------------------------------------------------------- best epoch, resume, save
def is_better(score: float, loss: float, best_score: float, best_loss: float) -> bool:
    """Whether an epoch beats the best so far for best_model.pth: a higher validation score, or the same
    score with a lower validation loss (a run whose Dice stays 0 keeps improving its loss, and the model
    kept should be the one that learned most, not epoch 1)."""
    return score > best_score or (score == best_score and loss < best_loss)


def best_epoch(history: list[dict]) -> dict | None:
    """The history row best_model.pth holds, by the rule of :func:`is_better` (the first of equals)."""
    best = None
    for row in history:
        if best is None or is_better(row["val_score"], row["val_loss"], best["val_score"], best["val_loss"]):
            best = row
    return best


def resume_mismatch(ckpt: dict, state: dict) -> str | None:
    """What differs between a checkpoint and the run asked to continue it (data, preprocessing, task,
    model, loss), as a phrase naming the first such change; None when the run may resume."""
    if ckpt["model_config"] != state["model_config"] or ckpt.get("task") != state["task"]:
        return (f"holds {ckpt['model_config']} for task {ckpt.get('task')!r}; asked for {state['model_config']} for "
                f"task {state['task']!r} (pass the checkpoint's --model/--width/--aux/--loss/--task)")
    # a record the checkpoint lacks (an older or a slimmed file) is not compared
    loss = ckpt.get("loss", state["loss"])
    batch_dice = ckpt.get("args", {}).get("batch_dice", state["args"]["batch_dice"])
    if (loss, batch_dice) != (state["loss"], state["args"]["batch_dice"]):
        held = f"{loss}{'' if batch_dice else ' --no-batch-dice'}"
        asked = f"{state['loss']}{'' if state['args']['batch_dice'] else ' --no-batch-dice'}"
        return f"was trained with loss {held}, asked for {asked} (pass the checkpoint's --loss/--batch-dice)"
    if ckpt.get("semi") != state.get("semi"):
        said = lambda r: "supervised" if r is None else (  # noqa: E731
            f"{r['method']} on {r['unlabeled']['count']} unlabelled slices of {r['unlabeled']['path']} (weight "
            f"{r['weight']:g}, EMA decay {r['ema_decay']:g}, confidence {r['confidence']:g}"
            + (f", teacher {r['teacher']['path']} sha256 {r['teacher']['sha256']}" if r.get("teacher") else "") + ")")
        return (f"was trained {said(ckpt.get('semi'))}; asked for {said(state.get('semi'))} (pass the checkpoint's "
                f"--unlabeled/--semi/--unlabeled-weight/--ema-decay/--confidence/--teacher)")
    for flag in ("opt", "sched"):  # the optimizer's and the schedule's states fit their own kind only
        held = ckpt.get("args", {}).get(flag, state["args"].get(flag))
        if held != state["args"].get(flag):
            return (f"was trained with --{flag} {held}, asked for --{flag} {state['args'][flag]} (pass the "
                    f"checkpoint's --{flag})")
    if ckpt.get("other_labels", state.get("other_labels")) != state.get("other_labels"):
        return (f"made other lesion labels {ckpt.get('other_labels')!r}, asked for {state.get('other_labels')!r} "
                f"(pass the checkpoint's --other-labels)")
    held, asked = ckpt.get("preprocessing", state["preprocessing"]), state["preprocessing"]
    if "look" not in held:  # a checkpoint from before looks were recorded
        asked = {k: v for k, v in asked.items() if k != "look"}
    if held != asked:
        keys = sorted(k for k in {*held, *asked} if held.get(k) != asked.get(k))
        diff = ", ".join(f"{k} {held.get(k)!r} there, {asked.get(k)!r} now" for k in keys[:3])
        return f"was trained with other preprocessing ({diff}) (pass the checkpoint's --size, or its data)"
    held, asked = ckpt.get("data"), state["data"]
    if held is not None:
        if held["kind"] != asked["kind"] or (held["train"], held["val"]) != (asked["train"], asked["val"]):
            return (f"was trained on {held['train']} train / {held['val']} val {held['kind']} items of "
                    f"{held['path']}; --data {state['args']['data']} gives {asked['train']} / {asked['val']} "
                    f"(pass the checkpoint's --data/--folds/--fold/--val-fraction/--seed)")
        if held["items"] != asked["items"]:
            return (f"was trained on other cases than --data {state['args']['data']} gives (same counts, other "
                    f"names; it used {held['path']}) (pass the checkpoint's --data/--folds/--fold/--seed)")
    return None


@dataclass
class RunState:
    """What a run carries from epoch to epoch: where it starts, its best epoch so far, its history, and
    whether this process wrote OUT/best_model.pth (the final message names only what holds)."""
    start_epoch: int = 0
    best: float = -math.inf
    best_loss: float = math.inf
    history: list[dict] = field(default_factory=list)
    best_saved: bool = False
    changes: list[str] = field(default_factory=list)  # a resumed run's settings that differ from its checkpoint's


def resume(path: str | Path, state: dict, model, optimizer, scheduler, scaler, gen: torch.Generator,
           semi: SemiSupervised | None = None) -> RunState:
    """Load ``path``, check that it continues the run ``state`` describes, and restore model, optimizer,
    scheduler, AMP scaler and RNG states (and a semi-supervised run's teacher and step count) into the
    objects given. Raises InputError naming the difference."""
    ckpt = load_checkpoint(path)
    mismatch = resume_mismatch(ckpt, state)
    if mismatch:
        raise InputError(f"{path}: cannot resume from it, it {mismatch}; or start afresh with another --out")
    wanted = RESUME_KEYS + (() if semi is None else ("semi_state",) if semi.fixed else SEMI_KEYS)
    lacking = [key for key in wanted if key not in ckpt]
    if lacking:
        raise InputError(f"{path}: cannot resume from it, it lacks {lacking} (resume from the "
                         f"last.pth that train.py wrote)")
    if semi is not None and not semi.fixed:  # "model" holds the teacher (scored and inferred with)
        model.load_state_dict(ckpt["student"])
        semi.load_state_dict({"teacher": ckpt["model"], **ckpt["semi_state"]})
    else:
        model.load_state_dict(ckpt["model"])
        if semi is not None:  # a fixed teacher: its file is the record's, checked by resume_mismatch
            semi.load_state_dict(ckpt["semi_state"])
    optimizer.load_state_dict(ckpt["optimizer"])
    try:
        scheduler.load_state_dict(scheduler_state(ckpt["scheduler"], scheduler))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: damaged scheduler state ({type(e).__name__}: {e})") from None
    changes = retune(optimizer, scheduler, ckpt.get("args", {}), state["args"])
    # a scaler state exists only where fp16 ran; switching precision on resume starts a fresh scaler
    if scaler.is_enabled() and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:  # checkpoints older than this field resume without it (epochs are reseeded)
        try:
            restore_rng_states(ckpt["rng"], gen)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"{path}: damaged RNG state ({type(e).__name__}: {e})") from None
    best, history = ckpt["best_score"], ckpt["history"]
    # checkpoints older than "best_loss" hold it in their history: the first row with the best score
    best_loss = ckpt.get("best_loss", next((r["val_loss"] for r in history if r["val_score"] == best), math.inf))
    return RunState(ckpt["epoch"] + 1, best, best_loss, history, changes=changes)


def retune(optimizer, scheduler, held: dict, asked: dict) -> list[str]:
    """Give a resumed run this run's --lr and --weight-decay where the checkpoint's run (``held``, its args)
    had others, and say what changed, a new --epochs too, for the resume line.

    The optimizer's state holds the old learning rate and weight decay, and would keep them: a run that
    diverged and is resumed with a lower --lr, as its message advises, would diverge again. --lr is the
    schedule's peak: every rate of the schedule is scaled by the new peak over the old, from the step reached
    on. A new --epochs stretches the schedule (see ``scheduler_state``).
    """
    changes = []
    lr, old_lr = asked.get("lr"), held.get("lr")
    if lr is not None and old_lr and lr != old_lr:
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # one-cycle's keys beside the rate itself
                if key in group:
                    group[key] *= lr / old_lr
        scheduler.base_lrs = [rate * lr / old_lr for rate in scheduler.base_lrs]
        changes.append(f"--lr {lr:g}, not {old_lr:g}")
    decay, old_decay = asked.get("weight_decay"), held.get("weight_decay")
    if decay is not None and old_decay is not None and decay != old_decay:
        for group in optimizer.param_groups:
            group["weight_decay"] = decay
        changes.append(f"--weight-decay {decay:g}, not {old_decay:g}")
    epochs, old_epochs = asked.get("epochs"), held.get("epochs")
    if asked.get("sched", "none") != "none" and old_epochs is not None and epochs != old_epochs:
        changes.append(f"the {asked['sched']} learning-rate schedule now spans {epochs} epochs, not {old_epochs}")
    return changes


def scheduler_state(saved: dict, scheduler) -> dict:
    """``saved`` (a checkpoint's scheduler state) made to fit ``scheduler``, built for this run's --epochs.

    The cosine schedule's length is this run's (its state holds only the step reached); one-cycle's state
    holds its length too. It is taken from ``scheduler``, so that resuming with more or fewer epochs
    stretches the cycle as it does the cosine schedule, instead of failing at the old cycle's end.
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        return {**saved, "total_steps": scheduler.total_steps, "_schedule_phases": scheduler._schedule_phases}
    return saved


def save(out: Path, ckpt: dict, improved: bool, progress: Progress, is_main: bool = True) -> None:
    """Write OUT/best_model.pth (when ``improved``), OUT/last.pth, history.csv and curves.png (rank 0 only),
    and record in ``progress`` that OUT/last.pth now holds this epoch.

    Best before last: a crash between the two redoes this epoch on resume, which rewrites both.
    curves.png is redrawn at most every PLOT_EVERY_S seconds and after the last epoch: drawing it took
    0.29 s, an eighth of a 2.4 s epoch of the COVID-SemiSeg recipe (AMD EPYC, 2 cores).
    """
    if is_main:
        if improved:
            save_checkpoint(ckpt, out / "best_model.pth")
        save_checkpoint(ckpt, out / "last.pth")
    progress.saved = (out / "last.pth", ckpt["epoch"] + 1)
    if is_main:
        write_csv(ckpt["history"], out / "history.csv")
        now = time.monotonic()
        if ckpt["epoch"] + 1 >= progress.epochs or now - progress.plotted >= PLOT_EVERY_S:
            plot_curves(ckpt["history"], out / "curves.png")
            progress.plotted = now


def checkpoint(state: dict, model, optimizer, scheduler, scaler, gen: torch.Generator, epoch: int, val: dict,
               run: RunState, semi: SemiSupervised | None = None) -> dict:
    """The self-describing checkpoint of an epoch: the run's record ``state`` plus every state to resume.

    A semi-supervised run's "model" is its teacher (the weights validation scored, which infer.py and
    evaluate.py load), with the student in "student" and the teacher's step count in "semi_state"; with a
    fixed teacher (self-training) "model" is the student, and "semi_state" the step count."""
    ckpt = {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "rng": rng_states(gen), "metrics": {k: float(v) for k, v in val.items()}, "best_score": run.best,
            "best_loss": run.best_loss, "history": run.history}
    if semi is not None:
        teacher = semi.state_dict()
        if "teacher" in teacher:
            ckpt.update(model=teacher.pop("teacher"), student=ckpt["model"])
        ckpt["semi_state"] = teacher
    return ckpt


def where_saved(out: Path, best_row: dict | None, resume: str | None, best_saved: bool) -> str:
    """What the run left in OUT, naming only files that hold it. ``best_saved``: this process wrote
    OUT/best_model.pth. A resumed run whose best epoch came before the resume has it beside the checkpoint
    it resumed from (the same file when that is OUT), not necessarily in OUT."""
    earlier = Path(resume).parent if resume else None
    best_here = best_saved or (earlier is not None and earlier.resolve() == out.resolve())
    files = [name for name in ("best_model.pth", "last.pth", "history.csv", "curves.png")
             if (out / name).is_file() and (name != "best_model.pth" or best_here)]
    said = f"{', '.join(files)} in {out}/" if files else f"nothing written to {out}/ (no epoch was left to train)"
    if best_row and "best_model.pth" not in files:
        said += (f"; epoch {best_row['epoch']}'s best_model.pth is {earlier / 'best_model.pth'}"
                 if earlier is not None and (earlier / "best_model.pth").is_file()
                 else f"; no best_model.pth of epoch {best_row['epoch']} was kept")
    return said
