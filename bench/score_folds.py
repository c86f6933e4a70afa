"""Score fold runs of `train.py --folds K --fold I` the way the cross-validation scores its folds.

    python bench/score_folds.py runs/p17/fixmatch/fold0/last.pth runs/p17/fixmatch/fold1/last.pth [--json] [--out DIR]

Each checkpoint's own arguments (--data, --folds, --fold, --seed, --task, --size) give back the fold's
validation pairs; the model is scored on them at their own resolution as engine.cross_validation does
(mean per-image Dice and IoU at 0.5, Inf-Net's threshold-averaged Dice; flip TTA as the checkpoint
records). Probes that train single folds side by side are compared with this and with cv.json's folds.
--out DIR keeps evaluate.py's files of each fold in DIR/fold<i>/ (results.json, per_image.csv with each
slice's Dice, precision and recall, cases.png): where a recipe's errors are, slice by slice.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.evaluation import evaluate  # noqa: E402
from engine.training import build_datasets  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402

SCORES = ("dice", "dice_threshold_averaged", "iou")


def score_fold(checkpoint: str | Path, device: str = "auto", out: str | Path | None = None) -> dict:
    """The cross-validation's figures of one fold run's checkpoint: {"fold", "n", dice, ..., "epoch"}.
    ``out``: a folder for evaluate.py's files (results.json, per_image.csv, cases.png); by default they are
    dropped."""
    ckpt = load_checkpoint(checkpoint)
    a = ckpt["args"]
    if not a.get("folds") or a.get("fold") is None:
        raise SystemExit(f"{checkpoint}: not a --folds K --fold I run")
    _, val, _, _ = build_datasets(a["data"], a["task"], a["size"], a["val_fraction"], a["seed"], "none", a["folds"],
                                  a["fold"], log=lambda line: None, other_labels=a.get("other_labels", "background"))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # its table is not ours
        res = evaluate(checkpoint, a["data"], out=out or tmp, device=device, progress=False, pairs=val.pairs,
                       split="val")
    per_image = res["structures"]["lesion"]["per_image"]
    return {"checkpoint": str(checkpoint), "fold": a["fold"], "epoch": ckpt["epoch"] + 1, "n": per_image["dice"]["n"],
            **{k: per_image[k]["mean"] for k in SCORES}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="also print every row as one JSON line")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="keep each fold's evaluate.py files (per_image.csv, results.json, cases.png) in DIR/fold<i>/")
    args = p.parse_args()
    for path in args.checkpoints:
        fold = load_checkpoint(path)["args"].get("fold")
        row = score_fold(path, args.device, Path(args.out) / f"fold{fold}" if args.out else None)
        print(f"{path}: fold {row['fold']} (epoch {row['epoch']}, {row['n']} slices): Dice@0.5 {row['dice']:.4f}, "
              f"threshold-averaged {row['dice_threshold_averaged']:.4f}, IoU {row['iou']:.4f}")
        if args.json:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
