"""Predict lesion masks for new CT: a PNG/JPG slice, a folder of slices, or a NIfTI volume.

    python infer.py --input slice.png                          # -> prediction_mask.png (+ _overlay.png)
    python infer.py --input slices/ --output masks/            # -> masks/<name>.png, masks/overlays/<name>.png
    python infer.py --input scan.nii.gz --output results/      # -> results/<case>_lesion.nii.gz, _lung.nii.gz,
                                                               #    _report.json (mL, infection %), _montage.png

Masks are white (255) where the model sees infection, at the input's own size. A NIfTI mask has exactly
the input's shape, affine and orientation, so it opens over the scan in 3D Slicer or ITK-SNAP. The input
is preprocessed from the checkpoint's record, by the same functions training used.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from data.transforms import (IMAGE_SUFFIXES, InputError, case_name, from_axial_slices, is_nifti,
                             load_image_slice, load_nifti, nifti_gz_bytes, prepare_slices, read_image, read_volume_data,
                             resize_images, resize_masks, to_axial_slices, voxel_spacing)
from utils.cli import add_runtime_args
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.helpers import amp_dtype, atomic_write, mask_to_png, overlay, resolve_device, save_png, write_csv
from utils.volumes import volume_report
from utils.inference import inference_model, predict


class Predictor:
    """One checkpoint's model, or several averaged, with their input pipeline, ready to predict.

    Args:
        checkpoints: a .pth written by train.py, or a list of them (an ensemble: probabilities are averaged;
            they must share the task and the preprocessing).
        device: "auto", "cpu" or "cuda".
        amp: autocast policy (see utils.helpers.amp_dtype).
        tta: flip test-time augmentation (see utils.inference.predict); None: as the first checkpoint's
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

    def predict_images(self, paths: list[Path]):
        """Yield (path, image (H, W) float32, {name: probability map (H, W) float32}) for 2D image files,
        the probabilities resized back to each image's own size."""
        for start in range(0, len(paths), self.batch_size):
            batch = paths[start:start + self.batch_size]
            loaded = [load_image_slice(p, self.prep) for p in batch]
            probs = self.probs(torch.stack([img for img, _ in loaded]))
            for j, (path, (_, shape)) in enumerate(zip(batch, loaded)):
                yield path, read_image(path), {k: resize_images(v[j:j + 1], shape)[0].clamp_(0, 1).numpy()
                                               for k, v in probs.items()}

    def predict_volume(self, path: Path, threshold: float = 0.5):
        """Predict a NIfTI volume.

        Returns:
            (nibabel image, preprocessed slices (Z, S, S), {name: uint8 mask (Z, H, W)}), the masks in
            display orientation at the scan's in-plane size (see data.transforms.to_axial_slices).
        """
        img = load_nifti(path, "image")
        slices = to_axial_slices(read_volume_data(img, path, "image"), img.affine)
        images = prepare_slices(slices, self.prep)
        probs = self.probs(images)
        shape = slices.shape[1:]
        masks = {}
        for name, p in probs.items():  # upsample in chunks: a 512x512x300 float volume is 300 MB
            masks[name] = torch.cat([resize_images(p[i:i + 32], shape) > threshold
                                     for i in range(0, len(p), 32)]).numpy().astype(np.uint8)
        return img, images.numpy(), masks


def montage(images: np.ndarray, masks: dict[str, np.ndarray], n: int = 6, cols: int = 3) -> np.ndarray:
    """Overlays of the ``n`` axial slices with the most lesion (lesion red, lung green), tiled; uint8 RGB."""
    main = masks.get("lesion", masks.get("lung"))
    area = main.reshape(len(main), -1).sum(1)
    picks = sorted(np.argsort(-area, kind="stable")[:n])
    size = images.shape[1:]
    tiles = []
    for z in picks:
        small = {k: resize_masks(m[z][None], size)[0].numpy() for k, m in masks.items()}
        tile = overlay(images[z], small.get("lung", np.zeros(size, np.uint8)), (60, 200, 60), 0.25)
        tiles.append(overlay(tile, small.get("lesion", np.zeros(size, np.uint8))))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


def save_nifti_mask(mask: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    """Write a uint8 mask with the reference image's affine (so its orientation), atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(nifti_gz_bytes(mask.astype(np.uint8), like.affine))


def infer_volumes(predictor: Predictor, volumes: list[Path], out: Path, threshold: float,
                  checkpoint: str | Path, progress: bool = True) -> list[Path]:
    """Masks, a report and a montage per volume; with several volumes also OUT/report.csv.

    Writes OUT/<case>_lesion.nii.gz and/or OUT/<case>_lung.nii.gz (uint8, the scan's own shape, affine and
    orientation), OUT/<case>_report.json and OUT/<case>_montage.png. Returns the mask paths.
    """
    out.mkdir(parents=True, exist_ok=True)
    written, reports = [], []
    for vol in tqdm(volumes, desc="volumes", disable=True if (not progress or len(volumes) == 1) else None):
        case = case_name(vol)
        img, images, masks = predictor.predict_volume(vol, threshold)
        file_shape = nib.load(str(vol)).shape  # (X, Y, Z) or (X, Y, Z, 1): the mask keeps the file's own
        for name, mask in masks.items():
            path = out / f"{case}_{name}.nii.gz"
            save_nifti_mask(from_axial_slices(mask, img.affine).reshape(file_shape), img, path)
            written.append(path)
        report = {"case": case, "file": str(vol), "threshold": threshold,
                  "checkpoint": [str(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple)) else str(checkpoint),
                  "shape": [int(v) for v in file_shape], "spacing_mm": voxel_spacing(img),
                  **volume_report(masks.get("lesion"), masks.get("lung"), voxel_spacing(img))}
        if "lung" not in masks:
            report["note"] = ("this checkpoint segments lesions only: the infection percentage needs a lung "
                              "model (train one with --task lung+lesion)")
        with atomic_write(out / f"{case}_report.json") as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        save_png(montage(images, masks), out / f"{case}_montage.png")
        reports.append(report)
        pct = report["infection_percent"]
        print(f"{case}: lesion {report['lesion_ml'] or 0:.1f} mL"
              + (f", lung {report['lung_ml']:.1f} mL, infection {pct:.2f}% (left {report['infection_percent_left'] or 0:.2f}%, "
                 f"right {report['infection_percent_right'] or 0:.2f}%)" if pct is not None else f"; {report.get('note', '')}"))
    if len(reports) > 1:
        write_csv([{k: v for k, v in r.items() if not isinstance(v, list)} for r in reports], out / "report.csv")
    print(f"wrote {len(written)} mask volume(s), reports and montages to {out}/"
          + (" (summary: report.csv)" if len(reports) > 1 else ""))
    return written


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: no images ({'/'.join(IMAGE_SUFFIXES)}) or NIfTI volumes found")
    stems = [p.stem for p in files]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:  # masks are named <stem>.png: two inputs with one stem would overwrite each other's mask
        raise InputError(f"{folder}: several images share the name {clash[0]!r} ({', '.join(p.name for p in files if p.stem == clash[0])}); "
                         f"masks are named <name>.png, so rename or move one")
    return files


def infer(checkpoint, input: str | Path, output: str | Path | None = None, threshold: float = 0.5,
          device: str = "auto", amp: str = "auto", batch_size: int = 8, progress: bool = True,
          save_probs: str | Path | None = None, tta: bool | None = None) -> list[Path]:
    """Predict masks for an image, a folder of images, a NIfTI volume or a folder of volumes.

    Args:
        checkpoint: one checkpoint path or a list of them (their probabilities are averaged).
        save_probs: for 2D images, also write 8-bit probability maps (0-255) named like the masks here.
        tta: flip test-time augmentation; None: as the checkpoint's training run asked (train.py --tta).
    Returns the written mask paths.
    """
    src = Path(input)
    if not src.exists():
        raise InputError(f"{src}: input not found")
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"--threshold must be in [0, 1], got {threshold}")
    predictor = Predictor(checkpoint, device, amp, batch_size, tta)
    main = "lesion" if predictor.task != "lung" else "lung"
    written: list[Path] = []

    volumes = [src] if is_nifti(src) else (sorted(p for p in src.iterdir() if is_nifti(p)) if src.is_dir() else [])
    if volumes:
        return infer_volumes(predictor, volumes, Path(output) if output else Path("predictions"), threshold,
                             checkpoint, progress)

    if src.is_file():
        if src.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{src}: not an image ({'/'.join(IMAGE_SUFFIXES)}) or NIfTI (.nii, .nii.gz) file")
        paths = [src]
        out_dir = None
        target = Path(output) if output else Path("prediction_mask.png")
        if target.is_dir() or not target.suffix:
            target = target / f"{src.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
    else:
        paths = _image_files(src)
        out_dir = Path(output) if output else Path("predictions")
        (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    if save_probs:
        Path(save_probs).mkdir(parents=True, exist_ok=True)
    for path, image, probs in tqdm(predictor.predict_images(paths), total=len(paths), desc="infer",
                                   unit="img", disable=True if (not progress or len(paths) == 1) else None):
        mask_path = target if out_dir is None else out_dir / f"{path.stem}.png"
        overlay_path = (mask_path.with_name(mask_path.stem + "_overlay.png") if out_dir is None
                        else out_dir / "overlays" / f"{path.stem}.png")
        mask = (probs[main] > threshold).astype(np.uint8)
        save_png(mask_to_png(mask), mask_path)
        save_png(overlay(image / max(float(image.max()), 1e-6), mask), overlay_path)
        if save_probs:  # 8-bit probability map, 0..255, named like the mask
            save_png(np.round(probs[main] * 255).astype(np.uint8), Path(save_probs) / mask_path.name)
        written.append(mask_path)
    where = written[0] if out_dir is None else f"{out_dir}/ ({len(written)} masks, overlays in {out_dir}/overlays/)"
    print(f"wrote {where}")
    return written


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=["checkpoints/best_model.pth"],
                   help="one checkpoint, or several whose probabilities are averaged (e.g. fold models)")
    p.add_argument("--input", required=True, help="PNG/JPG slice, folder of slices, NIfTI volume or folder of volumes")
    p.add_argument("--output", default=None,
                   help="mask file for one slice (default prediction_mask.png), else a folder (default predictions/)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--save-probs", default=None, metavar="DIR",
                   help="slices: also write 8-bit probability maps (0-255) named like the masks to DIR")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation, 4 passes (default: as the checkpoint was trained to use)")
    p.add_argument("--batch-size", type=int, default=8)
    return add_runtime_args(p)


def main(args: argparse.Namespace) -> list[Path]:
    return infer(args.checkpoint, args.input, args.output, args.threshold, args.device, args.amp,
                 args.batch_size, args.progress, args.save_probs, args.tta)


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
