"""NIfTI CT volumes -> normalised 256x256 axial slice arrays + meta.json (one offline step).

    python -m data.preprocess --src data/synthetic --out data/processed [--size 256]
                              [--norm minmax|window] [--window -1000 400] [--workers 2] [--overwrite]

Reads any of these layouts under --src (several may sit side by side):
    images/ lung_masks/ lesion_masks/                      this repo's phantoms (and the seed layout)
    COVID-19-CT-Seg_20cases/ Lung_Mask/ Infection_Mask/    Ma et al. 2020, Zenodo 3757476
    rp_im/ rp_lung_msk/ rp_msk/                            MedSeg, Radiopaedia volumes
    tr_im.nii.gz tr_mask.nii.gz [tr_lungmasks_updated.nii.gz]   MedSeg, 100 slices of ~40 patients
    *.nii(.gz) directly in --src, or --src a single file   images without masks (for inference)
Masks are matched to images by file name. Writes OUT/images.npy (N,S,S) float32 in [0,1],
OUT/lung_masks.npy and OUT/lesion_masks.npy (N,S,S) uint8 in {0,1} (when the layout has them) and
OUT/meta.json, all built in a temporary folder that replaces OUT only once complete. OUT may be absent,
empty or an earlier output of data.preprocess; any other folder is refused unless --overwrite is given,
and a file, or an OUT that is or holds --src or one of its volumes, is refused even then.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from data.transforms import (DEFAULT_WINDOW, NORMS, InputError, case_name, check_mask_header, is_nifti,
                             load_nifti, make_preprocessing, prepare_slices, read_mask_volume,
                             read_volume_data, resize_masks, to_axial_slices, voxel_spacing, warn_if_not_ct)
from base import check_disjoint, check_replaceable_dir, replace_dir

# Folder layouts: (image folder, lung-mask folder, lesion-mask folder); masks pair by file name.
FOLDER_LAYOUTS = {
    "default": ("images", "lung_masks", "lesion_masks"),
    "ma2020": ("COVID-19-CT-Seg_20cases", "Lung_Mask", "Infection_Mask"),
    "medseg_radiopaedia": ("rp_im", "rp_lung_msk", "rp_msk"),
}
MEDSEG_TR = ("tr_im.nii.gz", "tr_lungmasks_updated.nii.gz", "tr_mask.nii.gz")
LESION_LABEL_NAMES = {  # documented label meanings per layout (values > 0 all count as lesion by default)
    "default": {"1": "ground-glass opacity", "2": "consolidation"},
    "ma2020": {"1": "infection"},
    "medseg_radiopaedia": {"1": "ground-glass opacity", "2": "consolidation", "3": "pleural effusion"},
    "medseg_tr": {"1": "ground-glass opacity", "2": "consolidation", "3": "pleural effusion"},
    "images_only": {},
}


@dataclass
class Case:
    name: str
    layout: str
    image: Path
    lung: Path | None = None
    lesion: Path | None = None


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _mask_for(image: Path, folder: Path, kind: str) -> Path:
    for cand in (folder / image.name, folder / (case_name(image) + ".nii.gz"), folder / (case_name(image) + ".nii")):
        if cand.is_file():
            return cand
    raise InputError(f"{image}: image without its {kind} mask (expected {folder / image.name})")


def find_cases(src: str | Path) -> list[Case]:
    """List the volumes under ``src`` in every known layout, each image paired with its masks.

    Raises InputError when nothing is found, an image lacks its mask, or two cases share a name.
    """
    src = Path(src)
    if src.is_file():
        return [Case(case_name(src), "images_only", src)]
    if not src.is_dir():
        raise InputError(f"{src}: no such file or folder")
    cases: list[Case] = []
    for layout, (img_dir, lung_dir, lesion_dir) in FOLDER_LAYOUTS.items():
        if not (src / img_dir).is_dir():
            continue
        for image in _nifti_files(src / img_dir):
            lung = _mask_for(image, src / lung_dir, "lung") if (src / lung_dir).is_dir() else None
            lesion = _mask_for(image, src / lesion_dir, "lesion") if (src / lesion_dir).is_dir() else None
            cases.append(Case(case_name(image), layout, image, lung, lesion))
    tr_img, tr_lung, tr_lesion = (src / f for f in MEDSEG_TR)
    if tr_img.is_file():
        if not tr_lesion.is_file():
            raise InputError(f"{tr_img}: image without its lesion mask (expected {tr_lesion})")
        cases.append(Case("tr_im", "medseg_tr", tr_img, tr_lung if tr_lung.is_file() else None, tr_lesion))
    if not cases:  # NIfTI files directly in src: images without masks
        known = {f for f in MEDSEG_TR}
        cases = [Case(case_name(p), "images_only", p) for p in _nifti_files(src) if p.name not in known]
    if not cases:
        raise InputError(f"{src}: no NIfTI volumes found (expected images/*.nii.gz, another known layout, "
                         f"or .nii/.nii.gz files; run `python -m data.synthetic --out {src}` for phantoms)")
    names = [c.name for c in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{src}: several volumes share the case name(s) {dup[:5]}")
    for kind in ("lung", "lesion"):
        has = {getattr(c, kind) is not None for c in cases}
        if len(has) > 1:
            missing = [c.image for c in cases if getattr(c, kind) is None][:3]
            raise InputError(f"{src}: some volumes have {kind} masks and some do not, e.g. {missing[0]}")
    return cases


def _check_headers(case: Case) -> int:
    """Check a case's files without reading voxels; return its number of axial slices."""
    img = load_nifti(case.image, "image")
    for kind, path in (("lung mask", case.lung), ("lesion mask", case.lesion)):
        if path is not None:  # the header part of read_mask_volume, so a bad mask fails before any work
            check_mask_header(load_nifti(path, kind), img, path, kind)
    # axial slices run along the voxel axis that io_orientation maps to world z (inferior-superior)
    z_axis = int(np.flatnonzero(nib.io_orientation(img.affine)[:, 0] == 2)[0])
    return int(img.shape[z_axis])


def _read_mask(path: Path, img, kind: str) -> tuple[np.ndarray, list[int]]:
    """A mask's axial slices (uint8 labels) and the label values it holds, checked against its image."""
    return read_mask_volume(path, img, kind)


def process_case(case: Case, prep: dict, out: str, start: int, lesion_labels: list[int] | None) -> dict:
    """Preprocess one volume into rows ``start:start+Z`` of the memory-mapped arrays in ``out``.

    Runs in a worker process: it holds one volume at a time, so memory stays bounded whatever the set size.
    Returns the case's meta.json entry.
    """
    out = Path(out)
    img = load_nifti(case.image, "image")
    data = read_volume_data(img, case.image, "image")
    warn_if_not_ct(img, data, case.image, prep)
    slices = to_axial_slices(data, img.affine)
    n = slices.shape[0]
    images = np.load(out / "images.npy", mmap_mode="r+")
    images[start:start + n] = prepare_slices(slices, prep).numpy()
    images.flush()
    entry = {"image": str(case.image), "layout": case.layout, "spacing": voxel_spacing(img),
             "shape": [int(s) for s in img.shape], "affine": img.affine.tolist(), "rows": [start, start + n]}
    for kind, path in (("lung", case.lung), ("lesion", case.lesion)):
        if path is None:
            continue
        labels, values = _read_mask(path, img, f"{kind} mask")
        binary = np.isin(labels, lesion_labels) if (kind == "lesion" and lesion_labels) else labels > 0
        arr = np.load(out / f"{kind}_masks.npy", mmap_mode="r+")
        arr[start:start + n] = resize_masks(binary, prep["size"]).numpy()
        arr.flush()
        entry[f"{kind}_mask"] = str(path)
        entry[f"{kind}_label_values"] = values
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
    counts = [_check_headers(c) for c in cases]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    total = int(starts[-1])
    final = Path(out).resolve()  # a name to build beside, also for "." or a path ending in ".."
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        msg = f"{out}: cannot create the output folder there ({e.strerror}); choose another --out"
        raise InputError(msg) from None
    try:
        S = prep["size"]
        np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float32, (total, S, S)).flush()
        for kind in ("lung", "lesion"):
            if getattr(cases[0], kind) is not None:
                np.lib.format.open_memmap(tmp / f"{kind}_masks.npy", "w+", np.uint8, (total, S, S)).flush()
        jobs = [(c, prep, str(tmp), int(s), lesion_labels) for c, s in zip(cases, starts[:-1])]
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
        layouts = sorted({c.layout for c in cases})
        meta = {
            "preprocessing": prep,
            "orientation": "RAS+ canonical; axial slices inferior to superior, anterior up, patient right on image left",
            "masks": {"lung": cases[0].lung is not None, "lesion": cases[0].lesion is not None},
            "label_mapping": {
                "lesion": f"label in {lesion_labels}" if lesion_labels else "label > 0",
                "lung": "label > 0",
                "source_labels": {lay: LESION_LABEL_NAMES[lay] for lay in layouts},
            },
            "cases": {c.name: entries[c.name] for c in cases},
            "slices": [{"case": c.name, "z": z} for c, n in zip(cases, counts) for z in range(n)],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


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
