"""The look of training slices (data.look): measured from image files, recorded in the checkpoint, and used
to present CT volumes to a model that learned from cropped 8-bit slices."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data.look import (CROP_MARGIN, LUNG_HU, SOFT_TISSUE_HU, crop_box, describe_images, estimate_window,
                       present_volume, restore_volume)
from data.readers import read_case
from data.synthetic import generate_dataset
from data.transforms import to_axial_slices
from tests.script_fixtures import run_script, run_train, train_argv

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SEMISEG = SHARED / "covid-semiseg" / "TrainingSet" / "LungInfection-Train" / "Doctor-label"
REAL_CT = SHARED / "real-ct"


def _gray(hu: np.ndarray, window) -> np.ndarray:
    low, high = window
    return np.round(255 * np.clip((hu - low) / (high - low), 0, 1)).astype(np.uint8)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict:
    """One 96x96x16 phantom: HU slices, lung and lesion label slices (display orientation), its file."""
    root = tmp_path_factory.mktemp("phantom")
    generate_dataset(root, patients=2, seed=3, shape=(96, 96, 16))
    image = sorted((root / "images").glob("*.nii.gz"))[0]
    img = nib.load(image)
    lung = np.asarray(nib.load(root / "lung_masks" / image.name).dataobj)
    return {"file": image, "hu": to_axial_slices(np.asarray(img.dataobj, np.float32), img.affine),
            "lung": to_axial_slices(lung, img.affine)}


def test_the_window_is_recovered_from_lung_and_soft_tissue_gray_levels():
    rng = np.random.default_rng(0)
    hu = np.concatenate([rng.normal(LUNG_HU, 30, 6000), rng.normal(SOFT_TISSUE_HU, 20, 4000),
                         rng.uniform(-1000, 1500, 2000)])  # lung, soft tissue, and everything else spread out
    for window in ((-1100.0, 250.0), (-1350.0, 150.0), (-1000.0, 400.0)):
        gray = _gray(hu, window)
        low, high = estimate_window(np.bincount(gray, minlength=256))
        assert abs(low - window[0]) <= 40 and abs(high - window[1]) <= 60, (window, low, high)


def test_a_histogram_without_two_modes_gives_no_window():
    flat = np.ones(256)
    assert estimate_window(flat) is None


def test_cropped_and_full_field_folders_are_told_apart(phantom, tmp_path):
    hu = phantom["hu"][len(phantom["hu"]) // 2]
    full, cropped = tmp_path / "full", tmp_path / "cropped"
    full.mkdir(), cropped.mkdir()
    z0, z1, y0, y1, x0, x1 = crop_box(phantom["hu"], "lungs")
    for i in range(3):
        Image.fromarray(_gray(hu, (-1100, 250))).save(full / f"{i}.png")
        Image.fromarray(_gray(hu[y0:y1, x0:x1], (-1100, 250))).save(cropped / f"{i}.png")
    assert describe_images(sorted(full.glob("*.png")))[0]["crop"] == "none"
    assert describe_images(sorted(cropped.glob("*.png")))[0]["crop"] == "lungs"
    look, how = describe_images(sorted(full.glob("*.png")), window=(-900, 100), crop="body")
    assert look == {"window": [-900.0, 100.0], "crop": "body"} and how == ""


def test_the_lung_box_holds_every_lung_voxel_and_little_else(phantom):
    hu, lung = phantom["hu"], phantom["lung"] > 0
    z0, z1, y0, y1, x0, x1 = crop_box(hu, "lungs")
    inside = np.zeros_like(lung)
    inside[z0:z1, y0:y1, x0:x1] = True
    assert lung[inside].sum() == lung.sum()  # no lung voxel is cut off
    ys, xs = np.flatnonzero(lung.any(axis=(0, 2))), np.flatnonzero(lung.any(axis=(0, 1)))
    # the box is the lungs' extent, grown by the margin (and a few voxels of block averaging)
    assert y1 - y0 <= (ys[-1] - ys[0] + 1) * (1 + 2 * CROP_MARGIN) + 8
    assert x1 - x0 <= (xs[-1] - xs[0] + 1) * (1 + 2 * CROP_MARGIN) + 8
    body = crop_box(hu, "body")
    assert body[2] <= y0 and body[3] >= y1 and body[4] <= x0 and body[5] >= x1
    assert crop_box(hu, "none") == (0, hu.shape[0], 0, hu.shape[1], 0, hu.shape[2])
    assert crop_box(np.full((4, 32, 32), -1000.0), "lungs") == (0, 4, 0, 32, 0, 32)  # air only: the whole volume


def test_presented_slices_go_back_where_they_came_from(phantom):
    hu, lung = phantom["hu"], (phantom["lung"] > 0).astype(np.float32)
    prep = {"size": 64, "norm": "minmax", "window": None, "look": {"window": [-1100.0, 250.0], "crop": "lungs"}}
    shown, box = present_volume(hu, prep)
    z0, z1, y0, y1, x0, x1 = box
    assert shown.shape == (z1 - z0, 64, 64) and -1e-5 <= shown.min() and shown.max() <= 1 + 1e-5
    # a "prediction" that is the lung mask in the presented frame comes back onto the lung mask
    crop = torch.as_tensor(lung[z0:z1, y0:y1, x0:x1])
    as_shown = torch.nn.functional.interpolate(crop[:, None], size=(64, 64), mode="bilinear")[:, 0]
    back = restore_volume(as_shown, box, hu.shape).numpy() > 0.5
    dice = 2 * (back & (lung > 0)).sum() / (back.sum() + (lung > 0).sum())
    assert dice > 0.95
    outside = np.ones(hu.shape, bool)
    outside[z0:z1, y0:y1, x0:x1] = False
    assert not back[outside].any()
    # without a look: every full slice, in the record's own normalisation
    plain = {"size": 64, "norm": "window", "window": [-1000.0, 400.0]}
    shown, box = present_volume(hu, plain)
    assert box == (0, hu.shape[0], 0, hu.shape[1], 0, hu.shape[2]) and shown.shape == (hu.shape[0], 64, 64)


@pytest.fixture(scope="module")
def look_checkpoint(phantom, tmp_path_factory) -> Path:
    """A 1-epoch U-Net trained on cropped 8-bit slices of the phantom (window -1100..250 given)."""
    hu, lung = phantom["hu"], phantom["lung"] > 0
    z0, z1, y0, y1, x0, x1 = crop_box(hu, "lungs")
    root = tmp_path_factory.mktemp("look")
    images, masks = root / "pairs" / "Imgs", root / "pairs" / "GT"
    images.mkdir(parents=True), masks.mkdir()
    for z in range(z0, z1):
        Image.fromarray(_gray(hu[z, y0:y1, x0:x1], (-1100, 250))).save(images / f"{z}.png")
        Image.fromarray(lung[z, y0:y1, x0:x1].astype(np.uint8) * 255).save(masks / f"{z}.png")
    run_train(train_argv(root / "pairs", root / "run", "--look-window", "-1100", "250"))
    return root / "run" / "last.pth"


def test_a_pair_folder_checkpoint_records_its_look_and_infer_crops_a_volume(phantom, look_checkpoint, tmp_path):
    """End to end: cropped 8-bit slices in, the look in the checkpoint, a NIfTI volume shown in it."""
    ckpt = torch.load(look_checkpoint, weights_only=False)
    assert ckpt["preprocessing"]["look"] == {"window": [-1100.0, 250.0], "crop": "lungs"}
    res = run_script("infer.py", "--checkpoint", str(look_checkpoint), "--input", str(phantom["file"]),
                     "--output", str(tmp_path / "pred"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    pred = nib.load(tmp_path / "pred" / f"{phantom['file'].name[:-7]}_lesion.nii.gz")
    assert pred.shape == nib.load(phantom["file"]).shape
    on_display = to_axial_slices(np.asarray(pred.dataobj), pred.affine)
    z0, z1, y0, y1, x0, x1 = crop_box(phantom["hu"], "lungs")
    outside = np.ones(phantom["hu"].shape, bool)
    outside[z0:z1, y0:y1, x0:x1] = False
    assert not on_display[outside].any()  # nothing outside the box the model was shown


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="needs ../shared/data/real-ct (not in a fresh clone)")
def test_the_real_ct_bench_compares_the_look_with_the_full_field(look_checkpoint):
    res = run_script("bench/look_real.py", "--checkpoint", str(look_checkpoint), "--json", timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["scan"] for r in rows] == ["chest_ct_crop"] * 2 + ["chest_dicom_2_slices"] * 2
    assert [r["shown"].startswith("look") for r in rows] == [True, False, True, False]
    for r in rows:
        assert 0 <= r["lesion_outside_lungs_ml"] <= r["lesion_ml"] and r["lung_ml"] > 0


def test_look_flags_are_refused_for_preprocessed_volumes(tiny_processed, tmp_path):
    with pytest.raises(Exception, match="look-window"):
        run_train(train_argv(tiny_processed, tmp_path / "run", "--look-window", "-1000", "400"))


@pytest.mark.skipif(not SEMISEG.is_dir(), reason="needs ../shared/data/covid-semiseg (not in a fresh clone)")
def test_covid_semiseg_slices_are_measured_as_cropped_and_lung_windowed():
    look, how = describe_images(sorted((SEMISEG / "Imgs").glob("*.jpg")))
    assert look["crop"] == "lungs"
    low, high = look["window"]
    assert -1300 <= low <= -900 and 0 <= high <= 600, how  # a lung window, not a soft-tissue or bone one
    assert "estimated" in how


def test_read_case_volume_is_presented_in_the_checkpoint_look():
    """The real chest CT crop: its lung box lies inside the scan and excludes part of it."""
    path = REAL_CT / "chest_ct_crop.nii.gz"
    if not path.is_file():
        pytest.skip("needs ../shared/data/real-ct (not in a fresh clone)")
    vol = read_case(path)
    z0, z1, y0, y1, x0, x1 = crop_box(vol.image, "lungs")
    assert (y1 - y0) * (x1 - x0) < 0.9 * vol.image.shape[1] * vol.image.shape[2]
    assert z1 - z0 > 0
