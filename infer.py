"""Predict lesion masks for new CT: a PNG/JPG slice, a folder of slices, or a NIfTI volume.

    python infer.py --input slice.png                          # -> prediction_mask.png (+ _overlay.png)
    python infer.py --input slices/ --output masks/            # -> masks/<name>.png, masks/overlays/<name>.png
    python infer.py --input scan.nii.gz --output results/      # -> results/<case>_lesion.nii.gz (+ _lung)

Masks are white (255) where the model sees infection, at the input's own size. A NIfTI mask has exactly
the input's shape, affine and orientation, so it opens over the scan in 3D Slicer or ITK-SNAP. The input
is preprocessed from the checkpoint's record, by the same functions training used.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from data.transforms import (IMAGE_SUFFIXES, InputError, case_name, from_axial_slices, is_nifti,
                             load_image_slice, load_nifti, prepare_slices, read_image, read_volume_data,
                             resize_images, to_axial_slices)
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.helpers import amp_dtype, atomic_write, mask_to_png, overlay, resolve_device, save_png
from utils.inference import inference_model, predict


class Predictor:
    """A checkpoint's model and input pipeline, ready to predict probability maps.

    Args:
        checkpoint: path to a .pth written by train.py.
        device: "auto", "cpu" or "cuda".
        amp: autocast policy (see utils.helpers.amp_dtype).
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto", amp: str = "auto", batch_size: int = 8):
        self.ckpt = load_checkpoint(checkpoint)
        self.task, self.prep = self.ckpt["task"], self.ckpt["preprocessing"]
        self.device = resolve_device(device)
        self.dtype = amp_dtype(self.device, amp)
        self.model = inference_model(model_from_checkpoint(self.ckpt, checkpoint), self.device)
        self.batch_size = batch_size

    def probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probability maps for preprocessed slices (N, S, S), predicted in batches; {name: (N, S, S) on CPU}."""
        chunks = [predict(self.model, images[i:i + self.batch_size, None], self.task, self.device, self.dtype)
                  for i in range(0, len(images), self.batch_size)]
        return {k: torch.cat([c[k].float().cpu() for c in chunks]) for k in chunks[0]}

    def predict_images(self, paths: list[Path], threshold: float = 0.5):
        """Yield (path, image (H, W) float32, {name: mask (H, W) uint8 {0,1}}) for 2D image files."""
        for start in range(0, len(paths), self.batch_size):
            batch = paths[start:start + self.batch_size]
            loaded = [load_image_slice(p, self.prep) for p in batch]
            probs = self.probs(torch.stack([img for img, _ in loaded]))
            for j, (path, (_, shape)) in enumerate(zip(batch, loaded)):
                masks = {k: (resize_images(v[j:j + 1], shape)[0] > threshold).numpy().astype(np.uint8)
                         for k, v in probs.items()}
                yield path, read_image(path), masks

    def predict_volume(self, path: Path, threshold: float = 0.5) -> tuple[nib.Nifti1Image, dict[str, np.ndarray]]:
        """Masks {name: uint8 array in the file's own voxel order and shape} for a NIfTI volume."""
        img = load_nifti(path, "image")
        slices = to_axial_slices(read_volume_data(img, path, "image"), img.affine)
        probs = self.probs(prepare_slices(slices, self.prep))
        shape = slices.shape[1:]
        file_shape = nib.load(str(path)).shape  # (X, Y, Z) or (X, Y, Z, 1): the mask keeps the file's own
        masks = {}
        for name, p in probs.items():
            full = torch.cat([resize_images(p[i:i + 64], shape) for i in range(0, len(p), 64)])
            masks[name] = from_axial_slices((full > threshold).numpy().astype(np.uint8), img.affine).reshape(file_shape)
        return img, masks


def save_nifti_mask(mask: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    """Write a uint8 mask with the reference image's affine and orientation, atomically."""
    out = nib.Nifti1Image(mask.astype(np.uint8), like.affine)
    out.set_qform(like.affine, code=int(like.header["qform_code"]) or 1)
    out.set_sform(like.affine, code=int(like.header["sform_code"]) or 1)
    out.header.set_xyzt_units(*like.header.get_xyzt_units())
    with atomic_write(path) as tmp:
        nib.save(out, tmp.with_name(tmp.name + ".nii.gz"))
        tmp.with_name(tmp.name + ".nii.gz").rename(tmp)


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


def infer(checkpoint: str | Path, input: str | Path, output: str | Path | None = None, threshold: float = 0.5,
          device: str = "auto", amp: str = "auto", batch_size: int = 8, progress: bool = True) -> list[Path]:
    """Predict masks for an image, a folder of images, a NIfTI volume or a folder of volumes.

    Returns the written mask paths.
    """
    src = Path(input)
    if not src.exists():
        raise InputError(f"{src}: input not found")
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"--threshold must be in [0, 1], got {threshold}")
    predictor = Predictor(checkpoint, device, amp, batch_size)
    main = "lesion" if predictor.task != "lung" else "lung"
    written: list[Path] = []

    volumes = [src] if is_nifti(src) else (sorted(p for p in src.iterdir() if is_nifti(p)) if src.is_dir() else [])
    if volumes:
        out = Path(output) if output else Path("predictions")
        out.mkdir(parents=True, exist_ok=True)
        for vol in tqdm(volumes, desc="volumes", disable=True if (not progress or len(volumes) == 1) else None):
            img, masks = predictor.predict_volume(vol, threshold)
            for name, mask in masks.items():
                path = out / f"{case_name(vol)}_{name}.nii.gz"
                save_nifti_mask(mask, img, path)
                written.append(path)
        print(f"wrote {len(written)} mask volume(s) to {out}/")
        return written

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
    for path, image, masks in tqdm(predictor.predict_images(paths, threshold), total=len(paths), desc="infer",
                                   unit="img", disable=True if (not progress or len(paths) == 1) else None):
        mask_path = target if out_dir is None else out_dir / f"{path.stem}.png"
        overlay_path = (mask_path.with_name(mask_path.stem + "_overlay.png") if out_dir is None
                        else out_dir / "overlays" / f"{path.stem}.png")
        save_png(mask_to_png(masks[main]), mask_path)
        save_png(overlay(image / max(float(image.max()), 1e-6), masks[main]), overlay_path)
        written.append(mask_path)
    where = written[0] if out_dir is None else f"{out_dir}/ ({len(written)} masks, overlays in {out_dir}/overlays/)"
    print(f"wrote {where}")
    return written


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/best_model.pth")
    p.add_argument("--input", required=True, help="PNG/JPG slice, folder of slices, NIfTI volume or folder of volumes")
    p.add_argument("--output", default=None,
                   help="mask file for one slice (default prediction_mask.png), else a folder (default predictions/)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    return infer(args.checkpoint, args.input, args.output, args.threshold, args.device, args.amp,
                 args.batch_size, args.progress)


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
