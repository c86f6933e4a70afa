"""Shared fixtures: tiny NIfTI volumes in the public layouts, image-mask pair folders, and one small
preprocessed + split folder (``tiny_processed``) for tests that need training data.

Everything is small enough to check by hand and to run in a few seconds on two CPU cores.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Real data sits beside the repo and is absent on a fresh clone: tests that use it skip.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Voxel axes towards patient Left, Posterior, Superior (as DICOM-derived files and data.synthetic):
# an affine that is not the identity, so orientation handling is always exercised.
LPS_AFFINE = np.diag([-0.7, -0.7, 2.5, 1.0])

# Folder names of the per-case layouts: (image folder, lung-mask folder, lesion-mask folder, file name of case i)
LAYOUTS = {
    "default": ("images", "lung_masks", "lesion_masks", lambda i: f"case_{i:03d}.nii.gz"),
    "ma2020": ("COVID-19-CT-Seg_20cases", "Lung_Mask", "Infection_Mask", lambda i: f"coronacases_{i + 1:03d}.nii.gz"),
    "medseg_radiopaedia": ("rp_im", "rp_lung_msk", "rp_msk", lambda i: f"{i + 1}.nii.gz"),
}


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs a worker per core) each worker, and every process it starts, uses
    one thread: workers with torch's default of a thread per core would fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch
        torch.set_num_threads(1)


def save_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` as a NIfTI file with its own dtype (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), LPS_AFFINE if affine is None else np.asarray(affine, float))
    img.header.set_data_dtype(np.asarray(data).dtype)
    nib.save(img, str(path))
    return path


def tiny_case(seed: int, shape=(32, 32, 4)) -> dict:
    """One hand-made case: int16 HU image, lung labels (1 left / 2 right half), lesion labels 1 and 2.

    The lesion of case ``seed`` has ``seed + 2`` voxels of label 1 in its first slice and 3 voxels of label 2
    in its last, so cases are told apart by their lesion counts and every label value is present.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    image = rng.integers(-1024, 600, size=shape).astype(np.int16)
    lung = np.zeros(shape, np.uint8)
    lung[2:nx // 2, 2:ny - 2] = 1
    lung[nx // 2:nx - 2, 2:ny - 2] = 2
    lesion = np.zeros(shape, np.uint8)
    lesion[4, 4:4 + seed + 2, 0] = 1
    lesion[nx - 5, 4:7, nz - 1] = 2
    return {"image": image, "lung": lung, "lesion": lesion}


@pytest.fixture
def write_nifti():
    """``write_nifti(path, data, affine=None) -> path``: save a volume (default affine LPS_AFFINE)."""
    return save_nifti


@pytest.fixture
def make_volume_dir():
    """Factory writing tiny cases in a folder layout of data.preprocess.

    ``make_volume_dir(root, n_cases=2, shape=(32, 32, 4), layout="default", lung=True, lesion=True,
    affine=None, seed=0) -> root``. Case i is ``tiny_case(seed + i, shape)``; ``layout`` is a key of LAYOUTS
    (file names: case_000.nii.gz, coronacases_001.nii.gz or 1.nii.gz). ``lung``/``lesion`` False leave that
    mask folder out.
    """
    def make(root, n_cases: int = 2, shape=(32, 32, 4), layout: str = "default", lung: bool = True,
             lesion: bool = True, affine=None, seed: int = 0) -> Path:
        root = Path(root)
        img_dir, lung_dir, lesion_dir, file_name = LAYOUTS[layout]
        for i in range(n_cases):
            case = tiny_case(seed + i, shape)
            name = file_name(i)
            save_nifti(root / img_dir / name, case["image"], affine)
            if lung:
                save_nifti(root / lung_dir / name, case["lung"], affine)
            if lesion:
                save_nifti(root / lesion_dir / name, case["lesion"], affine)
        return root
    return make


@pytest.fixture
def make_pair_folder():
    """Factory writing 2D image-mask pairs: ``make_pair_folder(image_dir, mask_dir, n=4, size=(40, 24),
    mask_suffix="", image_ext=".png") -> list of (image path, mask path, mask array {0,1})``.

    Image i is an 8-bit gradient; its 0/255 mask is a rectangle of i + 1 rows (so pairs are told apart).
    """
    def make(image_dir, mask_dir, n: int = 4, size=(40, 24), mask_suffix: str = "", image_ext: str = ".png"):
        image_dir, mask_dir = Path(image_dir), Path(mask_dir)
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        w, h = size
        out = []
        for i in range(n):
            img = (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)
            mask = np.zeros((h, w), np.uint8)
            mask[2:3 + i, 3:w // 2] = 1
            ip, mp = image_dir / f"{i}{image_ext}", mask_dir / f"{i}{mask_suffix}.png"
            Image.fromarray(img).save(ip)
            Image.fromarray(mask * 255).save(mp)
            out.append((ip, mp, mask))
        return out
    return make


def run_module(module: str, *args: str, wait: bool = True):
    """Run ``python -m module args`` from the repo root as the user would; a Popen when ``wait`` is False."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture
def cli():
    """``cli("data.preprocess", "--src", ...)`` -> CompletedProcess (cwd = repo root, text output)."""
    return run_module


@pytest.fixture(scope="session")
def tiny_processed(tmp_path_factory) -> Path:
    """A preprocessed + split folder, as train.py reads it: images.npy, lung_masks.npy, lesion_masks.npy
    (N, 64, 64), meta.json, splits.json with 2 train / 1 val / 1 test patients, from 4 data.synthetic
    phantoms (seed 0) of 64x64x8 voxels (N = 32); a broken generator fails every test that uses it.
    Shared by the session: treat it as read-only.
    """
    from data.preprocess import preprocess
    from data.split_data import split_preprocessed
    from data.synthetic import generate_dataset

    base = tmp_path_factory.mktemp("tiny")
    generate_dataset(base / "volumes", 4, seed=0, shape=(64, 64, 8))
    out = base / "processed"
    preprocess(base / "volumes", out, size=64, workers=1, progress=False)
    split_preprocessed(out, val=0.25, test=0.25, by="patient", seed=0)
    return out
