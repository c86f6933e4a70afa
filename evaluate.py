"""Evaluate a checkpoint: a table of Dice, IoU, precision, recall, specificity, accuracy, F1 and AUC.

    python evaluate.py --checkpoint checkpoints/best_model.pth --data data/processed --split test
    python evaluate.py --checkpoint checkpoints/best_model.pth --data FOLDER_OF_PAIRS
    python evaluate.py --checkpoint CKPT --data data/synthetic --splits data/processed/splits.json --split test
        (NIfTI volumes with masks: per-patient 3D Dice of lesion and lung, infection-percentage error)

--split names the part scored (default test); a folder of pairs without parts (Imgs/ + GT/, images/ +
masks/), or volumes without --splits, are scored whole, as "all". A requested part that is not there is
an error, never another part. The split scored is recorded in results.json and names the output folder.
Ground-truth volumes are read with preprocessing's own checks (data.transforms.read_mask_volume).

Writes OUT/results.json, OUT/per_image.csv and OUT/cases.png (CT / ground truth / prediction for the best
and worst slices). Pooled figures come from TP/FP/FN/TN summed over the whole set. Per-image and
per-patient figures are mean +- sd over the images (patients) where the metric is defined: Dice and IoU
are undefined when the ground truth is empty, so lesion-free slices are reported on their own (how many
got a false-positive pixel), never counted as 0 or 1. Image-mask pairs are scored at each mask's own
resolution (the prediction is resized back), preprocessed arrays at the preprocessed size.

A checkpoint of a lesion-types task (--task lesion-types or lung+lesion-types: ground-glass opacity and
consolidation) is also scored as one label map per slice (lesion where the union's probability is above
--threshold, each lesion pixel its likelier type), per type: pooled, per image and per patient Dice/IoU,
slices without the type apart with their false positives, Inf-Net's threshold-averaged Dice over each
type's probability map (slices without the type as 0, its protocol), and how much of each type is called
the other: the "classes" block of results.json and a table. Pair folders then need label masks (palette or
0/1/2 PNGs, e.g. COVID-SemiSeg's MultiClassInfection-Train/GT); volumes add per-type 3D Dice and mL.
Pixels the checkpoint was trained to ignore (--other-labels ignore) are no hit and no miss of any class
(they count as true negatives only).
"""
from __future__ import annotations

import argparse

from engine.batch import LUNG_SOURCES
from engine.evaluation import evaluate, evaluate_volumes, is_volume_folder
from utils.cli import add_runtime_args


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/best_model.pth")
    p.add_argument("--data", default="data/processed", help="preprocessed folder or folder of image-mask pairs")
    p.add_argument("--split", default=None,
                   help="part to score: of splits.json (default test), of a pair folder with parts (default test); "
                        "'all' for a pair folder without parts (Imgs/ + GT/, images/ + masks/, the default there)")
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT_DIR/eval-SPLIT, "
                                                "or eval-volumes[-SPLIT])")
    p.add_argument("--splits", default=None, help="volumes only: splits.json whose --split cases to score")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="slices: flip test-time augmentation (default: as the checkpoint was trained to use)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lungs", choices=LUNG_SOURCES, default="auto",
                   help="volumes: predicted lungs from the model's lung head (auto, when it has one; model) or "
                        "from HU (hu; auto without a lung head), scored against the lung masks")
    return add_runtime_args(p)


def main(args: argparse.Namespace) -> dict:
    if is_volume_folder(args.data):
        return evaluate_volumes(args.checkpoint, args.data, args.out, args.threshold, args.device, args.amp,
                                args.batch_size, args.splits, args.split, args.progress, args.lungs)
    return evaluate(args.checkpoint, args.data, args.split, args.out, args.threshold, args.device, args.amp,
                    args.batch_size, progress=args.progress, tta=args.tta)


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
