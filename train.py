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
once (the unfinished epoch is dropped), or at the next step when Python swallowed it, and says how to resume; a NaN or infinite loss stops training
before those weights are saved. See docs/RELIABILITY.md.

--folds K trains one model per fold of a pair folder and scores each on its held-out part (OUT/cv.json);
--fold-jobs N trains N of them at once, each in a process of its own (engine.cross_validation). An interrupted
cross-validation continues with `--resume OUT`: finished folds are kept, the others resume or start.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import os
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

# ---- Edit these, then run `python train.py` (each can also be set by the flag named beside it) ----
DATA = "data/processed"  # --data: preprocessed folder, or a folder of image-mask pairs
MODEL = "unet"           # --model: unet | deeplabv3
LOSS = None              # --loss: bce | dice | bce_dice | ce | ce_dice (None: bce_dice for unet on 2 classes, else ce_dice)
EPOCHS = 50              # --epochs
BATCH_SIZE = 8           # --batch-size
LR = 1e-3                # --lr (Adam, with warm-up and cosine decay; see --opt, --sched)
OUT = "checkpoints"      # --out: best_model.pth, last.pth, history.csv, curves.png
# ----------------------------------------------------------------------------------------------------

from base import InputError, exclusive_lock  # noqa: E402
from data.augment import AUGMENT_LEVELS, BatchAugment, SpatialAugment  # noqa: E402
from data.dataset import DeviceLoader, UnlabeledDataset, labelled_files  # noqa: E402
from data.labels import OTHER_LABELS, TASK_CLASSES, TASKS, TYPE_TASKS  # noqa: E402
from data.look import CROPS  # noqa: E402
from engine.cross_validation import cross_validate  # noqa: E402
from engine.semi import SEMI_METHODS, SemiSupervised  # noqa: E402
from engine.training import (LOCK_HOLDER, OUTPUTS, Hooks, Progress, RunState, best_epoch, build_datasets,  # noqa: E402
                             checkpoint, class_weights, data_on_device, data_record, default_loss, divergence_advice,
                             history_row, is_better, loader_workers, make_scheduler, resume, save, train_one_epoch,
                             where_saved)
from models import MODEL_NAMES, build_model, load_pretrained, model_from_checkpoint, model_options  # noqa: E402
from utils import distributed  # noqa: E402
from utils.checkpoint import remove_stale_temp_files, safe_load  # noqa: E402
from utils.cli import add_runtime_args, ctrl_c_held  # noqa: E402
from utils.helpers import amp_dtype, precision_words, resolve_device, seed_everything  # noqa: E402
from utils.losses import LOSSES, WEIGHTED  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA, help="preprocessed folder or folder of image-mask pairs")
    p.add_argument("--model", default=MODEL, choices=MODEL_NAMES)
    p.add_argument("--loss", default=LOSS, choices=sorted(LOSSES), help="default: bce_dice (unet, 2-class tasks), else ce_dice")
    p.add_argument("--task", default="lesion", choices=TASKS,
                   help="what to segment: " + "; ".join(f"{t} ({TASK_CLASSES[t]} classes)" for t in TASKS)
                        + f". {' and '.join(TYPE_TASKS)} tell ground-glass opacity and consolidation apart "
                          "(pair folders: label or palette masks 0/1/2, COVID-SemiSeg's MultiClassInfection-Train)")
    p.add_argument("--other-labels", default="background", choices=OTHER_LABELS,
                   help="types tasks: a lesion label that is neither type (MedSeg's 3, pleural effusion) becomes "
                        "background, or is ignored by the loss and validation")
    p.add_argument("--class-weights", default="none", choices=("none", "auto"),
                   help="auto: cross-entropy weights 1/sqrt(class frequency) from the training targets "
                        "(ce/ce_dice; for rare classes such as consolidation)")
    p.add_argument("--unlabeled", default=None, metavar="DIR",
                   help="semi-supervised training: also learn from the slices without masks in DIR (image files, "
                        "searched recursively, moved into the labelled slices' look; or a data.preprocess folder)")
    p.add_argument("--semi", default="mean-teacher", choices=SEMI_METHODS,
                   help="with --unlabeled: the student matches the EMA teacher's probabilities (mean-teacher) or "
                        "its confident labels (fixmatch) on strongly augmented unlabelled slices")
    p.add_argument("--unlabeled-weight", type=float, default=1.0, help="with --unlabeled: the unlabelled loss's weight")
    p.add_argument("--unlabeled-batch-size", type=int, default=None,
                   help="with --unlabeled: unlabelled slices per step (default: --batch-size)")
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="with --unlabeled: the teacher's EMA decay per step (0: the student is its own teacher)")
    p.add_argument("--teacher", default=None, metavar="CKPT",
                   help="with --unlabeled: self-training from this fixed teacher (a checkpoint of the same task and "
                        "preprocessing, e.g. the supervised recipe's fold model; '{fold}' in the path becomes the fold "
                        "number) instead of the student's EMA; the student is then what is scored and saved")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="with --unlabeled --semi fixmatch: the teacher's probability a pseudo-label needs")
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
    p.add_argument("--backbone-weights", default=None,
                   help="pretrained weights to start from: pretrain.py's encoder.pth (U-Net or DeepLabV3), or "
                        "a ResNet-50 state dict for DeepLabV3")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from the weights of this train.py checkpoint (same model and task; fine-tuning); "
                        "'{fold}' is replaced by --fold")
    p.add_argument("--size", type=int, default=256, help="input side for image-mask pair folders")
    p.add_argument("--look-window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="image-mask pair folders: the HU window their 8-bit images were shown in (default: "
                        "estimated from their lung and soft-tissue gray levels); volume inference shows CT so")
    p.add_argument("--look-crop", default=None, choices=CROPS,
                   help="image-mask pair folders: what their images are cropped to (default: lungs when their "
                        "border holds no outside air, else none); volume inference crops CT so")
    p.add_argument("--val-fraction", type=float, default=0.15, help="pair folders without a val part: held-out share")
    p.add_argument("--folds", type=int, default=0, help="pair folders: K-fold cross-validation, one run per fold")
    p.add_argument("--fold", type=int, default=None,
                   help="with --folds: run this fold only (0-based), into OUT/fold<I> as the whole run would")
    p.add_argument("--fold-jobs", type=int, default=1, metavar="N",
                   help="with --folds: train N folds at once, each in a process of its own with 1/N of the CPU "
                        "threads and an epoch line instead of progress bars (a 2-core CPU without bf16 trains "
                        "the recipe's folds 1.2x faster two at a time; docs/BENCHMARKS.md)")
    p.add_argument("--train-subset", type=int, default=0, metavar="N",
                   help="pair folders: train on a seeded N of the training pairs, validation unchanged (how a "
                        "recipe does with fewer labelled slices; a smaller N's slices lie inside a larger one's)")
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
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="continue from a checkpoint (e.g. OUT/last.pth); with --folds K (every fold), the "
                        "cross-validation's folder OUT: each fold continues from OUT/fold<i>/last.pth where it has one")
    return add_runtime_args(p)


def main(args: argparse.Namespace, hooks: Hooks | None = None) -> dict:
    """Train once, or with --folds K (and no --fold) once per fold into OUT/fold<i>, then report the
    cross-validated scores in OUT/cv.json (see :func:`engine.cross_validation.cross_validate`).

    ``hooks`` replaces the loss, optimizer or validation of the run (tests inject faults through it).
    """
    hooks = hooks or Hooks()
    with contextlib.ExitStack() as hold:
        if args.fold_jobs < 1 or (args.fold_jobs > 1 and (not args.folds or args.fold is not None)):
            raise InputError(f"--fold-jobs {args.fold_jobs}: needs a positive number of folds to train at once, "
                             "and more than 1 only with --folds K (not with --fold)")
        if not args.folds or args.fold is not None:
            if args.fold is not None and not 0 <= args.fold < max(args.folds, 1):
                raise InputError(f"--fold {args.fold} needs --folds K with 0 <= fold < K")
            if args.fold is not None and args.folds:  # where the whole cross-validation puts this fold
                args = argparse.Namespace(**{**vars(args), "out": str(Path(args.out) / f"fold{args.fold}")})
            return train(args, hold, hooks)
        if args.fold_jobs > 1:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise InputError("--fold-jobs trains folds in processes of its own; under torchrun give --fold-jobs 1")
            args = argparse.Namespace(**{**vars(args), "progress": False})  # the folds' bars would interleave
        return cross_validate(args, functools.partial(train, hooks=hooks), hold)


def make_loaders(args: argparse.Namespace, train_set, val_set, ctx: distributed.Context, device: torch.device):
    """The training and validation loaders and the training sampler, with the data on the device or not.

    Returns (train_loader, val_loader, sampler, generator of the loader's workers, data on the device).
    """
    workers = loader_workers(args.workers, device)
    gen = torch.Generator()
    # The sampler's shuffle depends on (seed, epoch) only; under torchrun each rank takes every world_size-th
    # index of the same permutation, so N processes with batch B see the global batches of one with N*B.
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    drop_last = len(sampler) > args.batch_size
    # validation: each rank scores a disjoint share, no padding, and validate() sums the counts
    val_rows = range(ctx.rank, len(val_set), ctx.world_size)
    on_device = data_on_device(args.data_on_device, device, train_set, val_set)
    show = args.progress and ctx.is_main
    if on_device:  # both sets on the device once; flips, turns and jitter per batch there (BatchAugment)
        train_set.augment = None
        train_loader = DeviceLoader(train_set, args.batch_size, sampler, device, drop_last, workers, progress=show)
        val_loader = DeviceLoader(val_set, args.batch_size, val_rows, device, workers=workers, progress=show)
    else:
        train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=drop_last,
                                  num_workers=workers, generator=gen, pin_memory=device.type == "cuda",
                                  persistent_workers=False)  # workers restarted and reseeded every epoch
        val_loader = DataLoader(Subset(val_set, val_rows), args.batch_size, num_workers=workers,
                                pin_memory=device.type == "cuda")
    return train_loader, val_loader, sampler, gen, on_device


def make_unlabeled(args: argparse.Namespace, train_set, val_set, prep: dict, ctx: distributed.Context,
                   device: torch.device, on_device: bool, log=print):
    """--unlabeled's dataset, its loader and sampler (or Nones without it).

    The labelled files (pairs' images and masks; the volumes of preprocessed data) are never read as
    unlabelled, so validation stays unseen whatever folder is given. Under torchrun each rank draws its own
    share.

    Returns (dataset, loader, sampler).
    """
    if not args.unlabeled:
        return None, None, None
    if Path(args.unlabeled).resolve() == Path(args.data).resolve():
        raise InputError(f"--unlabeled {args.unlabeled} is --data itself; give a folder of slices without masks")
    dataset = UnlabeledDataset(args.unlabeled, prep, exclude=labelled_files(train_set, val_set), log=log)
    batch = args.unlabeled_batch_size or args.batch_size
    if batch < 1 or len(dataset) < batch * ctx.world_size:
        raise InputError(f"--unlabeled {args.unlabeled}: {len(dataset)} slices, fewer than one batch of {batch}"
                         + (f" per process ({ctx.world_size})" if ctx.enabled else ""))
    sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed + 1)
    if on_device:
        loader = DeviceLoader(dataset, batch, sampler, device, drop_last=True, progress=args.progress and ctx.is_main)
    else:
        workers = loader_workers(args.workers, device)
        # a generator of its own: starting the loader must not draw from the global RNG (augmentation)
        loader = DataLoader(dataset, batch, sampler=sampler, drop_last=True, num_workers=workers,
                            generator=torch.Generator(), pin_memory=device.type == "cuda")
    return dataset, loader, sampler


def unlabeled_batches(loader, sampler, epoch: int):
    """Unlabelled batches for one epoch, endlessly: the sampler's order for (seed, epoch), then further
    orders if the epoch needs more (so they depend on the epoch only, and a resumed run draws the same)."""
    for again in itertools.count():
        sampler.set_epoch(epoch * 1009 + again)
        yield from loader


def fold_path(args: argparse.Namespace, flag: str) -> Path | None:
    """The file of --teacher or --init (``flag``) for this run ('{fold}' replaced by --fold), or None."""
    value = getattr(args, flag)
    if not value:
        return None
    if "{fold}" in value and args.fold is None:
        raise InputError(f"--{flag} {value}: '{{fold}}' names each fold's file; this run is no fold of --folds K")
    return Path(value.replace("{fold}", str(args.fold)))


def file_record(path: Path | None) -> dict | None:
    """A file a run depends on, as its checkpoints record it: its path and the start of its sha256."""
    if path is None:
        return None
    return {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def load_teacher(args: argparse.Namespace, prep: dict, channels: int, device: torch.device, fmt):
    """--teacher's model on ``device``, after checking that it fits the run: the same task, output channels
    and preprocessing (look included), so its maps are targets the student can learn. None without it."""
    path = fold_path(args, "teacher")
    if path is None:
        return None
    if not args.unlabeled:
        raise InputError("--teacher is for self-training: give --unlabeled DIR too")
    ckpt = safe_load(path, "teacher checkpoint")
    if ckpt.get("task") != args.task or ckpt.get("num_classes") != channels:
        raise InputError(f"{path}: a teacher for task {ckpt.get('task')!r} with {ckpt.get('num_classes')} output "
                         f"channel(s); this run trains {args.task!r} with {channels} "
                         f"(pass the teacher's --task/--loss)")
    if ckpt.get("preprocessing") != prep:
        raise InputError(f"{path}: the teacher saw its slices as {ckpt.get('preprocessing')}, this run as {prep}; "
                         f"use a teacher trained on the same data and --size")
    return model_from_checkpoint(ckpt, path).to(device, memory_format=fmt)


def make_semi(args: argparse.Namespace, model, steps: int, train_set, val_set, prep: dict, channels: int,
              ctx: distributed.Context, device: torch.device, on_device: bool, fmt, log=print):
    """--unlabeled's semi-supervised training for ``model``, ``steps`` optimizer steps per epoch.

    Returns (SemiSupervised, epoch -> that epoch's unlabelled batches, the checkpoint's record), or three
    Nones for a supervised run."""
    unlabeled, loader, sampler = make_unlabeled(args, train_set, val_set, prep, ctx, device, on_device, log)
    teacher = load_teacher(args, prep, channels, device, fmt)
    if unlabeled is None:
        return None, None, None
    semi = SemiSupervised(model, args.semi, args.unlabeled_weight, args.epochs * steps, args.ema_decay,
                          args.confidence, teacher)
    log(f"semi-supervised ({args.semi}) with {len(unlabeled)} unlabelled slices, {loader.batch_size} per step; "
        f"teacher: {fold_path(args, 'teacher') if teacher else f'the EMA of the student (decay {args.ema_decay:g})'}")
    return semi, (lambda epoch: unlabeled_batches(loader, sampler, epoch)), semi_record(args, unlabeled)


def semi_record(args: argparse.Namespace, dataset) -> dict | None:
    """What a semi-supervised run's checkpoints say about it (None for a supervised run)."""
    if dataset is None:
        return None
    names = sorted(dataset.case_of(i) for i in range(len(dataset)))
    teacher = fold_path(args, "teacher")
    return {"method": args.semi, "weight": args.unlabeled_weight, "ema_decay": args.ema_decay,
            "confidence": args.confidence, "batch_size": args.unlabeled_batch_size or args.batch_size,
            "unlabeled": {"path": str(Path(args.unlabeled).resolve()), "count": len(names),
                          "items": hashlib.sha256(repr(names).encode()).hexdigest()[:16]},
            **({"teacher": file_record(teacher)} if teacher else {})}


def make_criterion(args: argparse.Namespace, hooks: Hooks, loss_name: str, train_set, log=print):
    """The run's criterion and the output channels it needs (``hooks.loss``), with --class-weights auto's
    cross-entropy weights from ``train_set``'s class frequencies.

    Returns (criterion, channels, class weights or None)."""
    weights = None
    if args.class_weights == "auto":
        if loss_name not in WEIGHTED:  # before reading every training mask
            raise InputError(f"--class-weights auto weighs the cross-entropy: use --loss {', '.join(WEIGHTED)}, "
                             f"not {loss_name}")
        weights = class_weights(train_set, TASK_CLASSES[args.task])
        log(f"class weights {', '.join(f'{w:.3g}' for w in weights)} (background first)")
    # hooks injected by tests take (name, task, batch_dice=) only: weights are passed when there are some
    criterion, channels = hooks.loss(loss_name, args.task, batch_dice=args.batch_dice,
                                     **({"class_weights": weights} if weights is not None else {}))
    return criterion, channels, weights


def make_model(args: argparse.Namespace, in_channels: int, channels: int, ctx: distributed.Context,
               device: torch.device, fmt):
    """The model of --model with its options (``in_channels`` from the data, ``channels`` outputs from the loss),
    --init's or --backbone-weights' weights loaded, on ``device`` in layout ``fmt``."""
    model = build_model(args.model, in_channels=in_channels, num_classes=channels, **model_options(args.model, **vars(args)))
    init = fold_path(args, "init")
    if init is not None:
        if args.backbone_weights:
            raise InputError("--init and --backbone-weights both give starting weights: pass one")
        ckpt = safe_load(init, "--init checkpoint")
        wanted = {"name": args.model, **model.config}
        if ckpt.get("model_config") != wanted or ckpt.get("task") != args.task:
            raise InputError(f"{init}: holds {ckpt.get('model_config')} for task {ckpt.get('task')!r}; this run "
                             f"trains {wanted} for task {args.task!r} (pass its --model/--width/--loss/--task)")
        model.load_state_dict(model_from_checkpoint(ckpt, init).state_dict())
    if args.backbone_weights:
        state = safe_load(args.backbone_weights, "backbone weights file")
        try:
            load_pretrained(model, state)
        except (TypeError, ValueError) as e:
            raise InputError(f"{args.backbone_weights}: {e}") from None
    if ctx.enabled and device.type == "cuda" and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all GPUs
    return model.to(device, memory_format=fmt)


def run_record(args: argparse.Namespace, model, channels: int, loss_name: str, prep: dict, data: dict,
               on_device: bool, labels, weights: list[float] | None = None, semi: dict | None = None) -> dict:
    """What every checkpoint of the run says about it (model, task, loss, preprocessing, data, label map,
    arguments), so infer.py and evaluate.py rebuild the model and its input pipeline from it alone.

    ``other_labels`` (types tasks; None for the others) says what the lesion labels that are no type
    became in training; ``class_weights`` the cross-entropy weights of --class-weights auto (or None);
    ``semi`` the semi-supervised method and its unlabelled data (:func:`semi_record`; None: supervised)."""
    types = args.task in TYPE_TASKS
    state = {"model_config": {"name": args.model, **model.config}, "num_classes": channels, "task": args.task,
             "loss": loss_name, "preprocessing": prep, "data": data, "labels": labels,
             "other_labels": args.other_labels if types else None,
             "class_weights": weights, "semi": semi, "init": file_record(fold_path(args, "init")),
             "pretrained": file_record(Path(args.backbone_weights) if args.backbone_weights else None),
             "inference": {"tta": args.tta},
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}}
    state["args"]["data_on_device"] = on_device  # what the default chose, not None
    return state


def claim_out(out: Path, hold: contextlib.ExitStack | None) -> Path:
    """Create OUT, lock it until ``hold`` closes (when given), and remove what a killed run left half-written."""
    out.mkdir(parents=True, exist_ok=True)
    if hold is not None:
        hold.enter_context(exclusive_lock(out, LOCK_HOLDER))
    remove_stale_temp_files(out, OUTPUTS)  # left by a run that was killed while writing
    return out


def describe_run(args: argparse.Namespace, model, channels: int, loss_name: str, device: torch.device, dtype,
                 ctx: distributed.Context, n_train: int, n_val: int, on_device: bool) -> str:
    """The line a run starts with: model, loss, device, precision, data and parallelism."""
    n_params = sum(p.numel() for p in model.parameters())
    return (f"{args.model} ({n_params / 1e6:.2f}M parameters, {channels} output channel(s), loss {loss_name}) on "
            f"{device}{precision_words(device, dtype)}: "
            f"{n_train} train / {n_val} val slices"
            + (f"; {ctx.world_size} processes, global batch {ctx.world_size * args.batch_size}" if ctx.enabled else "")
            + (f"; data held on {device}" if on_device else "") + ("; torch.compile" if args.compile else "")
            + (f"; starting from the weights of {fold_path(args, 'init')}" if args.init else "")
            + (f"; starting from the pretrained weights of {args.backbone_weights}" if args.backbone_weights else ""))


def train(args: argparse.Namespace, hold: contextlib.ExitStack | None = None, hooks: Hooks | None = None) -> dict:
    """One training run (see the module docstring); returns {"best_dice", "history", "val_pairs"}.

    With ``hold``, rank 0 locks OUT (OUT/.lock) once the data is read, until ``hold`` closes: a second
    train.py run into the same OUT is refused instead of overwriting this one's checkpoints.
    """
    hooks = hooks or Hooks()
    seed_everything(args.seed, args.deterministic)
    ctx, device = distributed.setup(resolve_device(args.device))
    log = print if ctx.is_main else (lambda *a, **k: None)  # only rank 0 talks and writes
    dtype = amp_dtype(device, args.amp)
    loss_name = args.loss or default_loss(args.model, args.task)
    train_set, val_set, prep, data_kind = build_datasets(args.data, args.task, args.size, args.val_fraction,
                                                         args.seed, args.augment, args.folds, args.fold or 0,
                                                         args.look_window, args.look_crop, log, args.other_labels,
                                                         args.train_subset)
    criterion, channels, weights = make_criterion(args, hooks, loss_name, train_set, log)
    train_loader, val_loader, sampler, gen, on_device = make_loaders(args, train_set, val_set, ctx, device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = make_model(args, train_set.channels, channels, ctx, device, fmt)
    optimizer = hooks.optimizer(args.opt, model.parameters(), args.lr, args.weight_decay)
    # augmentation done per batch on the training device: flips, turns and jitter when the data sits there
    # (otherwise the loader's workers do them per item), and the warp of --augment strong
    augments = ([BatchAugment()] if on_device and args.augment != "none" else []) + \
               ([SpatialAugment()] if args.augment == "strong" else [])
    steps = len(train_loader)
    scheduler = make_scheduler(optimizer, args.sched, args.epochs * steps, int(args.warmup_epochs * steps))
    # loss scaling is needed for fp16 only; bf16 has fp32's range
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    semi, unlabeled_batches_of, semi_rec = make_semi(args, model, steps, train_set, val_set, prep, channels, ctx,
                                                     device, on_device, fmt, log)

    out = claim_out(Path(args.out), hold if ctx.is_main else None)
    state = run_record(args, model, channels, loss_name, prep, data_record(args.data, data_kind, train_set, val_set),
                       on_device, getattr(train_set, "labels", None), weights, semi_rec)
    run = RunState()
    if args.resume:
        run = resume(args.resume, state, model, optimizer, scheduler, scaler, gen, semi)
        if run.start_epoch < args.epochs:
            changes = f" ({'; '.join(run.changes)})" if run.changes else ""
            log(f"resumed from {args.resume} at epoch {run.start_epoch + 1}/{args.epochs}{changes}", flush=True)
        elif run.start_epoch == args.epochs:  # e.g. a finished fold of a resumed cross-validation, only scored
            log(f"{args.resume} holds all {args.epochs} epoch{'s' * (args.epochs != 1)}: nothing left to train")
        else:
            log(f"{args.resume} holds {run.start_epoch} epochs, more than --epochs {args.epochs}: nothing left to "
                "train")

    # DDP broadcasts rank 0's weights and averages gradients; `model` stays the unwrapped module that is saved
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if ctx.enabled else model
    if args.compile:
        net = torch.compile(net)  # compiles on the first training and the first validation batch
    log(describe_run(args, model, channels, loss_name, device, dtype, ctx, len(train_set), len(val_set), on_device))
    check_each_step = hooks.check_each_step(device)
    progress = Progress(args.epochs, out, divergence_advice(args.lr, args.amp), epoch=run.start_epoch,
                        saved=(args.resume, run.start_epoch) if args.resume else None)
    try:
        for epoch in range(run.start_epoch, args.epochs):
            # reseeding per epoch makes shuffling and augmentation independent of where a run was resumed:
            # the loader's workers are started anew each epoch and seeded from `gen` (see the DataLoader)
            gen.manual_seed(args.seed * 100003 + epoch)
            torch.manual_seed(args.seed * 100003 + epoch)
            sampler.set_epoch(epoch)
            t0 = time.time()
            train_loss = train_one_epoch(net, model, criterion, optimizer, train_loader, scheduler, scaler, device,
                                         dtype, epoch, progress, fmt, augments, check_each_step, ctx,
                                         show_progress=args.progress and ctx.is_main, semi=semi,
                                         unlabeled=semi and unlabeled_batches_of(epoch))
            # a semi-supervised run is scored (and inferred with) by its teacher, unless that is fixed
            val = hooks.validate(semi.teacher if semi and not semi.fixed else net, val_loader, criterion, args.task,
                                 device, dtype, fmt=fmt, ctx=ctx)
            row = history_row(epoch, train_loss, val, optimizer.param_groups[0]["lr"], time.time() - t0)
            run.history.append(row)
            log(f"Epoch {epoch + 1}/{args.epochs}\ntrain_loss: {train_loss:.4f} | val_loss: {val['loss']:.4f} | "
                f"val_dice: {val['dice']:.4f} | val_iou: {val['iou']:.4f}  ({row['seconds']:.0f}s)", flush=True)
            improved = is_better(val["score"], val["loss"], run.best, run.best_loss)  # validate(): Dice, else -loss
            if improved:
                run.best, run.best_loss = val["score"], val["loss"]
            ckpt = checkpoint(state, model, optimizer, scheduler, scaler, gen, epoch, val, run, semi)
            progress.at(epoch, "saving")
            with ctrl_c_held():  # a Ctrl-C here lets the epoch's files be written; the run stops right after
                save(out, ckpt, improved, progress, ctx.is_main)
            run.best_saved = run.best_saved or (improved and ctx.is_main)
            progress.at(epoch, "done")
    except KeyboardInterrupt:
        raise progress.interrupted() from None
    distributed.barrier(ctx)
    distributed.cleanup(ctx)
    best_row = best_epoch(run.history)
    best_dice = best_row["val_dice"] if best_row else float("nan")
    log(f"best val Dice {best_dice:.4f} (epoch {best_row['epoch'] if best_row else '-'}); "
        + where_saved(out, best_row, args.resume, run.best_saved))
    return {"best_dice": best_dice, "history": run.history,
            "val_pairs": getattr(val_set, "pairs", None)}  # pair folders: the files validation scored


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
