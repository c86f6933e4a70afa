"""A checkpoint trained on image files, on real CT in HU: with the look it learned from, and without it.

    python bench/look_real.py --checkpoint runs/semiseg/*.pth [--out DIR] [--json]

For each real scan in ../shared/data/real-ct (the chest CT volume, and the two chest DICOM slices as one
series), the lesion model is run twice (data.look): with the checkpoint's recorded look (HU window and crop
of its training slices), and with the look removed (every full slice min-max normalised, as volume
inference did before looks were recorded). Lungs come from HU (utils.lungs), the predicted lesions added.
There are no lesion masks for these scans: the figures say where the predicted lesion lies (inside the lungs
or outside, where a lung-lesion model should find none), not how right it is. With --out, the montages of
both runs are written there.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.readers import read_case  # noqa: E402
from engine.batch import montage  # noqa: E402
from engine.predict import Predictor  # noqa: E402
from utils.lungs import extract_lungs  # noqa: E402
from utils.volumes import volume_report  # noqa: E402

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct"


def scans(work: Path) -> dict[str, Path]:
    """The real chest scans: the NIfTI volume, and a folder holding the two DICOM slices."""
    dicom = work / "chest_dicom"
    dicom.mkdir(exist_ok=True)
    for path in sorted(REAL_CT.glob("chest_slice_*.dcm")):
        shutil.copy(path, dicom / path.name)  # a temporary series folder, deleted at the end
    return {"chest_ct_crop": REAL_CT / "chest_ct_crop.nii.gz", "chest_dicom_2_slices": dicom}


def measure(predictor: Predictor, path: Path) -> tuple[dict, np.ndarray]:
    """Lesion inside and outside the HU lungs, in mL, and the montage."""
    volume, images, masks = predictor.predict_volume(read_case(path, prep=predictor.prep))
    lesion = masks["lesion"] > 0
    lung = extract_lungs(volume.image, lesion=lesion)
    report = volume_report(lesion, lung, volume.voxel_ml)
    outside = float((lesion & (lung == 0)).sum()) * volume.voxel_ml
    row = {"lesion_ml": round(report["lesion_ml"], 1), "lesion_outside_lungs_ml": round(outside, 1),
           "lung_ml": round(report["lung_ml"], 1), "infection_percent": round(report["infection_percent"], 2)}
    return row, montage(images, {"lesion": lesion.astype(np.uint8), "lung": (lung > 0).astype(np.uint8)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, help="a lesion checkpoint trained on image files")
    p.add_argument("--out", default=None, help="write the montages here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not REAL_CT.is_dir():
        sys.exit(f"error: {REAL_CT} not found (the real CT of ../shared/data)")
    with_look = Predictor(args.checkpoint, "cpu")
    if not with_look.prep.get("look"):
        sys.exit(f"error: {args.checkpoint[0]}: records no look (trained on volumes, or before looks were recorded)")
    without = Predictor(args.checkpoint, "cpu")
    without.prep = {k: v for k, v in without.prep.items() if k != "look"}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, path in scans(Path(work)).items():
            for label, predictor in (("look " + json.dumps(with_look.prep["look"]), with_look),
                                     ("full field, no look", without)):
                row, picture = measure(predictor, path)
                rows.append({"scan": name, "shown": label, **row})
                if args.out:
                    Path(args.out).mkdir(parents=True, exist_ok=True)
                    tag = "look" if predictor is with_look else "nolook"
                    Image.fromarray(picture).save(Path(args.out) / f"{name}_{tag}.png")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'scan':22s} {'lesion mL':>10s} {'outside lungs':>14s} {'lung mL':>9s} {'infection %':>12s}  shown")
    for r in rows:
        print(f"{r['scan']:22s} {r['lesion_ml']:10.1f} {r['lesion_outside_lungs_ml']:14.1f} {r['lung_ml']:9.1f} "
              f"{r['infection_percent']:12.2f}  {r['shown']}")


if __name__ == "__main__":
    main()
