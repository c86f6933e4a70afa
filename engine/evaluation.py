"""Evaluation: score a checkpoint on slices, image-mask pairs or whole NIfTI volumes.

Pooled figures come from TP/FP/FN/TN summed over the whole set; per-image and per-patient figures are
mean +- sd over the images (patients) where the metric is defined (see utils.metrics). evaluate.py is the
command line over :func:`evaluate` and :func:`evaluate_volumes`; cross-validation calls :func:`evaluate`.
A types task (data.labels.TYPE_TASKS) is also scored per lesion type, on one label map of the types
(:func:`type_prediction`), by utils.metrics.ClassMeter: results["classes"].
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.dataset import PairFolderDataset, SliceArrayDataset, find_pair_dirs, pair_files
from data.labels import (IGNORE_INDEX, LESION_LABEL_NAMES, TASK_CLASS_INDICES, TYPE_TASKS,
                         class_targets, structure_slug, task_masks, type_mask, type_values)
from data.readers import find_cases, read_case, reader_for
from data.transforms import InputError, image_files_note, is_nifti, resize_images
from engine.batch import lung_source
from engine.predict import Predictor, inference_model, lesion_types, main_structure, predict, type_prediction
from models import model_from_checkpoint
from utils.checkpoint import load_checkpoint
from base import atomic_write
from utils.helpers import amp_dtype, plot_cases, resolve_device, write_csv
from utils.metrics import (METRICS, ClassMeter, SegmentationMeter, finite_or_none, mean_sd,
                           threshold_averaged_dice)
from utils.lungs import extract_lungs
from utils.volumes import dice_3d, volume_report

# Scores of the probability map itself, as the Inf-Net paper reports them (Fan et al., IEEE TMI 2020)
MAP_METRICS = ("dice_threshold_averaged", "mae")


def _map_scores(prob: torch.Tensor, target: torch.Tensor) -> dict:
    """Inf-Net's threshold-averaged Dice (nan on an empty ground truth, like Dice) and the mean absolute
    error between probability map and ground truth, for one image (H, W)."""
    truth = target.float().cpu()
    return {"dice_threshold_averaged": threshold_averaged_dice(prob.cpu(), truth) if truth.any() else float("nan"),
            "mae": float((prob.float().cpu() - truth).abs().mean())}


# ----------------------------------------------------------------------------- lesion types
# A types task (data.labels.TYPE_TASKS) is also scored as one label map of its lesion types, value i + 1 for
# the i-th type of TASK_OUTPUTS (the values of data.labels.type_mask): per class, and their confusion.

def type_target(target: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The lesion-type label map of a types task's class-index target, and where it is to be ignored.

    Shape: target (N, H, W) integer -> (int64 (N, H, W) in 0..len(types), bool (N, H, W)).
    """
    labels = torch.zeros(target.shape, dtype=torch.int64)
    target = target.cpu()
    for name, value in lesion_types(task).items():
        labels[torch.isin(target, torch.tensor(TASK_CLASS_INDICES[task][name]))] = value
    return labels, target == IGNORE_INDEX


def _count_types(meter: ClassMeter, probs: dict[str, torch.Tensor], truth: torch.Tensor, ignore: torch.Tensor,
                 task: str, threshold: float, groups: list[str] | None, maps: bool = True) -> torch.Tensor:
    """Add a batch to a types task's ClassMeter; returns the predicted type label map.

    Ignored pixels (IGNORE_INDEX) count as background both in truth and prediction, so they change no
    class's TP, FP or FN (only its TN), and score 0 in the probability maps. ``maps``: also the Inf-Net
    threshold-averaged Dice of each class's probability map.

    Shape: probs {name: (N, H, W)}, truth (type_target) and ignore (N, H, W) -> int64 (N, H, W).
    """
    pred = type_prediction(probs, task, threshold).masked_fill_(ignore, 0)
    scored = {name: probs[name].float().cpu().masked_fill(ignore, 0) for name in meter.classes} if maps else None
    meter.update(pred, truth.masked_fill(ignore, 0), scored, groups)
    return pred


def format_class_table(summary: dict) -> str:
    """The console table of a types task's per-class results (ClassMeter.summary()) and their confusion."""
    lines = [f"{'lesion type':<24}{'pooled Dice':>12}{'per image Dice (mean ± sd, n)':>32}"
             f"{'per patient Dice':>28}{'Inf-Net Dice':>14}   without it: n (with a false positive)"]
    def fmt(m: dict | None) -> str:
        return "-" if not m or m["mean"] is None else f"{m['mean']:.4f} ± {m['sd'] or 0:.4f} (n={m['n']})"
    for name, c in summary["classes"].items():
        pooled = c["pooled"]["dice"]
        patient = c["per_patient"]["dice"] if c["per_patient"] else None
        infnet = c["threshold_averaged_dice"]
        infnet = "-" if not infnet or infnet["mean"] is None else f"{infnet['mean']:.4f}"
        pooled = "-" if pooled is None else f"{pooled:.4f}"
        lines.append(f"{name:<24}{pooled:>12}{fmt(c['per_image']['dice']):>32}{fmt(patient):>28}{infnet:>14}   "
                     f"{c['absent']['n']} ({c['absent']['n_with_false_positive']})")
    for truth, row in summary["called_as"].items():
        if truth in summary["classes"]:
            shares = ", ".join(f"{p} {s:.1%}" for p, s in row.items() if s is not None and p != truth)
            lines.append(f"{truth} called: {shares or '-'}")
    lines.append("Inf-Net Dice: threshold-averaged over each class's map, images without the class as 0 (its "
                 "protocol); per-image Dice over the images with the class; the others counted apart")
    return "\n".join(lines)


ALL = "all"  # --split all: every pair of a folder that has no parts (Imgs/ + GT/, images/ + masks/)


def _pair_parts(data: Path) -> list[str]:
    """The parts of a split pair folder: PART_images/ + PART_masks/, or PART/images/ + PART/masks/."""
    parts = {p.name[: -len("_images")] for p in data.glob("*_images")}
    parts = {part for part in parts if (data / f"{part}_images").is_dir() and (data / f"{part}_masks").is_dir()}
    parts |= {p.parent.name for p in data.glob("*/images") if p.is_dir() and (p.parent / "masks").is_dir()}
    return sorted(parts)


def pair_dirs_to_score(data: str | Path, split: str | None, task: str = "lesion") -> tuple[tuple[Path, Path], str]:
    """The (images, masks) folders of a pair folder to score, and the split they are.

    A folder with parts (train/val/test) is scored on ``split`` (default "test"); one unsplit set of pairs
    (Imgs/ + GT/, images/ + masks/) on all of them, as ``split`` None or "all". Anything else, a requested
    part that is not there above all, raises InputError naming what the folder holds: never another part.
    ``task``: a types task finds COVID-SemiSeg's multi-class masks (data.dataset.find_pair_dirs).
    """
    data = Path(data)
    parts = _pair_parts(data) if data.is_dir() else []
    if parts:
        want = split or "test"
        if want not in parts:
            raise InputError(f"{data}: no {want!r} part of image-mask pairs (it has {', '.join(parts)}); "
                             f"choose one with --split")
        return find_pair_dirs(data, want, task), want
    dirs = find_pair_dirs(data, ALL, task)  # the unsplit layouts; part names do not apply to them
    if dirs is None:
        raise InputError(f"{data}: neither a preprocessed folder (images.npy) nor a folder of image-mask pairs "
                         f"(PART_images/ + PART_masks/, PART/images/ + PART/masks/, Imgs/ + GT/ or images/ + masks/)")
    if split not in (None, ALL):
        raise InputError(f"{data}: one unsplit set of image-mask pairs ({dirs[0]} + {dirs[1].name}/), no "
                         f"{split!r} part; pass --split all to score every pair in it")
    return dirs, ALL


def other_labels(ckpt: dict) -> str:
    """What the checkpoint's run made of lesion labels that are no type: "background" (the default) or
    "ignore" (data.labels.OTHER_LABELS); the evaluated targets are made the same way."""
    return ckpt.get("other_labels") or ckpt.get("args", {}).get("other_labels") or "background"


def pair_dataset(pairs: list[tuple[Path, Path]], ckpt: dict, where: str | Path) -> PairFolderDataset:
    """The dataset of image-mask pairs for a checkpoint: lesion masks, or label masks for a types task."""
    if task_masks(ckpt["task"]) != ("lesion",):
        raise InputError(f"{where}: image-mask pairs hold lesion masks; this checkpoint predicts {ckpt['task']}")
    return PairFolderDataset(pairs, ckpt["preprocessing"], task=ckpt["task"], other_labels=other_labels(ckpt))


def load_eval_dataset(data: str | Path, split: str | None, ckpt: dict):
    """The dataset to score and the split it is: a split of a preprocessed folder (default "test"), or
    pairs of a pair folder (see :func:`pair_dirs_to_score`)."""
    data = Path(data)
    prep = ckpt["preprocessing"]
    if (data / "images.npy").is_file():
        split = split or "test"
        ds = SliceArrayDataset(data, None if split == ALL else split, ckpt["task"], other_labels=other_labels(ckpt))
        mine = {k: ds.preprocessing.get(k) for k in ("size", "norm", "window")}
        theirs = {k: prep.get(k) for k in ("size", "norm", "window")}
        if mine != theirs:
            raise InputError(f"{data} was preprocessed with {mine}, the checkpoint was trained on {theirs}; "
                             f"preprocess the volumes again with the checkpoint's settings")
        return ds, split
    dirs, split = pair_dirs_to_score(data, split, ckpt["task"])
    return pair_dataset(pair_files(*dirs), ckpt, data), split


def aggregate(meter: SegmentationMeter) -> tuple[dict, list[dict]]:
    """One structure's results from its meter: pooled, per-image and per-patient figures for every metric,
    AUC and the empty-slice rule (see utils.metrics); also the per-image rows."""
    summary, images = meter.summary(), meter.per_image()
    per_patient = summary["per_patient"]
    if per_patient is not None:
        per_patient = {**{k: per_patient[k] for k in METRICS},
                       "cases": {case: row["dice"] for case, row in per_patient["cases"].items()}}
    result = {"n_images": len(images), "pooled": {k: summary["pooled"][k] for k in METRICS},
              "per_image": summary["per_image"], "per_patient": per_patient, "empty_gt": summary["empty_gt"],
              "auc": summary["auc"]}
    return result, images


def format_table(name: str, res: dict) -> str:
    """The console table of one structure's results."""
    cols = ["pooled", "per image (mean ± sd)"] + (["per patient (mean ± sd)"] if res["per_patient"] else [])
    lines = [f"{name}: {res['n_images']} slices", f"{'metric':<12}" + "".join(f"{c:>26}" for c in cols)]
    for k in METRICS:
        cells = [f"{res['pooled'][k]:.4f}"]
        for part in ("per_image", "per_patient")[: len(cols) - 1]:
            m = res[part][k]
            cells.append(f"{m['mean']:.4f} ± {m['sd']:.4f} (n={m['n']})")
        lines.append(f"{k:<12}" + "".join(f"{c:>26}" for c in cells))
    lines.append(f"{'auc':<12}{res['auc']:>26.4f}")
    for key in MAP_METRICS:
        if key in res["per_image"]:
            m = res["per_image"][key]
            lines.append(f"{key:<24}{'':>14}{m['mean']:.4f} ± {m['sd']:.4f} (n={m['n']})   (Inf-Net's measures)")
    e = res["empty_gt"]
    if e["n"]:
        lines.append(f"lesion-free slices: {e['n']}, {e['n_with_false_positive']} with a false-positive pixel "
                     f"({e['fraction_clean']:.1%} clean); not in the per-image Dice/IoU")
    return "\n".join(lines)


def _count(meters: dict[str, SegmentationMeter], classes: ClassMeter | None, probs: dict[str, torch.Tensor],
           target: torch.Tensor, task: str, main: str, threshold: float, cases: list[str] | None) -> list[dict]:
    """Add a batch of probabilities {structure: (N, H, W)} and its class-index target (N, H, W) to the
    meters (and to a types task's ClassMeter); returns the main structure's map scores per image."""
    if classes is not None:
        truth, ignore = type_target(target, task)
        _count_types(classes, probs, truth, ignore, task, threshold, cases)
        # ignored pixels are no false positive of any structure: the loss did not learn them either
        probs = {k: v.masked_fill(ignore, 0) for k, v in probs.items()}
    targets = class_targets(target, task)
    for n, meter in meters.items():
        meter.update(probs[n], targets[n], threshold, cases)
    return [_map_scores(p, t) for p, t in zip(probs[main], targets[main])]


def _score(model, ds, task: str, names: list[str], main: str, dev, dtype, tta: bool, threshold: float,
           batch_size: int, progress: bool) -> tuple[dict[str, SegmentationMeter], list[dict], ClassMeter | None]:
    """Predict every item of ``ds`` in batches and count it: {structure: meter}, per image of the main
    structure its probability-map scores (:func:`_map_scores`), and for a types task its ClassMeter (else
    None). Pairs are scored at each mask's own size."""
    pairs = isinstance(ds, PairFolderDataset)
    meters = {n: SegmentationMeter() for n in names}
    classes = ClassMeter(lesion_types(task)) if task in TYPE_TASKS else None
    extras = []  # per image of the main structure: threshold-averaged Dice and MAE of the probability map
    for start in tqdm(range(0, len(ds), batch_size), desc="evaluate", unit="batch", disable=None if progress else True):
        idx = list(range(start, min(start + batch_size, len(ds))))
        if pairs:
            loaded = [ds.load(i) for i in idx]
            images = torch.stack([img for img, _, _ in loaded])[:, None]
        else:
            items = [ds[i] for i in idx]
            images, masks = torch.stack([x for x, _ in items]), torch.stack([m for _, m in items])
        probs = {k: v.float().cpu() for k, v in predict(model, images, task, dev, dtype, tta).items()}
        if pairs:  # score at each mask's own resolution
            for j, i in enumerate(idx):
                shape = loaded[j][2]
                one = {n: resize_images(p[j:j + 1], shape).clamp_(0, 1) for n, p in probs.items()}
                target = torch.from_numpy(ds.read_target(ds.pairs[i][1]))[None]
                extras.extend(_count(meters, classes, one, target, task, main, threshold, None))
        else:
            cases = [ds.case_of(i) for i in idx]
            extras.extend(_count(meters, classes, probs, masks, task, main, threshold, cases))
    return meters, extras, classes


@torch.no_grad()
def evaluate(checkpoint: str | Path, data: str | Path, split: str | None = None, out: str | Path | None = None,
             threshold: float = 0.5, device: str = "auto", amp: str = "auto", batch_size: int = 8,
             n_figure: int = 3, progress: bool = True, tta: bool | None = None,
             pairs: list[tuple[Path, Path]] | None = None) -> dict:
    """Score a checkpoint on a dataset, write results.json / per_image.csv / cases.png, return the results.

    Args:
        split: the part to score: of splits.json for a preprocessed folder (default "test"); of a pair folder
            with parts (default "test"); "all" (or None) for a pair folder without parts. A requested part
            that is not there is an error. Recorded in results.json and in the default output folder name.
        tta: flip test-time augmentation (engine.predict.predict); None: as the checkpoint's run asked.
        pairs: score these (image, mask) files instead of ``data`` (e.g. the validation part of a fold);
            ``split`` then only names them (default "pairs").
    """
    ckpt = load_checkpoint(checkpoint)
    task = ckpt["task"]
    tta = bool(ckpt.get("inference", {}).get("tta", False)) if tta is None else tta
    dev = resolve_device(device)
    dtype = amp_dtype(dev, amp)
    model = inference_model(model_from_checkpoint(ckpt, checkpoint), dev)
    if pairs is not None:
        ds, split = pair_dataset(pairs, ckpt, checkpoint), split or "pairs"
    else:
        ds, split = load_eval_dataset(data, split, ckpt)
    pairs = isinstance(ds, PairFolderDataset)
    print(f"scoring {len(ds)} {'image-mask pairs' if pairs else 'slices'} of {data} (split: {split})")
    note = image_files_note(ckpt["preprocessing"]) if pairs else None  # once per run, not per file
    if note:
        print(note)
    # a types task's types are scored once, on its label map (the "classes" block, type_prediction's rule);
    # thresholding each type's map alone would give a second, different figure for the same type
    names = list(task_masks(task))
    main = main_structure(task)
    meters, extras, classes = _score(model, ds, task, names, main, dev, dtype, tta, threshold, batch_size, progress)
    results = {"checkpoint": str(checkpoint), "data": str(data), "split": split,
               "threshold": threshold, "tta": tta, "task": task, "structures": {}}
    per_image_rows = []
    for n in names:
        res, images = aggregate(meters[n])
        if n == main:
            for r, e in zip(images, extras):
                r.update(e)
            for key in MAP_METRICS:
                res["per_image"][key] = mean_sd(r[key] for r in images)
        results["structures"][n] = res
        for i, r in enumerate(images):
            row = {"index": i, "structure": n, "case": ds.case_of(i),
                   "file": str(ds.pairs[i][0]) if pairs else "", "z": "" if pairs else ds.meta["slices"][ds.rows[i]]["z"]}
            row.update({k: r.get(k, "") for k in ("empty_gt", "tp", "fp", "fn", "tn") + METRICS + MAP_METRICS})
            per_image_rows.append(row)
        print(format_table(n, res))
    if classes is not None:  # the label map of the lesion types (type_prediction), per class
        results["classes"] = classes.summary()
        print(format_class_table(results["classes"]))

    out = Path(out) if out else Path(checkpoint).parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.json") as tmp:
        tmp.write_text(json.dumps(finite_or_none(results), indent=1, allow_nan=False))
    write_csv(per_image_rows, out / "per_image.csv")
    _figure(model, ds, [r for r in per_image_rows if r["structure"] == main], main, task, dev, dtype,
            threshold, n_figure, out / "cases.png", tta)
    print(f"wrote {out}/results.json, per_image.csv, cases.png")
    return results


def _figure(model, ds, rows, main, task, dev, dtype, threshold, n, path, tta=False) -> None:
    """CT / ground truth / prediction for the n best and n worst slices with lesion (by Dice)."""
    scored = sorted((r for r in rows if not r["empty_gt"]), key=lambda r: r["dice"])
    if n <= 0:
        return
    chosen = scored[-n:][::-1] + [r for r in scored[:n] if r not in scored[-n:]]
    if not chosen:
        return
    imgs, gts, preds, titles = [], [], [], []
    for r in chosen:
        image, mask = ds[r["index"]]
        prob = predict(model, image[None], task, dev, dtype, tta)[main][0].float().cpu()
        imgs.append(image[0].numpy())
        gts.append(class_targets(mask[None], task)[main][0].numpy())
        preds.append((prob > threshold).numpy())
        titles.append(f"{r['case']}  Dice {r['dice']:.3f}  IoU {r['iou']:.3f}")
    plot_cases(imgs, gts, preds, titles, path)


def slice_dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean Dice of the binary masks (pred > 0 vs truth > 0) over the slices where the truth has the
    structure (the per-slice figure lung-mask tools report); None when no slice has it.

    Shape: (Z, H, W) each."""
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    scores = [dice_3d(p, t) for p, t in zip(pred, truth) if t.any()]
    return float(np.mean(scores)) if scores else None


def evaluate_volumes(checkpoint: str | Path, data: str | Path, out: str | Path | None = None,
                     threshold: float = 0.5, device: str = "auto", amp: str = "auto", batch_size: int = 8,
                     splits: str | Path | None = None, split: str | None = None, progress: bool = True,
                     lungs: str = "auto") -> dict:
    """Score a checkpoint on whole NIfTI volumes with ground truth: per-patient 3D Dice of lesion and lung,
    the mean lung Dice over the slices that hold lung, and the absolute error of the infection percentage,
    at the scans' own resolution.

    Args:
        data: a folder of volumes in a layout data.preprocess reads, with lesion (and lung) masks.
        splits: optional splits.json (by patient) restricting the cases to its ``split`` part (default
            "test"); without it every volume is scored, and a ``split`` other than "all" is an error.
        lungs: where the predicted lungs come from, as infer.py's --lungs (engine.batch.lung_source): the
            model's lung head, or the lungs from HU (utils.lungs, the predicted lesions added), so the HU
            lungs can be scored against expert lung masks.
    """
    cases = find_cases(data)
    if cases[0].lesion is None:
        raise InputError(f"{data}: these volumes have no lesion masks to evaluate against")
    if not splits and split not in (None, ALL):
        raise InputError(f"{data}: --split {split} needs --splits SPLITS.json to say which volumes are {split!r}; "
                         f"pass it, or --split all to score every volume")
    if splits:
        split = split or "test"
        chosen = json.loads(Path(splits).read_text()).get(split)
        if chosen is None:
            raise InputError(f"{splits}: no {split!r} split")
        cases = [c for c in cases if c.name in set(chosen)]
        if not cases:
            raise InputError(f"{splits}: none of the {split!r} cases are volumes in {data}")
    for case in cases:  # every mask on its image's grid before any prediction (the voxels are checked below)
        read_case(case.image, case.lung, case.lesion, voxels=False)
    predictor = Predictor(checkpoint, device, amp, batch_size)
    source = lung_source(predictor.task, lungs)
    types = lesion_types(predictor.task)
    classes = ClassMeter(types) if types else None
    rows = []
    for case in tqdm(cases, desc="volumes", unit="vol", disable=None if progress else True):
        # the ground truth is read with preprocessing's own checks: grid, orientation, labels 0..255
        vol = read_case(case.image, case.lung, case.lesion, predictor.prep)
        if classes is None:
            _, _, masks = predictor.predict_volume(vol, threshold)
            lesion, type_row = vol.masks["lesion"] > 0, {}
        else:
            masks, lesion, type_row = _volume_types(predictor, vol, case, classes, threshold)
        if source == "hu":
            masks["lung"] = extract_lungs(vol.image, lesion=masks.get("lesion"))
        lung = vol.masks.get("lung")
        voxel_ml = vol.voxel_ml
        truth = volume_report(lesion, lung, voxel_ml)
        pred = volume_report(masks.get("lesion"), masks.get("lung"), voxel_ml)
        row = {"case": case.name, "lesion_dice_3d": dice_3d(masks["lesion"], lesion) if "lesion" in masks else None,
               "lung_dice_3d": dice_3d(masks["lung"], lung) if ("lung" in masks and lung is not None) else None,
               "lung_dice_slices": slice_dice(masks["lung"], lung) if ("lung" in masks and lung is not None) else None,
               "lung_source": source,
               "lesion_ml_true": truth["lesion_ml"], "lesion_ml_pred": pred["lesion_ml"],
               "infection_percent_true": truth["infection_percent"], "infection_percent_pred": pred["infection_percent"]}
        both = row["infection_percent_true"] is not None and row["infection_percent_pred"] is not None
        row["infection_percent_abs_error"] = (abs(row["infection_percent_pred"] - row["infection_percent_true"])
                                              if both else None)
        rows.append({**row, **type_row})
    keys = ["lesion_dice_3d", "lung_dice_3d", "lung_dice_slices", "infection_percent_abs_error"]
    keys += [f"{structure_slug(name)}_dice_3d" for name in types]
    summary = {key: mean_sd(r[key] for r in rows) for key in keys}
    split = split if splits else ALL
    results = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "threshold": threshold, "kind": "volumes",
               "rule": "3D Dice over each whole volume at its own resolution; nan (excluded) when the volume "
                       "has no lesion and none is predicted", "summary": summary, "patients": rows}
    if classes is not None:  # per slice, and per volume as its patient; no Inf-Net figure (a 2D slice protocol)
        results["classes"] = classes.summary()
    print(f"{'case':<24}{'lesion Dice':>12}{'lung Dice':>11}{'infection % true':>18}{'pred':>8}{'|error|':>9}")
    fmt = lambda v, f="{:.4f}": "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)  # noqa: E731
    for r in rows:
        print(f"{r['case']:<24}{fmt(r['lesion_dice_3d']):>12}{fmt(r['lung_dice_3d']):>11}"
              f"{fmt(r['infection_percent_true'], '{:.2f}'):>18}{fmt(r['infection_percent_pred'], '{:.2f}'):>8}"
              f"{fmt(r['infection_percent_abs_error'], '{:.2f}'):>9}")
    for key, m in summary.items():
        print(f"{key}: {fmt(m['mean'])} ± {fmt(m['sd'])} (n={m['n']})")
    if classes is not None:
        print(format_class_table(results["classes"]))
    out = Path(out) if out else Path(checkpoint).parent / ("eval-volumes" if split == ALL else f"eval-volumes-{split}")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.json") as tmp:
        tmp.write_text(json.dumps(finite_or_none(results), indent=1, allow_nan=False))
    write_csv(rows, out / "per_patient.csv")
    print(f"wrote {out}/results.json, per_patient.csv")
    return results


def _volume_types(predictor: Predictor, vol, case, meter: ClassMeter, threshold: float):
    """Predict one volume of a types task and add its lesion types to ``meter`` (its slices, the volume as
    one patient).

    Returns:
        ({name: uint8 mask (Z, H, W)} as Predictor.predict_volume gives them, the true lesion (the union of
        the types; labels that are no type are background, or left out where the checkpoint ignores them),
        {"<type>_dice_3d", "<type>_ml_true", "<type>_ml_pred"} of each type for the volume's row).
    """
    try:  # the lesion labels as the volume's layout documents them (data.labels.LESION_LABEL_NAMES)
        values = type_values({name: int(v) for v, name in LESION_LABEL_NAMES.get(case.layout, {}).items()})
    except ValueError as e:
        raise InputError(f"{case.lesion}: lesion masks of the {case.layout!r} layout: {e}") from None
    truth = torch.from_numpy(type_mask(vol.masks["lesion"], values, other_labels(predictor.ckpt))).long()
    ignore = truth == IGNORE_INDEX
    _, _, probs = predictor.volume_probs(vol)  # predict_volume thresholds each structure alone
    masks = {name: (p > threshold).numpy().astype(np.uint8) for name, p in probs.items()}
    pred = _count_types(meter, probs, truth, ignore, predictor.task, threshold, [case.name] * len(truth), maps=False)
    truth = truth.masked_fill(ignore, 0)
    masks[main_structure(predictor.task)][ignore.numpy()] = 0  # ignored voxels are no false positive
    row = {}
    for name, value in meter.classes.items():
        slug = structure_slug(name)
        row[f"{slug}_dice_3d"] = dice_3d((pred == value).numpy(), (truth == value).numpy())
        row[f"{slug}_ml_true"] = float((truth == value).sum()) * vol.voxel_ml
        row[f"{slug}_ml_pred"] = float((pred == value).sum()) * vol.voxel_ml
    return masks, (truth > 0).numpy(), row


def is_volume_folder(data: str | Path) -> bool:
    """True for a volume file, a folder of volumes or a DICOM folder (not a preprocessed folder or pairs)."""
    data = Path(data)
    if is_nifti(data) or (data.is_file() and reader_for(data)):  # NIfTI, or a zip of DICOM files
        return True
    if not data.is_dir() or (data / "images.npy").is_file() or find_pair_dirs(data, "train") or find_pair_dirs(data, "test"):
        return False
    return any(is_nifti(p) for p in data.rglob("*.nii*")) or reader_for(data) is not None
