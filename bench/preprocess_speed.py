"""Preprocessing throughput: one 512x512x300 CT volume, and a set of volumes with parallel workers.

    python bench/preprocess_speed.py [--volumes 4] [--slices 300] [--workers 2] [--json]

The volumes are synthetic phantoms (512x512 in-plane, life-size), gzip-compressed int16 NIfTI with lung
and lesion masks, as a real dataset is. Times include reading, decompressing, reorienting, normalising,
resizing to 256x256 and writing the arrays.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.preprocess import preprocess  # noqa: E402
from data.synthetic import generate_patient  # noqa: E402


def write_volumes(root: Path, volumes: int, slices: int) -> None:
    """Phantoms of 512x512x``slices``: a 512x512x30 phantom repeated along z (generating 300 slices is slow)."""
    for sub in ("images", "lung_masks", "lesion_masks"):
        (root / sub).mkdir(parents=True)
    for i in range(volumes):
        p = generate_patient(np.random.default_rng([7, i]), shape=(512, 512, 30))
        reps = -(-slices // 30)
        for sub, key in (("images", "image"), ("lung_masks", "lung"), ("lesion_masks", "lesion")):
            data = np.tile(p[key], (1, 1, reps))[:, :, :slices]
            nib.save(nib.Nifti1Image(data, p["affine"]), root / sub / f"vol_{i:02d}.nii.gz")


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_volumes(tmp / "one", 1, args.slices)
        write_volumes(tmp / "set", args.volumes, args.slices)
        t0 = time.perf_counter()
        preprocess(tmp / "one", tmp / "out1", workers=1, progress=False)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        meta = preprocess(tmp / "set", tmp / "outN", workers=args.workers, progress=False)
        many = time.perf_counter() - t0
    n = len(meta["slices"])
    res = {"volume_shape": [512, 512, args.slices], "seconds_one_volume_1_worker": one,
           "slices_per_s_one_volume": args.slices / one, "volumes": args.volumes, "workers": args.workers,
           "seconds_set": many, "slices_per_s_set": n / many}
    print(f"one 512x512x{args.slices} volume, 1 worker: {one:.1f} s ({args.slices / one:.0f} slices/s)")
    print(f"{args.volumes} volumes ({n} slices), {args.workers} workers: {many:.1f} s ({n / many:.0f} slices/s)")
    if args.json:
        print(json.dumps(res))
    return res


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volumes", type=int, default=4)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
