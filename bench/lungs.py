"""Lungs from HU (utils/lungs.py) against the phantoms' lung masks, on the real chest CT, and its speed.

    python bench/lungs.py [--seeds 8] [--json]

Phantoms: data.synthetic patients at 256x256x32 (seeds 0..N-1, patient 0 each): Dice of each lung and of
both, over the volume and the worst slice, with the phantom's lesions given as the predicted lesions; and
the share of the airway's lumen (data.synthetic.airway_lumen) counted as lung, above the carina (where the
lumen is one piece: the trachea) and in all.
Real CT: ../shared/data/real-ct/chest_ct_crop.nii.gz (no masks: volumes only). Speed: a 512x512x300
phantom (a 512x512x30 one repeated along z).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.readers import read_case  # noqa: E402
from data.synthetic import airway_lumen, generate_patient, trachea_slices  # noqa: E402
from data.transforms import to_axial_slices  # noqa: E402
from utils.lungs import extract_lungs  # noqa: E402

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct" / "chest_ct_crop.nii.gz"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    den = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / den if den else float("nan")


def phantom_scores(seed: int) -> dict:
    p = generate_patient(np.random.default_rng([seed, 0]), (256, 256, 32))
    hu, truth, lesion = (to_axial_slices(p[k], p["affine"]) for k in ("image", "lung", "lesion"))
    got = extract_lungs(np.ascontiguousarray(hu, dtype=np.float32), p["spacing"], lesion > 0)
    per_slice = [dice(got[z] > 0, truth[z] > 0) for z in range(len(truth)) if truth[z].any()]
    lumen = airway_lumen(hu, truth)
    trachea = trachea_slices(lumen)
    return {"seed": seed, "dice": dice(got > 0, truth > 0), "dice_left": dice(got == 1, truth == 1),
            "dice_right": dice(got == 2, truth == 2), "worst_slice": min(per_slice),
            "lesion_inside": float(((got > 0) & (lesion > 0)).sum() / (lesion > 0).sum()) if lesion.any() else None,
            "trachea_as_lung": float((got[trachea] > 0)[lumen[trachea]].mean()),
            "airway_as_lung": float((got > 0)[lumen].mean())}


def main(args: argparse.Namespace) -> dict:
    res = {"phantoms": [phantom_scores(s) for s in range(args.seeds)]}
    for r in res["phantoms"]:
        print(f"phantom seed {r['seed']}: Dice {r['dice']:.3f} (left {r['dice_left']:.3f}, right "
              f"{r['dice_right']:.3f}), worst slice {r['worst_slice']:.3f}, "
              + (f"lesion voxels inside the lungs {r['lesion_inside']:.2f}" if r["lesion_inside"] is not None
                 else "no lesion") + f"; airway lumen counted as lung: above the carina "
              f"{r['trachea_as_lung']:.2f}, in all {r['airway_as_lung']:.2f}")
    if REAL_CT.is_file():
        vol = read_case(REAL_CT)
        t0 = time.perf_counter()
        lungs = extract_lungs(vol.image, vol.spacing)
        seconds = time.perf_counter() - t0
        res["real_ct"] = {"left_ml": float((lungs == 1).sum()) * vol.voxel_ml,
                          "right_ml": float((lungs == 2).sum()) * vol.voxel_ml,
                          "slices_with_both": int(((lungs == 1).any((1, 2)) & (lungs == 2).any((1, 2))).sum()),
                          "n_slices": int(len(lungs)), "seconds": seconds}
        r = res["real_ct"]
        print(f"{REAL_CT.name}: left {r['left_ml']:.0f} mL, right {r['right_ml']:.0f} mL, both lungs on "
              f"{r['slices_with_both']} of {r['n_slices']} slices, {seconds:.1f} s")
    p = generate_patient(np.random.default_rng([7, 0]), (512, 512, 30))
    hu = np.ascontiguousarray(np.tile(to_axial_slices(p["image"], p["affine"]), (10, 1, 1)), dtype=np.float32)
    t0 = time.perf_counter()
    extract_lungs(hu, p["spacing"])
    res["seconds_512x512x300"] = time.perf_counter() - t0
    print(f"512x512x300: {res['seconds_512x512x300']:.1f} s")
    if args.json:
        print(json.dumps(res))
    return res


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--json", action="store_true")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
