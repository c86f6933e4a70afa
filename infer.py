"""Predict lesion masks for new CT: a PNG/JPG slice, a folder of slices, a NIfTI volume or a DICOM series.

    python infer.py --input slice.png                          # -> prediction_mask.png (+ _overlay.png)
    python infer.py --input slices/ --output masks/            # -> masks/<name>.png, masks/overlays/<name>.png
    python infer.py --input scan.nii.gz --output results/      # -> results/<case>_lesion.nii.gz, _lung.nii.gz,
                                                               #    _report.json (mL, infection %), _montage.png
    python infer.py --input dicom_folder/ --output results/    # a DICOM series (folder or .zip) -> the same,
                                                               #    named after the folder, in its geometry
    python infer.py --input dicom_folder/ --output results/ --dicom-seg   # also results/<case>_seg.dcm: a DICOM
                                                               #    SEG over the series (3D Slicer, OHIF)
    python infer.py --input scan.nii.gz --output results/ --save-probs probs/   # also probs/<case>_lesion.nii.gz:
                                                               #    the lesion probability (0..1, 8-bit), to average
                                                               #    or re-threshold (slices: probs/<name>.png, 0-255)

Masks are white (255) where the model sees infection, at the input's own size. A lesion-types checkpoint
(train.py --task lesion-types or lung+lesion-types) tells ground-glass opacity from consolidation: a slice's
mask is a label PNG (palette, as COVID-SemiSeg's multi-class masks: 0 background, 1 ground-glass opacity,
2 consolidation), overlays colour the types differently, --save-probs writes one map per type
(PROB/ggo/<name>.png, PROB/consolidation/<name>.png; for a volume PROB/ggo/<case>_lesion.nii.gz, ...), a
volume's <case>_lesion.nii.gz holds labels 1/2 and
its report each type's mL and % of each lung (ggo_ml, ggo_percent_left, ...). A pixel is lesion where the
union's probability (1 - background) is above --threshold, as for a binary model, so the union of the types
is the lesion mask a binary reading gives; a lesion pixel is the type of higher probability.
--lesion any writes the union instead, as a binary model's masks (0/255 slices, 0/1 volumes). A NIfTI mask has exactly
the input's shape, affine and orientation, so it opens over the scan in 3D Slicer or ITK-SNAP; for a DICOM
series (a folder searched recursively, or a .zip; --series UID picks one of several) the mask has the
series' geometry, its voxel i along the DICOM rows, j down the columns, k along the slice normal. The input
is preprocessed from the checkpoint's record, by the same functions training used. Image files carry no
HU: for a checkpoint trained with an HU window, 8-bit images are read as slices already shown in that
window (as data.export_png writes them) and 16-bit or float images are refused.

A folder of NIfTI files or DICOM zips runs as a batch (a folder with no such files but DICOM files under
it is one scan). Folders run as a batch, as nnU-Net's and TotalSegmentator's predictors do: after each case the output
folder's infer_manifest.json (and report.csv) lists it as done or failed. A case that cannot be read is
reported and the others go on; the run ends with one line naming each failed file, and exit code 1. A
rerun (after Ctrl-C, or after fixing a bad file) skips the cases already done with the same checkpoints and
settings; --overwrite redoes them.

What infer.py replaces: only files it wrote itself (listed in the manifest, or PNGs carrying its marker,
such as a previous prediction_mask.png), or anything with --overwrite. An output can never be, or hold,
the input.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from base import check_disjoint
from data.readers import reader_for
from data.transforms import IMAGE_SUFFIXES, InputError, image_files_note
from engine.batch import LESION_MODES, image_files, infer_image, infer_image_folder, infer_volumes
from engine.predict import Predictor
from utils.cli import add_runtime_args


def volume_inputs(src: Path) -> list[Path]:
    """The volumes an --input names: itself (a NIfTI file, a DICOM zip or folder), or the NIfTI files and
    DICOM zips in a folder. A folder of image slices is not searched for DICOM files."""
    if src.is_file():
        return [src] if reader_for(src) else []
    if not src.is_dir():
        return []
    volumes = sorted(p for p in src.iterdir() if p.is_file() and reader_for(p))
    if volumes or any(p.suffix.lower() in IMAGE_SUFFIXES for p in src.iterdir()):
        return volumes
    return [src] if reader_for(src) else []


def infer(checkpoint, input: str | Path, output: str | Path | None = None, threshold: float = 0.5,
          device: str = "auto", amp: str = "auto", batch_size: int = 8, progress: bool = True,
          save_probs: str | Path | None = None, tta: bool | None = None, overwrite: bool = False,
          series: str | None = None, lungs: str = "auto", dicom_seg: bool = False,
          lesion: str = "types") -> list[Path]:
    """Predict masks for an image, a folder of images, a NIfTI volume, a DICOM series or a folder of volumes.

    Args:
        checkpoint: one checkpoint path or a list of them (their probabilities are averaged).
        save_probs: a folder for the probability maps too, named like the masks: 8-bit PNGs (0-255) for 2D
            images, NIfTI for volumes (<case>_lesion.nii.gz, 0-255 scaled to 0..1 by the header's slope).
        tta: flip test-time augmentation; None: as the checkpoint's training run asked (train.py --tta).
        overwrite: replace existing files infer.py did not write, and redo cases already done.
        series: the SeriesInstanceUID to read from a DICOM input holding several series.
        lungs: volumes' lung mask: "auto" (the model's lung head, else from HU), "model" or "hu".
        dicom_seg: DICOM series also get <case>_seg.dcm, their masks as a DICOM SEG referencing the series.
        lesion: a lesion-types checkpoint writes "types" (label masks, one probability map per type) or "any"
            (the union, as a binary model's masks); a binary checkpoint writes binary masks either way.
    Returns the written mask paths (for a folder: of every done case, skipped ones included).
    """
    src = Path(input)
    if not src.exists():
        raise InputError(f"{src}: input not found")
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"--threshold must be in [0, 1], got {threshold}")
    if lesion not in LESION_MODES:
        raise InputError(f"--lesion must be one of {', '.join(LESION_MODES)}, got {lesion!r}")
    volumes = volume_inputs(src)
    if src.is_file() and not volumes and src.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{src}: not an image ({'/'.join(IMAGE_SUFFIXES)}), NIfTI (.nii, .nii.gz) or DICOM "
                         f"(.zip, or a folder) input")
    if series is not None and not volumes:
        raise InputError(f"{src}: --series applies to DICOM input (a folder or a .zip of DICOM files) only")
    if dicom_seg and not volumes:
        raise InputError(f"--dicom-seg needs DICOM input (a folder or .zip of DICOM files): {src} is not a volume")
    if save_probs:
        check_disjoint(save_probs, [src], "--save-probs")
    if volumes or src.is_dir():
        out = Path(output) if output else Path("predictions")
        check_disjoint(out, [src], "--output")
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: --output is an existing file, not a folder; choose another --output")
        paths = [] if volumes else image_files(src)
    predictor = Predictor(checkpoint, device, amp, batch_size, tta)
    if volumes:
        batch = src.is_dir() and volumes != [src]  # a DICOM folder is one scan
        return infer_volumes(predictor, volumes, out, threshold, checkpoint, progress, overwrite, batch, series, lungs,
                             dicom_seg, lesion, save_probs)
    note = image_files_note(predictor.prep)
    if note:
        print(note)
    if src.is_dir():
        return infer_image_folder(predictor, paths, out, threshold, checkpoint, save_probs, progress, overwrite,
                                  lesion)
    return infer_image(predictor, src, output, threshold, save_probs, overwrite, lesion)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=["checkpoints/best_model.pth"],
                   help="one checkpoint, or several whose probabilities are averaged (e.g. fold models)")
    p.add_argument("--input", required=True,
                   help="PNG/JPG slice, folder of slices, NIfTI volume, DICOM series (folder or .zip) or folder of volumes")
    p.add_argument("--series", default=None, metavar="UID",
                   help="DICOM input holding several CT series: the SeriesInstanceUID to read (they are listed)")
    p.add_argument("--lungs", choices=("auto", "model", "hu"), default="auto",
                   help="volumes' lung mask: the model's lung head (model), extracted from HU without training "
                        "(hu), or the model's when it has one, else HU (auto)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="DICOM series: also write OUT/<case>_seg.dcm, the masks as a DICOM SEG referencing the "
                        "series (opens over the scan in 3D Slicer and OHIF)")
    p.add_argument("--output", default=None,
                   help="mask file for one slice (default prediction_mask.png), else a folder (default predictions/)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="lesion (any type) where its probability is above this")
    p.add_argument("--lesion", choices=LESION_MODES, default="types",
                   help="lesion-types checkpoint: label masks of the types (types: 0 background, 1 ground-glass "
                        "opacity, 2 consolidation) or the union of the types as binary masks (any)")
    p.add_argument("--save-probs", default=None, metavar="DIR",
                   help="also write the probability maps, named like the masks, to DIR (not --output's folder): "
                        "8-bit PNGs (0-255) for slices, DIR/<case>_lesion.nii.gz for volumes (8-bit, shown as 0..1); "
                        "with a lesion-types checkpoint one per type, DIR/ggo/<name> and DIR/consolidation/<name>")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation, 4 passes (default: as the checkpoint was trained to use)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs infer.py did not write, and redo cases already done")
    return add_runtime_args(p)


def main(args: argparse.Namespace) -> list[Path]:
    return infer(args.checkpoint, args.input, args.output, args.threshold, args.device, args.amp,
                 args.batch_size, args.progress, args.save_probs, args.tta, args.overwrite, args.series, args.lungs,
                 args.dicom_seg, args.lesion)


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
