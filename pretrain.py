"""Pretrain a segmentation model on CT slices without masks, for train.py --backbone-weights.

    python pretrain.py --model unet --width 16 --data LABELLED --unlabeled DIR --out runs/pretrained
    python train.py --data LABELLED --width 16 --backbone-weights runs/pretrained/encoder.pth

    python pretrain.py --model deeplabv3 --data LABELLED --unlabeled DIR --out runs/encoder
    python train.py --data LABELLED --model deeplabv3 --backbone-weights runs/encoder/encoder.pth

Labelled CT is scarce, ImageNet weights cannot always be downloaded (and ImageNet is not CT), while slices
without masks fill every hospital archive. This learns from them by restoration (Models Genesis, Zhou et
al. 2019; engine/pretraining.py): each slice is corrupted (local pixel shuffling, a non-linear gray-level
curve, in- or out-painting) and the whole model, with a one-channel sigmoid head, learns to give the
original slice back (mean squared error). Kept for fine-tuning: the U-Net's encoder and decoder (all but
its output convolution, as Models Genesis fine-tunes its U-Net), DeepLabV3's ResNet-50 encoder.

--data is the labelled data the model will be fine-tuned on: the unlabelled slices are prepared as
train.py --unlabeled prepares them for it (its --size; image files moved into its look), and its own
files are never read as unlabelled, so a cross-validation on it keeps every validation slice unseen.
--unlabeled takes a folder of image files (searched recursively, any mode) or a data.preprocess folder.

Writes OUT/encoder.pth (those weights, keyed as in the model's state dict, with a "pretraining" record)
after every epoch, OUT/history.csv (restoration MSE per epoch, beside the corrupted slices' own MSE) and
OUT/restorations.png (four slices: original, corrupted, restored), each through a temporary file and a
rename. A killed or interrupted run leaves the last finished epoch's encoder.pth; a new run starts over.
With --reuse, an OUT/encoder.pth that is a finished pretraining of the same data with the same settings is
kept and nothing is trained (how scripts/covid_semiseg.sh --unlabeled reruns); any other is refused.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

# ---- Edit these, then run `python pretrain.py` (each can also be set by the flag named beside it) ----
DATA = "data/processed"        # --data: the labelled data to fine-tune on (its preprocessing; its files left out)
UNLABELED = None               # --unlabeled: folder of slices without masks
MODEL = "unet"                 # --model: unet | deeplabv3 (train.py's)
WIDTH = 32                     # --width: U-Net base width (train.py's)
EPOCHS = 3                     # --epochs
BATCH_SIZE = 8                 # --batch-size
LR = 1e-3                      # --lr (AdamW, one-cycle)
OUT = "checkpoints/encoder"    # --out: encoder.pth, history.csv, restorations.png
# ------------------------------------------------------------------------------------------------------

from base import InputError, exclusive_lock  # noqa: E402
from data.dataset import UnlabeledDataset, labelled_files  # noqa: E402
from engine.pretraining import RestorationPairs  # noqa: E402
from engine.training import build_datasets, loader_workers, make_scheduler  # noqa: E402
from models import MODEL_NAMES, build_model, model_options, pretrained_state  # noqa: E402
from utils.checkpoint import remove_stale_temp_files, safe_load, save_checkpoint  # noqa: E402
from utils.cli import add_runtime_args, raise_if_interrupted  # noqa: E402
from utils.helpers import (amp_dtype, autocast, precision_words, resolve_device, save_png,  # noqa: E402
                           seed_everything, write_csv)

OUTPUTS = ("encoder.pth", "history.csv", "restorations.png")
SHOWN = 4  # slices in restorations.png


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA, help="the labelled data (preprocessed folder or image-mask pairs)")
    p.add_argument("--unlabeled", default=UNLABELED, metavar="DIR",
                   help="slices without masks: image files (searched recursively) or a data.preprocess folder")
    p.add_argument("--model", default=MODEL, choices=MODEL_NAMES, help="the model train.py will fine-tune")
    p.add_argument("--width", type=int, default=WIDTH, help="U-Net base width (train.py --width's)")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR, help="peak of the one-cycle schedule (AdamW)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--size", type=int, default=256, help="input side for image-mask pair folders (as train.py's)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 4 on CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory layout (faster with bf16 on CPUs and GPUs)")
    p.add_argument("--out", default=OUT)
    p.add_argument("--overwrite", action="store_true", help="replace an encoder.pth already in OUT")
    p.add_argument("--reuse", action="store_true",
                   help="keep an OUT/encoder.pth that is a finished pretraining of the same data and settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    return add_runtime_args(p)


def restoration_step(model, images: torch.Tensor, corrupted: torch.Tensor, device: torch.device, dtype,
                     fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE of the restored slices, the restored slices) for a batch; the model in whatever mode it is."""
    images = images.to(device, memory_format=fmt)
    with autocast(device, dtype):
        logits = model(corrupted.to(device, memory_format=fmt))
    restored = torch.sigmoid(logits.float())
    return F.mse_loss(restored, images), restored


def restorations_figure(model, pairs: RestorationPairs, device: torch.device, dtype, fmt) -> np.ndarray:
    """A uint8 image: the first SHOWN items of ``pairs`` in its rows original, corrupted, restored."""
    images, corrupted = (torch.stack(t) for t in zip(*(pairs[i] for i in range(min(SHOWN, len(pairs))))))
    model.eval()
    with torch.no_grad():
        _, restored = restoration_step(model, images, corrupted, device, dtype, fmt)
    model.train()
    rows = [torch.cat(list(t[:, 0].float().cpu()), dim=1) for t in (images, corrupted, restored)]
    return (torch.cat(rows, dim=0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def main(args: argparse.Namespace) -> list[dict]:
    """Pretrain (see the module docstring); returns the history, one row per epoch."""
    if not args.unlabeled:
        raise InputError("--unlabeled DIR is needed: the folder of slices without masks to pretrain on")
    if Path(args.unlabeled).resolve() == Path(args.data).resolve():
        raise InputError(f"--unlabeled {args.unlabeled} is --data itself; give a folder of slices without masks")
    if args.epochs < 1 or args.batch_size < 2:
        raise InputError("--epochs must be >= 1 and --batch-size >= 2 (DeepLabV3's batch norm after pooling)")
    seed_everything(args.seed, args.deterministic)
    device = resolve_device(args.device)
    dtype = amp_dtype(device, args.amp)
    train_set, val_set, prep, _ = build_datasets(args.data, "lesion", args.size, 0.15, args.seed, "none")
    dataset = UnlabeledDataset(args.unlabeled, prep, exclude=labelled_files(train_set, val_set))
    if len(dataset) < args.batch_size:
        raise InputError(f"--unlabeled {args.unlabeled}: {len(dataset)} slices, fewer than one batch of "
                         f"{args.batch_size}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "another pretrain.py run"):
        remove_stale_temp_files(out, OUTPUTS)
        path, why = out / "encoder.pth", None
        if path.exists() and args.reuse:
            ckpt = safe_load(path, "pretrained weights")
            why = unlike(ckpt, args, len(dataset), prep)
            if why is None:
                record = ckpt["pretraining"]
                print(f"reusing {path}: {record['epochs']} epochs of pretraining on the same {record['slices']} "
                      "slices with the same settings")
                return record["history"]
        if path.exists() and not args.overwrite:
            raise InputError(f"{path} exists" + (f" and {why}" if why else "")
                             + "; give --overwrite to replace it, or another --out")
        return pretrain(args, dataset, prep, device, dtype, out)


SETTINGS = ("model", "width", "epochs", "batch_size", "lr", "weight_decay", "size", "seed")  # what --reuse matches


def unlike(ckpt: dict, args: argparse.Namespace, slices: int, prep: dict) -> str | None:
    """Why ``ckpt`` (an encoder.pth) is not this run's finished pretraining; None when it is."""
    record = ckpt.get("pretraining") if isinstance(ckpt, dict) else None
    if not isinstance(record, dict) or "args" not in record:
        return "is not a pretrain.py encoder"
    done, asked = record.get("epochs"), record["args"].get("epochs")
    if done != asked:
        return f"holds {done} of its {asked} epochs (a run stopped early)"
    for key in SETTINGS:
        if record["args"].get(key) != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            return f"was pretrained with {flag} {record['args'].get(key)}, not {getattr(args, key)}"
    theirs = {"data": record.get("data"), "unlabeled": record.get("unlabeled"), "unlabelled slices": record.get("slices"),
              "preprocessing": record.get("preprocessing")}
    ours = {"data": str(Path(args.data).resolve()), "unlabeled": str(Path(args.unlabeled).resolve()),
            "unlabelled slices": slices, "preprocessing": prep}
    for key in theirs:
        if theirs[key] != ours[key]:
            return f"was pretrained on other {key} ({theirs[key]}, not {ours[key]})"
    return None


def pretrain(args: argparse.Namespace, dataset, prep: dict, device: torch.device, dtype, out: Path) -> list[dict]:
    """The restoration training on ``dataset`` (slices without masks), writing OUT's files; the history."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(args.model, 1, 1, **model_options(args.model, width=args.width, aux=False))
    out_conv = model.classifier[-1] if args.model == "deeplabv3" else model.head
    torch.nn.init.zeros_(out_conv.bias)  # start at gray 0.5, not at a segmentation head's rare-class prior
    model = model.to(device, memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    pairs, loader_gen = RestorationPairs(dataset, args.seed), torch.Generator()
    workers = loader_workers(args.workers, device)
    loader = DataLoader(pairs, args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        generator=loader_gen, pin_memory=device.type == "cuda")
    scheduler = make_scheduler(optimizer, "onecycle", args.epochs * len(loader), 0)
    name = "DeepLabV3-ResNet50" if args.model == "deeplabv3" else f"U-Net width {args.width}"
    print(f"pretraining {name} by restoration on {len(dataset)} slices without masks, {device}"
          + precision_words(device, dtype)
          + f", {args.epochs} epochs of {len(loader)} steps -> {out / 'encoder.pth'}", flush=True)
    record = {"method": "models-genesis restoration", "model_config": {"name": args.model, **model.config},
              "unlabeled": str(Path(args.unlabeled).resolve()),
              "slices": len(dataset), "data": str(Path(args.data).resolve()), "preprocessing": prep,
              "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}}
    history = []
    model.train()
    for epoch in range(args.epochs):
        loader_gen.manual_seed(args.seed * 100003 + epoch)
        pairs.epoch = epoch
        t0, total, baseline = time.time(), 0.0, 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=None if args.progress else True)
        try:
            for images, corrupted in bar:
                raise_if_interrupted()
                loss, _ = restoration_step(model, images, corrupted, device, dtype, fmt)
                value = loss.item()  # the one host sync of the step
                if not math.isfinite(value):
                    raise FloatingPointError(f"the restoration loss is {value} at epoch {epoch + 1}; "
                                             f"try a lower --lr (now {args.lr:g})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += value
                baseline += F.mse_loss(corrupted, images).item()  # on the loader's CPU tensors
                bar.set_postfix(mse=f"{value:.4f}")
        except KeyboardInterrupt:
            kept = f"{out / 'encoder.pth'} holds epoch {epoch}'s encoder" if epoch else "nothing was saved"
            raise KeyboardInterrupt(f"interrupted in epoch {epoch + 1}; {kept}") from None
        steps = len(loader)
        history.append({"epoch": epoch + 1, "restoration_mse": total / steps, "corrupted_mse": baseline / steps,
                        "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)})
        print(f"epoch {epoch + 1}/{args.epochs}: restoration MSE {total / steps:.4f} (the corrupted slices' "
              f"{baseline / steps:.4f})  ({history[-1]['seconds']:.0f}s)", flush=True)
        save_checkpoint({"model": pretrained_state(model),
                         "pretraining": {**record, "epochs": epoch + 1, "history": history}}, out / "encoder.pth")
        write_csv(history, out / "history.csv")
    save_png(restorations_figure(model, pairs, device, dtype, fmt), out / "restorations.png")
    flags = "--model deeplabv3" if args.model == "deeplabv3" else f"--model unet --width {args.width}"
    print(f"pretrained weights: {out / 'encoder.pth'} (train.py {flags} --backbone-weights {out / 'encoder.pth'}); "
          f"{out / 'restorations.png'} shows original, corrupted and restored slices")
    return history


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
