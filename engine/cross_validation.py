"""K-fold cross-validation over a folder of image-mask pairs: one training run per fold, each fold's final
model scored by :func:`engine.evaluation.evaluate` on the pairs it did not train on."""
from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from base import exclusive_lock
from data.split_data import write_json
from engine.evaluation import evaluate
from engine.training import LOCK_HOLDER, build_datasets
from utils.metrics import finite_or_none, mean_sd

SCORES = ("dice", "iou", "dice_threshold_averaged")
# Per lesion type (types tasks, results["classes"]): mean per-image Dice over the images that contain the
# type, and Inf-Net's threshold-averaged Dice over all images (those without the type as 0, its protocol)
CLASS_SCORES = {"dice": "n", "dice_threshold_averaged": "n_images"}  # score: the count it is a mean over


def class_fold_scores(classes: dict) -> dict[str, dict[str, float]]:
    """One fold's per-class figures from results["classes"] (utils.metrics.ClassMeter.summary())."""
    out = {}
    for name, c in classes["classes"].items():
        dice, infnet = c["per_image"]["dice"], c["threshold_averaged_dice"] or {}
        out[name] = {"dice": dice["mean"], "n": dice["n"], "dice_threshold_averaged": infnet.get("mean"),
                     "n_images": infnet.get("n", 0)}
    return out


def class_summary(folds: list[dict[str, dict[str, float]]]) -> dict:
    """Per class: every fold's figures, their mean +- sd over folds, and the out-of-fold means (each fold's
    mean weighted by the images it is a mean over, so each image counts once)."""
    summary = {}
    for name in folds[0]:
        rows = [f[name] for f in folds]
        entry = {"folds": {k: [r[k] for r in rows] for k in (*CLASS_SCORES, *CLASS_SCORES.values())},
                 "mean_over_folds": {k: mean_sd(r[k] for r in rows) for k in CLASS_SCORES}, "out_of_fold": {}}
        for key, count in CLASS_SCORES.items():
            pairs = [(r[key], r[count]) for r in rows if r[key] is not None and r[count]]
            total = sum(n for _, n in pairs)
            entry["out_of_fold"][key] = sum(v * n for v, n in pairs) / total if total else float("nan")
        summary[name] = entry
    return summary


def cross_validate(args: argparse.Namespace, train: Callable[[argparse.Namespace], dict],
                   hold: contextlib.ExitStack | None = None) -> dict:
    """K-fold cross-validation: ``train(args)`` once per fold into OUT/fold<i>, each scored on its own
    validation part.

    Each fold's final model (last.pth, not the epoch that scored best on this very validation part, which
    would be a biased pick) is scored on the fold's validation pairs at their own resolution, with flip
    TTA if --tta: mean per-image Dice and IoU at 0.5 and Inf-Net's threshold-averaged Dice. OUT/cv.json
    holds every fold's figures, their mean +- sd over folds, and the out-of-fold means over all images
    (each image scored once, by the model that did not train on it). A types task adds "classes": the
    same per lesion type (:func:`class_summary`).

    Args:
        args: train.py's arguments, with --folds K.
        train: one training run (train.py's ``train``); returns {"best_dice", "val_pairs", ...}.
        hold: when given, OUT is locked against other train.py runs until ``hold`` closes.

    Returns:
        The cv.json summary plus "runs", what ``train`` returned for each fold.
    """
    if hold is not None and int(os.environ.get("RANK", "0")) == 0:
        build_datasets(args.data, args.task, args.size, args.val_fraction, args.seed, "none", args.folds, 0,
                       getattr(args, "look_window", None), getattr(args, "look_crop", None), log=lambda line: None,
                       other_labels=getattr(args, "other_labels", "background"),
                       train_subset=getattr(args, "train_subset", 0))
        Path(args.out).mkdir(parents=True, exist_ok=True)  # only once the data is known to be there
        hold.enter_context(exclusive_lock(args.out, LOCK_HOLDER))
    runs, scores, class_folds = [], {**{k: [] for k in SCORES}, "n": []}, []
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
        for key in SCORES:
            scores[key].append(per_image[key]["mean"])
        scores["n"].append(per_image["dice"]["n"])
        if "classes" in res:  # a types task: also per lesion type
            class_folds.append(class_fold_scores(res["classes"]))
    summary = {"folds": args.folds, "seed": args.seed, "tta": args.tta,
               **({"train_subset": args.train_subset} if getattr(args, "train_subset", 0) else {}),
               "best_val_dice": [r["best_dice"] for r in runs], "last_epoch": scores}
    if scores["n"]:
        n = np.array(scores["n"], dtype=np.float64)
        summary["mean_over_folds"] = {k: mean_sd(scores[k]) for k in SCORES}
        summary["out_of_fold"] = {k: float(np.nansum(np.array(scores[k]) * n) / n.sum()) for k in SCORES}
        if class_folds:
            summary["classes"] = class_summary(class_folds)
        summary = finite_or_none(summary)  # a fold without lesion has no Dice: null, not NaN, in the JSON
        write_json(Path(args.out) / "cv.json", summary)
        m = summary["mean_over_folds"]
        print(f"{args.folds}-fold cross-validation, final models{' with flip TTA' if args.tta else ''}, mean per-image "
              f"over folds: Dice {m['dice']['mean']:.4f} ± {m['dice']['sd'] or 0:.4f}, threshold-averaged Dice "
              f"{m['dice_threshold_averaged']['mean']:.4f} ± {m['dice_threshold_averaged']['sd'] or 0:.4f} (folds: "
              f"{', '.join(f'{d:.4f}' for d in scores['dice'])}); {args.out}/cv.json, models {args.out}/fold*/last.pth")
        for name, c in summary.get("classes", {}).items():
            m = c["mean_over_folds"]
            print(f"  {name}: per-image Dice over the slices with it {_fmt(m['dice'])}, "
                  f"Inf-Net threshold-averaged Dice {_fmt(m['dice_threshold_averaged'])} (mean ± sd over folds)")
    return {**summary, "runs": runs}


def _fmt(m: dict) -> str:
    return "-" if m["mean"] is None else f"{m['mean']:.4f} ± {m['sd'] or 0:.4f}"
