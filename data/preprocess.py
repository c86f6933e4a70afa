"""NIfTI CT volumes -> normalised 256x256 axial slice arrays + meta.json (one offline step).

    python -m data.preprocess --src data/synthetic --out data/processed [--size 256]
                              [--norm minmax|window] [--window -1000 400] [--workers 2] [--overwrite]

Reads any of these layouts under --src (several may sit side by side):
    images/ lung_masks/ lesion_masks/                      this repo's phantoms (and the seed layout)
    COVID-19-CT-Seg_20cases/ Lung_Mask/ Infection_Mask/    Ma et al. 2020, Zenodo 3757476
    rp_im/ rp_lung_msk/ rp_msk/                            MedSeg, Radiopaedia volumes
    tr_im.nii.gz tr_mask.nii.gz [tr_lungmasks_updated.nii.gz]   MedSeg, 100 slices of ~40 patients
    *.nii(.gz) directly in --src, or --src a single file   images without masks (for inference)
Volumes are found and read by data.readers. Writes OUT/images.npy (N,S,S) float32 in [0,1],
OUT/lung_masks.npy and OUT/lesion_masks.npy (N,S,S) uint8 holding the masks' original labels (when the
layout has them; meta.json's "labels" names them, and the task picks its targets from them at load time:
every lesion label > 0, or the --lesion-labels kept) and OUT/meta.json, all built in a temporary folder that replaces OUT only once complete. OUT may be absent,
empty or an earlier output of data.preprocess; any other folder is refused unless --overwrite is given,
and a file, or an OUT that is or holds --src or one of its volumes, is refused even then.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from base import check_disjoint, check_replaceable_dir, partial_dir, replace_dir
from data.labels import LESION_LABEL_NAMES, label_map
from data.readers import Case, find_cases, read_case
from data.transforms import DEFAULT_WINDOW, NORMS, make_preprocessing, prepare_slices, resize_masks

def process_case(case: Case, prep: dict, out: str, start: int) -> dict:
    """Preprocess one volume into rows ``start:start+Z`` of the memory-mapped arrays in ``out``.

    Runs in a worker process: it holds one volume at a time, so memory stays bounded whatever the set size.
    Returns the case's meta.json entry.
    """
    out = Path(out)
    vol = read_case(case.image, case.lung, case.lesion, prep)
    n = vol.image.shape[0]
    images = np.load(out / "images.npy", mmap_mode="r+")
    images[start:start + n] = prepare_slices(vol.image, prep).numpy()
    images.flush()
    entry = {"image": str(case.image), "layout": case.layout, "spacing": vol.spacing,
             "shape": list(vol.shape), "affine": vol.affine.tolist(), "rows": [start, start + n]}
    for kind, labels in vol.masks.items():
        # the original labels: which of them make a structure is the task's choice (data.labels)
        arr = np.load(out / f"{kind}_masks.npy", mmap_mode="r+")
        arr[start:start + n] = resize_masks(labels, prep["size"]).numpy()
        arr.flush()
        entry[f"{kind}_mask"] = str(getattr(case, kind))
        entry[f"{kind}_label_values"] = vol.label_values[kind]
    return entry


def _init_worker() -> None:
    torch.set_num_threads(1)  # one volume per worker process; the workers already use the cores


def written_by_preprocess(folder: str | Path) -> bool:
    """Whether ``folder`` is an output of data.preprocess: images.npy beside a meta.json that records the
    preprocessing (what preprocess() writes), so that a rerun may replace it."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "preprocessing" in meta and (folder / "images.npy").is_file()


def preprocess(src: str | Path, out: str | Path, size: int = 256, norm: str = "window",
               window=DEFAULT_WINDOW, workers: int = 2, lesion_labels: list[int] | None = None,
               progress: bool = True, overwrite: bool = False) -> dict:
    """Preprocess every volume under ``src`` into ``out``; returns the meta dict written to meta.json.

    ``out`` may be absent, empty or an earlier output of data.preprocess; any other folder is replaced only
    with ``overwrite``, and never one that is or holds ``src`` or one of its volumes. These checks run
    before any work.
    Raises InputError (naming the file and the problem) for bad input; ``out`` is then left untouched.
    """
    cases = find_cases(src)
    # the volumes too: an --out inside --src (src/images) may still hold them
    inputs = [src, *(p for c in cases for p in (c.image, c.lung, c.lesion) if p is not None)]
    check_disjoint(out, inputs, "--out")
    check_replaceable_dir(out, written_by_preprocess, overwrite, "--out", "data.preprocess")
    prep = make_preprocessing(size, norm, window)
    counts = [read_case(c.image, c.lung, c.lesion, voxels=False).n_slices for c in cases]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    total = int(starts[-1])
    final, tmp = partial_dir(out)
    try:
        S = prep["size"]
        np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float32, (total, S, S)).flush()
        for kind in ("lung", "lesion"):
            if getattr(cases[0], kind) is not None:
                np.lib.format.open_memmap(tmp / f"{kind}_masks.npy", "w+", np.uint8, (total, S, S)).flush()
        jobs = [(c, prep, str(tmp), int(s)) for c, s in zip(cases, starts[:-1])]
        entries = {}
        # None: a bar on a terminal only, and leave=False so an error line never follows half a bar
        with tqdm(total=len(cases), desc="preprocess", unit="vol", leave=False,
                  disable=None if progress else True) as bar:
            if workers <= 1 or len(cases) == 1:
                for job in jobs:
                    entries[job[0].name] = process_case(*job)
                    bar.update()
            else:
                # spawn, not fork: forking a process that has used torch's thread pool can deadlock
                with ProcessPoolExecutor(min(workers, len(cases)), mp_context=get_context("spawn"),
                                         initializer=_init_worker) as pool:
                    futures = {pool.submit(process_case, *job): job[0].name for job in jobs}
                    for fut in as_completed(futures):
                        entries[futures[fut]] = fut.result()
                        bar.update()
        meta = _meta(cases, entries, counts, prep, lesion_labels)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _meta(cases: list[Case], entries: dict, counts: list[int], prep: dict, lesion_labels: list[int] | None) -> dict:
    """The meta.json record: preprocessing, the label map and selection, the cases and the slice rows."""
    layouts = sorted({c.layout for c in cases})
    kinds = [k for k in ("lung", "lesion") if getattr(cases[0], k) is not None]
    present = {k: {v for e in entries.values() for v in e[f"{k}_label_values"]} for k in kinds}
    return {
        "preprocessing": prep,
        "orientation": "RAS+ canonical; axial slices inferior to superior, anterior up, patient right on image left",
        "masks": {"lung": cases[0].lung is not None, "lesion": cases[0].lesion is not None},
        # the masks keep the original labels; a task's targets are this view of them (data.labels)
        "labels": label_map(layouts, present),
        "lesion_labels": lesion_labels or None,
        "label_mapping": {
            "lesion": f"label in {lesion_labels}" if lesion_labels else "label > 0",
            "lung": "label > 0",
            "source_labels": {lay: LESION_LABEL_NAMES[lay] for lay in layouts},
        },
        "cases": {c.name: entries[c.name] for c in cases},
        "slices": [{"case": c.name, "z": z} for c, n in zip(cases, counts) for z in range(n)],
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="data/synthetic", help="folder of volumes (see layouts above) or one file")
    p.add_argument("--out", default="data/processed",
                   help="output folder, replaced when complete if empty or written by data.preprocess")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if data.preprocess did not write it (never a folder holding --src)")
    p.add_argument("--size", type=int, default=256, help="slice side after resizing")
    p.add_argument("--norm", choices=NORMS, default="window",
                   help="window: fixed HU window (default); minmax: per-slice min-max as the seed code")
    p.add_argument("--window", type=float, nargs=2, default=list(DEFAULT_WINDOW), metavar=("LOW", "HIGH"),
                   help="HU window for --norm window")
    p.add_argument("--lesion-labels", type=int, nargs="+", default=None,
                   help="lesion labels to keep (default: every label > 0; e.g. 1 2 drops MedSeg's effusion 3)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="volumes processed in parallel")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(args: argparse.Namespace) -> dict:
    meta = preprocess(args.src, args.out, args.size, args.norm, args.window, args.workers, args.lesion_labels,
                      overwrite=args.overwrite)
    n = len(meta["slices"])
    print(f"wrote {n} slices of {len(meta['cases'])} volumes to {args.out}/ "
          f"(images.npy{', lung_masks.npy' * meta['masks']['lung']}{', lesion_masks.npy' * meta['masks']['lesion']}, meta.json)")
    return meta


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
