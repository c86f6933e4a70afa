"""Train a lesion (or lung) segmentation model on CT slices.

    python train.py                                   # the defaults below
    python train.py --data data/processed --model deeplabv3 --epochs 30 --device cuda

--data is either a folder written by data.preprocess (+ splits.json from data.split_data), or a folder of
image-mask pairs: train_images/ + train_masks/ (+ val_images/ + val_masks/), or COVID-SemiSeg's Imgs/ + GT/.
Writes OUT/best_model.pth (best validation Dice), OUT/last.pth, OUT/history.csv and OUT/curves.png.

Crash safety: every output is written to a hidden temporary file and renamed, so a crash or a kill at any
moment leaves the last good OUT/last.pth (saved after every epoch) loadable. `--resume OUT/last.pth`
restores model, optimizer, scheduler, AMP scaler, RNG states and epoch: on CPU with --deterministic, an
interrupted-and-resumed run ends with bitwise the same weights as an uninterrupted one. Ctrl-C stops at
once (the unfinished epoch is dropped) and says how to resume; a NaN or infinite loss stops training
before those weights are saved. See docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

# ---- Edit these, then run `python train.py` (each can also be set by the flag named beside it) ----
DATA = "data/processed"  # --data: preprocessed folder, or a folder of image-mask pairs
MODEL = "unet"           # --model: unet | deeplabv3
LOSS = None              # --loss: bce | dice | bce_dice | ce | ce_dice (None: bce_dice for unet, ce_dice for deeplabv3)
EPOCHS = 50              # --epochs
BATCH_SIZE = 8           # --batch-size
LR = 1e-3                # --lr (Adam, with warm-up and cosine decay; see --opt, --sched)
OUT = "checkpoints"      # --out: best_model.pth, last.pth, history.csv, curves.png
# ----------------------------------------------------------------------------------------------------

from data.augment import AUGMENT_LEVELS, BatchAugment, SpatialAugment  # noqa: E402
from data.dataset import (TASK_CLASSES, TASKS, DeviceLoader, PairAugment, PairFolderDataset,  # noqa: E402
                          SliceArrayDataset, dataset_bytes, find_pair_dirs, pair_files)
from data.split_data import kfold, write_json  # noqa: E402
from data.transforms import InputError, make_preprocessing  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402
from base import exclusive_lock  # noqa: E402
from utils.cli import add_runtime_args  # noqa: E402
from utils.checkpoint import (load_checkpoint, remove_stale_temp_files, restore_rng_states, rng_states,  # noqa: E402
                              safe_load, save_checkpoint)
from utils.helpers import (amp_dtype, autocast, plot_curves, resolve_device, seed_everything,  # noqa: E402
                           write_csv)
from utils.inference import class_probs, class_targets  # noqa: E402
from utils.losses import LOSSES, get_loss  # noqa: E402
from utils.metrics import SegmentationMeter, metrics_from_counts  # noqa: E402
from utils import distributed  # noqa: E402


OUTPUTS = ("last.pth", "best_model.pth", "history.csv", "curves.png")
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_score", "history")
LOCK_HOLDER = "another train.py run"


class TrainingDiverged(FloatingPointError):
    """The loss (or the weights) stopped being finite; the weights of that epoch were not saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where it stopped and how to resume."""


def default_loss(model: str, task: str) -> str:
    return "bce_dice" if (model == "unet" and task != "lung+lesion") else "ce_dice"


def output_channels(loss: str, task: str) -> int:
    """One sigmoid channel for bce losses (and dice on a two-class task), else one channel per class."""
    if loss in ("bce", "bce_dice") or (loss == "dice" and TASK_CLASSES[task] == 2):
        if TASK_CLASSES[task] > 2:
            raise InputError(f"--loss {loss} is binary; task {task!r} has {TASK_CLASSES[task]} classes: use ce or ce_dice")
        return 1
    return TASK_CLASSES[task]


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
    held, asked = ckpt.get("preprocessing", state["preprocessing"]), state["preprocessing"]
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


def build_datasets(data: str | Path, task: str, size: int, val_fraction: float, seed: int, augment: str,
                   folds: int = 0, fold: int = 0):
    """Training and validation datasets from either data kind, and the preprocessing record they share.

    ``augment`` other than "none" gives the training items flips, 90-degree turns and intensity jitter
    (``PairAugment``); "strong" adds the batch warp of ``SpatialAugment``, which the training loop applies.

    With ``folds`` > 0 (pair folders), validation is fold ``fold`` of a seeded K-fold partition of the
    pairs and training the other folds.
    """
    data = Path(data)
    aug = PairAugment() if augment != "none" else None
    if (data / "images.npy").is_file():
        if folds:
            raise InputError(f"{data}: --folds is for folders of image-mask pairs; preprocessed volumes are split "
                             f"by patient with data.split_data")
        train = SliceArrayDataset(data, "train", task, aug)
        return train, SliceArrayDataset(data, "val", task), train.preprocessing, "arrays"
    if find_pair_dirs(data, "train") is None:
        raise InputError(f"{data}: no training data. Make the synthetic default with `make demo`, or run "
                         f"`python -m data.synthetic --out data/synthetic && python -m data.preprocess "
                         f"--src data/synthetic --out {data} && python -m data.split_data --data {data}`; "
                         f"or point --data at a folder of image-mask pairs (train_images/ + train_masks/, Imgs/ + GT/)")
    if task != "lesion":
        raise InputError(f"{data}: image-mask pair folders hold lesion masks only; --task {task} needs preprocessed volumes")
    prep = make_preprocessing(size, "minmax")
    train_dirs, val_dirs = find_pair_dirs(data, "train"), find_pair_dirs(data, "val")
    train_pairs = pair_files(*train_dirs)
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
    return (PairFolderDataset(train_pairs, prep, aug), PairFolderDataset(val_pairs, prep), prep, "pairs")


def data_on_device(choice: bool | None, device: torch.device, *datasets) -> bool:
    """--data-on-device: as asked, or by default on CUDA when the datasets take under a quarter of the GPU's
    free memory (the rest is the model's); elsewhere the DataLoader, whose workers overlap with compute."""
    if choice is not None:
        return choice
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(dataset_bytes(d) for d in datasets) < free / 4


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (weight decay as an L2 term in the gradient) or AdamW (decoupled weight decay)."""
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return kind(params, lr=lr, weight_decay=weight_decay)


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


@torch.no_grad()
def validate(model, loader, criterion, task: str, device, dtype, threshold: float = 0.5,
             fmt=torch.contiguous_format, ctx: distributed.Context = distributed.Context()) -> dict:
    """Loss and pooled metrics over a whole loader (counts accumulated over the set, not batch means).

    Under torchrun each rank scores its own share of the validation set and the loss and TP/FP/FN/TN
    counts are summed over ranks, so the figures are those of the whole set. ``score`` ranks epochs for
    best_model.pth: the mean Dice of the structures present in the validation ground truth, or minus the
    loss when none is (a validation set without lesion has no Dice).
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
        for name, meter in meters.items():
            meter.update(probs[name], targets[name], threshold)
    counts = [[m.pooled()[k] for k in ("tp", "fp", "fn", "tn")] for m in meters.values()]
    summed = distributed.all_reduce_sum(torch.tensor([float(total), n, *sum(counts, [])], dtype=torch.float64,
                                                     device=device), ctx).tolist()
    loss = summed[0] / max(summed[1], 1)
    per = {name: [int(v) for v in summed[2 + 4 * i: 6 + 4 * i]] for i, name in enumerate(names)}
    pooled = {name: metrics_from_counts(*c) for name, c in per.items()}
    present = [pooled[name]["dice"] for name, c in per.items() if c[0] + c[2] > 0]  # tp + fn: in the truth
    main = "lesion" if "lesion" in pooled else "lung"
    result = {"loss": loss, "dice": pooled[main]["dice"], "iou": pooled[main]["iou"],
              "score": float(np.mean(present)) if present else -loss}
    if len(pooled) > 1:
        result.update({f"{name}_dice": p["dice"] for name, p in pooled.items()})
    return result


def checks_loss_each_step(device: torch.device) -> bool:
    """Whether each step's loss is checked before it touches the weights.

    On the CPU reading a scalar is free; on a GPU it is a sync per step, so there non-finite losses are
    counted on the device and read once per epoch, and the weights are checked before anything is saved.
    """
    return device.type == "cpu"


def weights_finite(model: torch.nn.Module) -> bool:
    """True when every floating-point parameter and buffer is finite (one device sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


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


def diverged_message(what: str, saved, out: Path, args: argparse.Namespace) -> str:
    """One line: what went wrong, what is on disk, what to try."""
    kept = f"{saved[0]} still holds epoch {saved[1]}" if saved else f"nothing was saved to {out}/"
    return (f"{what}; stopped before saving these weights ({kept}). "
            f"Try a lower --lr (now {args.lr:g})" + (" or --amp off" if args.amp != "off" else "") + ".")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA, help="preprocessed folder or folder of image-mask pairs")
    p.add_argument("--model", default=MODEL, choices=MODEL_NAMES)
    p.add_argument("--loss", default=LOSS, choices=sorted(LOSSES), help="default: bce_dice (unet), ce_dice (deeplabv3)")
    p.add_argument("--task", default="lesion", choices=TASKS, help="what to segment (lung+lesion: 3 classes)")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--batch-dice", action=argparse.BooleanOptionalAction, default=True,
                   help="Dice term pooled over the batch (default) or, with --no-batch-dice, averaged over images")
    p.add_argument("--opt", default="adam", choices=("adam", "adamw"), help="optimizer (adamw: decoupled weight decay)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--sched", default="cosine", choices=("cosine", "onecycle", "none"),
                   help="per-step cosine with warm-up, one-cycle (peak --lr), or constant")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="cosine schedule's linear warm-up")
    p.add_argument("--width", type=int, default=32, help="U-Net base width (32: ~7.8M parameters)")
    p.add_argument("--aux", action="store_true", help="DeepLabV3 auxiliary head (loss weight 0.4)")
    p.add_argument("--backbone-weights", default=None, help="DeepLabV3: ResNet-50 state dict to start from")
    p.add_argument("--size", type=int, default=256, help="input side for image-mask pair folders")
    p.add_argument("--val-fraction", type=float, default=0.15, help="pair folders without a val part: held-out share")
    p.add_argument("--folds", type=int, default=0, help="pair folders: K-fold cross-validation, one run per fold")
    p.add_argument("--fold", type=int, default=None, help="with --folds: run this fold only (0-based)")
    p.add_argument("--augment", default="basic", choices=AUGMENT_LEVELS,
                   help="basic: flips, 90-degree turns, intensity jitter; strong: also random scale/crop, rotation, "
                        "shift, elastic warp and noise, done per batch on the training device")
    p.add_argument("--no-augment", dest="augment", action="store_const", const="none", help="same as --augment none")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="record in the checkpoints that infer.py/evaluate.py should predict with flip test-time "
                        "augmentation (their --tta/--no-tta overrides); fold scores of --folds use it too")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory layout (with bf16 on an AMX CPU: U-Net training 2.4x faster than NCHW)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="under torchrun on GPUs: batch-norm statistics over all processes")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 4 on CUDA)")
    p.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None,
                   help="hold the data on the training device and augment whole batches there (default: on CUDA "
                        "when the data takes under a quarter of the free GPU memory)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (first steps slower while it compiles; see docs/BENCHMARKS.md)")
    p.add_argument("--out", default=OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue from a checkpoint (e.g. OUT/last.pth)")
    return add_runtime_args(p)


def main(args: argparse.Namespace) -> dict:
    """Train once, or with --folds K (and no --fold) once per fold into OUT/fold<i>, then report the
    cross-validated scores in OUT/cv.json (see :func:`cross_validate`)."""
    with contextlib.ExitStack() as hold:
        if not args.folds or args.fold is not None:
            if args.fold is not None and not 0 <= args.fold < max(args.folds, 1):
                raise InputError(f"--fold {args.fold} needs --folds K with 0 <= fold < K")
            return train(args, hold)
        return cross_validate(args, hold)


def _mean_sd(values: list[float]) -> dict:
    return {"mean": float(np.nanmean(values)), "sd": float(np.nanstd(values, ddof=1)) if len(values) > 1 else None}


def cross_validate(args: argparse.Namespace, hold: contextlib.ExitStack | None = None) -> dict:
    """K-fold cross-validation: one run per fold, each scored on its own validation part.

    Each fold's final model (last.pth, not the epoch that scored best on this very validation part, which
    would be a biased pick) is scored by evaluate.py on the fold's validation pairs at their own
    resolution, with flip TTA if --tta: mean per-image Dice and IoU at 0.5 and Inf-Net's threshold-averaged
    Dice. OUT/cv.json holds every fold's figures, their mean +- sd over folds, and the out-of-fold means
    over all images (each image scored once, by the model that did not train on it).

    With ``hold``, OUT is locked against other train.py runs (see :func:`train`) until ``hold`` closes.
    """
    from evaluate import evaluate, finite_or_none  # only here: evaluate.py imports nothing from training

    if hold is not None and int(os.environ.get("RANK", "0")) == 0:
        build_datasets(args.data, args.task, args.size, args.val_fraction, args.seed, "none", args.folds, 0)
        Path(args.out).mkdir(parents=True, exist_ok=True)  # only once the data is known to be there
        hold.enter_context(exclusive_lock(args.out, LOCK_HOLDER))
    runs, scores = [], {"dice": [], "iou": [], "dice_threshold_averaged": [], "n": []}
    for i in range(args.folds):
        out = Path(args.out) / f"fold{i}"
        run = train(argparse.Namespace(**{**vars(args), "fold": i, "out": str(out)}))
        runs.append(run)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 scores
            continue
        res = evaluate(out / "last.pth", args.data, out=out / "eval-val", device=args.device, amp=args.amp,
                       batch_size=args.batch_size, progress=False, tta=args.tta, pairs=run["val_pairs"],
                       split="val")
        per_image = res["structures"]["lesion"]["per_image"]
        for key in ("dice", "iou", "dice_threshold_averaged"):
            scores[key].append(per_image[key]["mean"])
        scores["n"].append(per_image["dice"]["n"])
    summary = {"folds": args.folds, "seed": args.seed, "tta": args.tta,
               "best_val_dice": [r["best_dice"] for r in runs], "last_epoch": scores}
    if scores["n"]:
        n = np.array(scores["n"], dtype=np.float64)
        summary["mean_over_folds"] = {k: _mean_sd(scores[k]) for k in ("dice", "iou", "dice_threshold_averaged")}
        summary["out_of_fold"] = {k: float(np.nansum(np.array(scores[k]) * n) / n.sum())
                                  for k in ("dice", "iou", "dice_threshold_averaged")}
        summary = finite_or_none(summary)  # a fold without lesion has no Dice: null, not NaN, in the JSON
        write_json(Path(args.out) / "cv.json", summary)
        m = summary["mean_over_folds"]
        print(f"{args.folds}-fold cross-validation, final models{' with flip TTA' if args.tta else ''}, mean per-image "
              f"over folds: Dice {m['dice']['mean']:.4f} ± {m['dice']['sd'] or 0:.4f}, threshold-averaged Dice "
              f"{m['dice_threshold_averaged']['mean']:.4f} ± {m['dice_threshold_averaged']['sd'] or 0:.4f} (folds: "
              f"{', '.join(f'{d:.4f}' for d in scores['dice'])}); {args.out}/cv.json, models {args.out}/fold*/last.pth")
    return {**summary, "runs": runs}


def train(args: argparse.Namespace, hold: contextlib.ExitStack | None = None) -> dict:
    """One training run (see the module docstring); returns {"best_dice", "history", "val_pairs"}.

    With ``hold``, rank 0 locks OUT (OUT/.lock) once the data is read, until ``hold`` closes: a second
    train.py run into the same OUT is refused instead of overwriting this one's checkpoints.
    """
    seed_everything(args.seed, args.deterministic)
    ctx, device = distributed.setup(resolve_device(args.device))
    log = print if ctx.is_main else (lambda *a, **k: None)  # only rank 0 talks and writes
    dtype = amp_dtype(device, args.amp)
    loss_name = args.loss or default_loss(args.model, args.task)
    num_classes = output_channels(loss_name, args.task)
    train_set, val_set, prep, data_kind = build_datasets(args.data, args.task, args.size, args.val_fraction,
                                                         args.seed, args.augment, args.folds, args.fold or 0)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    gen = torch.Generator()
    # The sampler's shuffle depends on (seed, epoch) only; under torchrun each rank takes every world_size-th
    # index of the same permutation, so N processes with batch B see the global batches of one with N*B.
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    drop_last = len(sampler) > args.batch_size
    # validation: each rank scores a disjoint share, no padding, and validate() sums the counts
    val_rows = range(ctx.rank, len(val_set), ctx.world_size)
    on_device = data_on_device(args.data_on_device, device, train_set, val_set)
    if on_device:  # both sets on the device once; flips, turns and jitter per batch there (BatchAugment)
        train_set.augment = None
        train_loader = DeviceLoader(train_set, args.batch_size, sampler, device, drop_last, workers,
                                    progress=args.progress and ctx.is_main)
        val_loader = DeviceLoader(val_set, args.batch_size, val_rows, device, workers=workers,
                                  progress=args.progress and ctx.is_main)
    else:
        train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=drop_last,
                                  num_workers=workers, generator=gen, pin_memory=device.type == "cuda",
                                  persistent_workers=False)  # workers restarted and reseeded every epoch
        val_loader = DataLoader(Subset(val_set, val_rows), args.batch_size, num_workers=workers,
                                pin_memory=device.type == "cuda")

    model_kwargs = {"width": args.width} if args.model == "unet" else {"aux": args.aux}
    model = build_model(args.model, in_channels=1, num_classes=num_classes, **model_kwargs)
    if args.backbone_weights:
        if args.model != "deeplabv3":
            raise InputError("--backbone-weights applies to --model deeplabv3 only")
        from models.deeplabv3 import load_backbone_weights
        state = safe_load(args.backbone_weights, "backbone weights file")
        try:
            load_backbone_weights(model, state)
        except (TypeError, ValueError) as e:
            raise InputError(f"{args.backbone_weights}: {e}") from None
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if ctx.enabled and device.type == "cuda" and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all GPUs
    model.to(device, memory_format=fmt)
    criterion = get_loss(loss_name, num_classes, batch_dice=args.batch_dice)
    optimizer = make_optimizer(args.opt, model.parameters(), args.lr, args.weight_decay)
    # augmentation done per batch on the training device: flips, turns and jitter when the data sits there
    # (otherwise the loader's workers do them per item), and the warp of --augment strong
    batch_augments = ([BatchAugment()] if on_device and args.augment != "none" else []) + \
                     ([SpatialAugment()] if args.augment == "strong" else [])
    steps = len(train_loader)
    scheduler = make_scheduler(optimizer, args.sched, args.epochs * steps, int(args.warmup_epochs * steps))
    # loss scaling is needed for fp16 only; bf16 has fp32's range
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if hold is not None and ctx.is_main:
        hold.enter_context(exclusive_lock(out, LOCK_HOLDER))
    remove_stale_temp_files(out, OUTPUTS)  # left by a run that was killed while writing
    state = {"model_config": {"name": args.model, **model.config}, "num_classes": num_classes, "task": args.task,
             "loss": loss_name, "preprocessing": prep, "data_kind": data_kind,
             "data": data_record(args.data, data_kind, train_set, val_set), "inference": {"tta": args.tta},
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}}
    state["args"]["data_on_device"] = on_device  # what the default chose, not None
    start_epoch, best, best_loss, history = 0, -math.inf, math.inf, []
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        mismatch = resume_mismatch(ckpt, state)
        if mismatch:
            raise InputError(f"{args.resume}: cannot resume from it, it {mismatch}; or start afresh with another --out")
        lacking = [key for key in RESUME_KEYS if key not in ckpt]
        if lacking:
            raise InputError(f"{args.resume}: cannot resume from it, it lacks {lacking} (resume from the "
                             f"last.pth that train.py wrote)")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # a scaler state exists only where fp16 ran; switching precision on resume starts a fresh scaler
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:  # checkpoints older than this field resume without it (epochs are reseeded)
            try:
                restore_rng_states(ckpt["rng"], gen)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise InputError(f"{args.resume}: damaged RNG state ({type(e).__name__}: {e})") from None
        start_epoch, best, history = ckpt["epoch"] + 1, ckpt["best_score"], ckpt["history"]
        # checkpoints older than "best_loss" hold it in their history: the first row with the best score
        best_loss = ckpt.get("best_loss", next((r["val_loss"] for r in history if r["val_score"] == best), math.inf))
        log(f"resumed from {args.resume} at epoch {start_epoch + 1}/{args.epochs}", flush=True)

    # DDP broadcasts rank 0's weights and averages gradients; `model` stays the unwrapped module that is saved
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if ctx.enabled else model
    if args.compile:
        net = torch.compile(net)  # compiles on the first training and the first validation batch
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.model} ({n_params / 1e6:.2f}M parameters, {num_classes} output channel(s), loss {loss_name}) on "
          f"{device}{' with ' + str(dtype).replace('torch.', '') + ' autocast' if dtype else ''}: "
          f"{len(train_set)} train / {len(val_set)} val slices"
          + (f"; {ctx.world_size} processes, global batch {ctx.world_size * args.batch_size}" if ctx.enabled else "")
          + (f"; data held on {device}" if on_device else "") + ("; torch.compile" if args.compile else ""))
    check_each_step = checks_loss_each_step(device)
    best_saved = False  # whether this run wrote OUT/best_model.pth (the final message names only what holds)
    saved = None  # the checkpoint to resume from if training stops now, and the epochs it holds
    if args.resume:
        saved = (args.resume, start_epoch)
    where = f"epoch {start_epoch + 1}/{args.epochs} (setting up)"
    try:
        for epoch in range(start_epoch, args.epochs):
            # reseeding per epoch makes shuffling and augmentation independent of where a run was resumed:
            # the loader's workers are started anew each epoch and seeded from `gen` (see the DataLoader)
            gen.manual_seed(args.seed * 100003 + epoch)
            torch.manual_seed(args.seed * 100003 + epoch)
            sampler.set_epoch(epoch)
            net.train()
            t0, running, seen = time.time(), torch.zeros((), device=device), torch.zeros((), device=device)
            bad = torch.zeros((), dtype=torch.long, device=device)
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                       disable=None if (args.progress and ctx.is_main) else True)
            for step, (images, masks) in enumerate(bar, 1):
                where = f"epoch {epoch + 1}/{args.epochs}, step {step}/{steps}"
                images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
                for augment in batch_augments:
                    images, masks = augment(images, masks)
                images = images.contiguous(memory_format=fmt)
                with autocast(device, dtype):
                    outputs = net(images)
                loss = criterion(outputs, masks)
                # every rank must stop together, or the others would wait forever in the gradient all-reduce
                if check_each_step and distributed.all_reduce_sum((~torch.isfinite(loss.detach())).float(), ctx) > 0:
                    raise TrainingDiverged(diverged_message(f"training loss became {float(loss.detach())} at {where}",
                                                            saved, out, args))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # with fp16, a step whose gradients overflowed is skipped here
                scaler.update()
                scheduler.step()
                finite = torch.isfinite(loss.detach())  # stays on the device: no sync per step
                running += torch.where(finite, loss.detach(), 0.0) * len(images)
                seen += finite * len(images)
                bad += ~finite
            where = f"epoch {epoch + 1}/{args.epochs} (validation)"
            # one sync per epoch: fp16 may skip a few overflowing steps, any other non-finite loss is fatal
            for t in (running, seen, bad):
                distributed.all_reduce_sum(t, ctx)
            n_bad, train_loss = int(bad), float(running) / max(float(seen), 1.0)
            if n_bad and (not scaler.is_enabled() or n_bad == steps):
                raise TrainingDiverged(diverged_message(
                    f"training loss was not finite in {n_bad} of {steps} steps of epoch {epoch + 1}/{args.epochs}",
                    saved, out, args))
            if not weights_finite(model):
                raise TrainingDiverged(diverged_message(
                    f"the weights stopped being finite in epoch {epoch + 1}/{args.epochs}", saved, out, args))
            val = validate(net, val_loader, criterion, args.task, device, dtype, fmt=fmt, ctx=ctx)
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"], "val_dice": val["dice"],
                   "val_iou": val["iou"], **{f"val_{k}": v for k, v in val.items() if k.endswith("_dice")},
                   "val_score": val["score"],
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
            history.append(row)
            log(f"Epoch {epoch + 1}/{args.epochs}\ntrain_loss: {train_loss:.4f} | val_loss: {val['loss']:.4f} | "
                  f"val_dice: {val['dice']:.4f} | val_iou: {val['iou']:.4f}  ({row['seconds']:.0f}s)", flush=True)
            improved = is_better(val["score"], val["loss"], best, best_loss)  # validate(): Dice, else -loss
            if improved:
                best, best_loss = val["score"], val["loss"]
            ckpt = {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                    "rng": rng_states(gen), "metrics": {k: float(v) for k, v in val.items()}, "best_score": best,
                    "best_loss": best_loss, "history": history}
            where = f"epoch {epoch + 1}/{args.epochs} (saving)"
            if ctx.is_main:
                # best before last: a crash between the two redoes this epoch on resume, which rewrites both
                if improved:
                    save_checkpoint(ckpt, out / "best_model.pth")
                    best_saved = True
                save_checkpoint(ckpt, out / "last.pth")
            saved = (out / "last.pth", epoch + 1)
            if ctx.is_main:
                write_csv(history, out / "history.csv")
                plot_curves(history, out / "curves.png")
            where = f"after epoch {epoch + 1}/{args.epochs}"
    except KeyboardInterrupt:
        # the unfinished epoch is dropped: resuming redoes it from its start, exactly as an unbroken run would
        if saved is None:
            raise TrainingInterrupted(f"interrupted at {where}; no epoch had finished, nothing was saved") from None
        raise TrainingInterrupted(f"interrupted at {where}; {saved[0]} holds epoch {saved[1]}: resume with "
                                  f"--resume {saved[0]}") from None
    distributed.barrier(ctx)
    distributed.cleanup(ctx)
    best_row = best_epoch(history)
    best_dice = best_row["val_dice"] if best_row else float("nan")
    log(f"best val Dice {best_dice:.4f} (epoch {best_row['epoch'] if best_row else '-'}); "
        + where_saved(out, best_row, args.resume, best_saved))
    return {"best_dice": best_dice, "history": history,
            "val_pairs": getattr(val_set, "pairs", None)}  # pair folders: the files validation scored


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
