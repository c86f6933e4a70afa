"""Seeded train/val/test splits, by patient (default) or by slice, written once and reused.

    python -m data.split_data --data data/processed [--val 0.15] [--test 0.15] [--by patient|slice] [--seed 0]
        -> data/processed/splits.json = {"by": "patient", "seed": 0, "train": [case ids], "val": [...], "test": [...]}
    python -m data.split_data --pairs FOLDER --out DEST [--val 0.15] [--seed 0]
        -> copies a folder of image-mask pairs into DEST/train_images, train_masks, val_images, val_masks
           and DEST/split.json (seed, source, file lists; it marks DEST as replaceable by a rerun)

Split by patient unless you have a reason not to: ``--by slice`` (the seed code's random 70/15/15 over
slices) puts neighbouring, nearly identical slices of one patient in both train and test, which inflates
test scores.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from data.dataset import find_pair_dirs, pair_files
from data.transforms import InputError
from base import atomic_write, check_disjoint, check_replaceable_dir, partial_dir, replace_dir

PAIR_SPLIT_MARKER = "split.json"  # what split_pair_folder leaves in DEST; a rerun may replace such a folder


def _counts(n: int, val: float, test: float) -> tuple[int, int]:
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise InputError(f"--val {val} --test {test}: need 0 <= val, test and val + test < 1")
    n_test = int(round(n * test)) if test > 0 else 0
    n_val = int(round(n * val)) if val > 0 else 0
    # a non-zero fraction gets at least one item while the training part keeps at least one
    if test > 0 and n_test == 0 and n - n_val > 1:
        n_test = 1
    if val > 0 and n_val == 0 and n - n_test > 1:
        n_val = 1
    if n - n_val - n_test < 1:
        raise InputError(f"{n} items cannot be split into train/val/test with val={val} test={test}")
    return n_val, n_test


def _allocate(n: int, sizes: list[int]) -> list[int]:
    """Split n items over strata in proportion to their sizes (largest remainder; ties go to the first)."""
    quotas = [n * k / sum(sizes) for k in sizes]
    take = [min(int(q), k) for q, k in zip(quotas, sizes)]
    for i in sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - int(quotas[i])), i)):
        if sum(take) == n:
            break
        if take[i] < sizes[i]:
            take[i] += 1
    return take


def make_splits(cases: list[str], val: float = 0.15, test: float = 0.15, by: str = "patient",
                seed: int = 0, positive: set[str] | None = None) -> dict:
    """Split the slices of a preprocessed set, given their case ids in row order.

    Args:
        cases: case id of every slice row (meta.json ``slices``).
        by: "patient" -> lists of case ids; "slice" -> lists of row indices.
        positive: case ids that have lesion. When given, the split is stratified: patients with and without
            lesion are spread over train/val/test in proportion, so that (with enough patients) validation
            and test both contain lesions and a validation Dice exists.
    Returns:
        {"by", "seed", "stratified", "train", "val", "test"}; sorted, disjoint lists covering every item.
    """
    if by == "patient":
        items = sorted(set(cases))
        label = {c: c in positive for c in items} if positive is not None else None
    elif by == "slice":
        items = list(range(len(cases)))
        label = {i: cases[i] in positive for i in items} if positive is not None else None
    else:
        raise InputError(f"--by must be 'patient' or 'slice', got {by!r}")
    n_val, n_test = _counts(len(items), val, test)
    rng = np.random.default_rng(seed)
    shuffled = [items[i] for i in rng.permutation(len(items))]
    strata = [[x for x in shuffled if label[x]], [x for x in shuffled if not label[x]]] if label else [shuffled]
    strata = [s for s in strata if s]
    parts = {}
    for name, n in (("test", n_test), ("val", n_val)):
        take = _allocate(n, [len(s) for s in strata])
        parts[name] = sorted(x for s, k in zip(strata, take) for x in s[:k])
        strata = [s[k:] for s, k in zip(strata, take)]
    parts["train"] = sorted(x for s in strata for x in s)
    return {"by": by, "seed": seed, "stratified": "lesion present" if label else None, **parts}


def kfold(n: int, k: int, seed: int = 0) -> list[list[int]]:
    """Seeded K-fold partition of ``n`` items: k disjoint, sorted index lists of near-equal size covering 0..n-1."""
    if not 2 <= k <= n:
        raise InputError(f"--folds {k} needs 2 <= folds <= the number of items ({n})")
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, k)]


def write_json(path: Path, obj) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def split_preprocessed(data: str | Path, val: float = 0.15, test: float = 0.15, by: str = "patient",
                       seed: int = 0) -> dict:
    """Write ``data/splits.json`` for a folder made by data.preprocess, stratified by lesion presence when
    the folder has lesion masks; returns the splits."""
    data = Path(data)
    meta_path = data / "meta.json"
    if not meta_path.is_file():
        raise InputError(f"{data}: no meta.json; run `python -m data.preprocess --out {data}` first")
    meta = json.loads(meta_path.read_text())
    cases = [s["case"] for s in meta["slices"]]
    positive = None
    if meta.get("masks", {}).get("lesion"):
        positive = {c for c, e in meta["cases"].items() if any(v > 0 for v in e.get("lesion_label_values", []))}
    splits = make_splits(cases, val, test, by, seed, positive)
    write_json(data / "splits.json", splits)
    return splits


def written_by_split(folder: str | Path) -> bool:
    """Whether ``folder`` holds the split.json that split_pair_folder writes, so that a rerun may replace it."""
    try:
        record = json.loads((Path(folder) / PAIR_SPLIT_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("written_by") == "data.split_data"


def split_pair_folder(src: str | Path, dest: str | Path, val: float = 0.15, seed: int = 0,
                      overwrite: bool = False) -> dict:
    """Copy a folder of image-mask pairs into DEST/{train,val}_{images,masks} (a seeded split by file).

    DEST may be absent, empty or an earlier split of this function (it holds split.json); any other folder
    is replaced only with ``overwrite``, and never one that is or holds the source. DEST inside the source
    is allowed: pair folders are found without recursion, so the split is never read back as source.
    Returns {"train": [image names], "val": [image names]}.
    """
    dirs = find_pair_dirs(src)
    if dirs is None:
        raise InputError(f"{src}: no image-mask pair folders (train_images/ + train_masks/, or Imgs/ + GT/)")
    check_disjoint(dest, [src, *dirs], "--out")
    check_replaceable_dir(dest, written_by_split, overwrite, "--out", "data.split_data")
    pairs = pair_files(*dirs)
    n_val, _ = _counts(len(pairs), val, 0.0)
    order = np.random.default_rng(seed).permutation(len(pairs))
    parts = {"val": [pairs[i] for i in sorted(order[:n_val])], "train": [pairs[i] for i in sorted(order[n_val:])]}
    dest = Path(dest)
    names = {part: [img.name for img, _ in items] for part, items in parts.items()}
    # build the split aside and swap it in: a re-split never leaves an earlier split's files behind
    final, tmp = partial_dir(dest)
    try:
        for part, items in parts.items():
            for kind in ("images", "masks"):
                (tmp / f"{part}_{kind}").mkdir()
            for img, mask in items:
                shutil.copy2(img, tmp / f"{part}_images" / img.name)
                shutil.copy2(mask, tmp / f"{part}_masks" / f"{img.stem}{mask.suffix}")
        write_json(tmp / PAIR_SPLIT_MARKER, {"written_by": "data.split_data", "source": str(src), "seed": seed,
                                             "val_fraction": val, **names})
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/processed", help="preprocessed folder (gets splits.json)")
    p.add_argument("--pairs", default=None, help="instead: a folder of image-mask pairs to split into --out")
    p.add_argument("--out", default=None, help="destination folder for --pairs (replaced if empty or an "
                                                  "earlier split, i.e. it holds split.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if data.split_data did not write it (never a folder holding --pairs)")
    p.add_argument("--val", type=float, default=0.15)
    p.add_argument("--test", type=float, default=0.15)
    p.add_argument("--by", choices=("patient", "slice"), default="patient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(args: argparse.Namespace) -> dict:
    if args.pairs:
        if not args.out:
            raise InputError("--pairs needs --out DEST")
        parts = split_pair_folder(args.pairs, args.out, args.val, args.seed, overwrite=args.overwrite)
        print(f"split {args.pairs}: {len(parts['train'])} train / {len(parts['val'])} val pairs -> {args.out}/")
        return parts
    splits = split_preprocessed(args.data, args.val, args.test, args.by, args.seed)
    unit = "patients" if args.by == "patient" else "slices"
    print(f"wrote {args.data}/splits.json by {args.by}: "
          + " / ".join(f"{len(splits[k])} {k}" for k in ("train", "val", "test")) + f" {unit}")
    if args.by == "slice":
        print("note: a slice-wise split puts neighbouring slices of one patient in several splits (leakage)")
    return splits


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
