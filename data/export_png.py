"""Export slices of a preprocessed folder as 8-bit PNG image-mask pairs.

    python -m data.export_png --data data/processed --split test --out data/examples [--n 4]

Writes OUT/images/<case>_z<z>.png and OUT/masks/<case>_z<z>.png (0/255), choosing the slices with the
most lesion: sample inputs for infer.py, and a folder of pairs that evaluate.py and train.py read.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data.dataset import SliceArrayDataset
from utils.helpers import mask_to_png, save_png


def export_pngs(data: str | Path, split: str | None, out: str | Path, n: int = 4) -> list[Path]:
    """Write the ``n`` slices of a split with the largest lesion area as PNG pairs; returns the image paths."""
    ds = SliceArrayDataset(data, split, "lesion")
    area = np.array([int(ds.mask("lesion", r).sum()) for r in ds.rows])
    chosen = np.argsort(-area, kind="stable")[:n]
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    written = []
    for i in sorted(chosen):
        row = ds.rows[i]
        name = f"{ds.cases[row]}_z{ds.meta['slices'][row]['z']:03d}.png"
        save_png((np.clip(ds.images[row], 0, 1) * 255).round().astype(np.uint8), out / "images" / name)
        save_png(mask_to_png(ds.mask("lesion", row)), out / "masks" / name)
        written.append(out / "images" / name)
    return written


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/processed")
    p.add_argument("--split", default="test", help="split of splits.json ('all' for every slice)")
    p.add_argument("--out", default="data/examples")
    p.add_argument("--n", type=int, default=4, help="number of slices (those with the most lesion)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    written = export_pngs(args.data, None if args.split == "all" else args.split, args.out, args.n)
    print(f"wrote {len(written)} PNG pairs to {args.out}/images and {args.out}/masks")
    return written


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
