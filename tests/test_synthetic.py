"""Tests for data/synthetic.py: determinism, files, geometry, HU realism, lesion burden.

The realism tests compare phantoms with two real chest-CT slices from ../shared/data/real-ct
(skipped when that folder or pydicom is missing).
"""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data.synthetic import (DEFAULT_PATIENTS, DEFAULT_SHAPE, SUBFOLDERS, generate_dataset,
                            generate_patient, get_args_parser, main)

SMALL = (96, 96, 12)  # enough for file and geometry checks, ~0.1 s a patient
REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ct"

# Real-vs-phantom tolerances on class medians (HU). The lung median moves by more than 100 HU
# with inspiration depth and gravity (the real slice measures -770 in front and -620 at the
# back of the lung), and the soft-tissue median depends on how much of the body is fat: +-60
# allows normal variation between people and no more. Air outside the body is a calibration
# point of the scanner (-1000 by definition, -978 measured next to this patient): +-30.
LUNG_TOL_HU = 60
SOFT_TOL_HU = 60
AIR_TOL_HU = 30
LUNG_AREA_RATIO = (0.5, 2.0)  # phantom / real lung share of the body area: same anatomy, any build


# ----------------------------------------------------------------------------- helpers
def _fill_between(mask: np.ndarray, axis: int) -> np.ndarray:
    """True between the first and the last True along `axis`."""
    before = np.cumsum(mask, axis=axis) > 0
    after = np.flip(np.cumsum(np.flip(mask, axis), axis=axis), axis) > 0
    return before & after


def _threshold_classes(hu: np.ndarray) -> dict:
    """Segment one axial slice by thresholds only, the same way for real and phantom slices.

    Scan FOV: the inscribed circle of the image (exactly the non-padded area of the real slices).
    Body: pixels above -500 HU filled along rows and columns (fills the lungs, not the air
    between the back and a flat table). Lung: body below -500. Soft tissue: body in [-200, 200].
    """
    n0, n1 = hu.shape
    ci, cj = np.arange(n0) - (n0 - 1) / 2, np.arange(n1) - (n1 - 1) / 2
    fov = (ci[:, None] ** 2 + cj[None, :] ** 2) <= (min(n0, n1) / 2) ** 2
    dense = (hu > -500) & fov
    body = _fill_between(dense, 0) & _fill_between(dense, 1)
    return {"air": fov & ~body, "body": body, "lung": body & (hu < -500),
            "soft": body & (hu >= -200) & (hu <= 200)}


def _slice_stats(hu: np.ndarray) -> dict:
    m = _threshold_classes(hu.astype(np.float64))
    return {"air": float(np.median(hu[m["air"]])), "lung": float(np.median(hu[m["lung"]])),
            "soft": float(np.median(hu[m["soft"]])), "lung_area": m["lung"].sum() / m["body"].sum()}


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    generate_dataset(out, patients=3, seed=7, shape=SMALL)
    return out


@pytest.fixture(scope="module")
def default_set() -> list[dict]:
    """The default dataset (seed 0, default count and shape), in memory: ~10 s, shared."""
    return [generate_patient(np.random.default_rng([0, i])) for i in range(DEFAULT_PATIENTS)]


# ----------------------------------------------------------------------------- determinism and files
def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, small_set):
    generate_dataset(tmp_path / "again", patients=3, seed=7, shape=SMALL)
    generate_dataset(tmp_path / "other", patients=3, seed=8, shape=SMALL)
    first, again, other = _files(small_set), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert len(first) == 9 and first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if name.startswith("images/"))


def test_patient_does_not_depend_on_patient_count(tmp_path, small_set):
    generate_dataset(tmp_path, patients=1, seed=7, shape=SMALL)
    for sub in SUBFOLDERS:
        name = f"{sub}/phantom_000.nii.gz"
        assert (tmp_path / name).read_bytes() == (small_set / name).read_bytes()


def test_rerun_with_fewer_patients_removes_stale_phantoms(tmp_path):
    generate_dataset(tmp_path, patients=3, seed=1, shape=(48, 48, 2))
    names = generate_dataset(tmp_path, patients=2, seed=1, shape=(48, 48, 2))
    assert names == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    for sub in SUBFOLDERS:
        assert sorted(p.name for p in (tmp_path / sub).iterdir()) == names  # no temp files left either


def test_files_layout_dtypes_labels_and_affine(small_set):
    names = {sub: sorted(p.name for p in (small_set / sub).iterdir()) for sub in SUBFOLDERS}
    assert names["images"] == names["lung_masks"] == names["lesion_masks"] == [
        "phantom_000.nii.gz", "phantom_001.nii.gz", "phantom_002.nii.gz"]
    for name in names["images"]:
        image, lung, lesion = (nib.load(small_set / sub / name) for sub in SUBFOLDERS)
        assert image.get_data_dtype() == np.int16
        assert lung.get_data_dtype() == np.uint8 and lesion.get_data_dtype() == np.uint8
        assert image.shape == lung.shape == lesion.shape == SMALL
        for img in (lung, lesion):
            assert np.array_equal(img.affine, image.affine)
        a = image.affine
        assert np.all(np.isfinite(a)) and abs(np.linalg.det(a[:3, :3])) > 1e-3
        assert nib.aff2axcodes(a) == ("L", "P", "S")
        sx, sy, sz = image.header.get_zooms()
        assert 0.6 <= sx <= 0.8 and sx == pytest.approx(sy) and 1.0 <= sz <= 5.0
        assert image.header.get_xyzt_units()[0] == "mm"
        hu = np.asarray(image.dataobj)
        assert hu.dtype == np.int16 and hu.min() >= -1024 and hu.max() <= 3071
        lung_m, lesion_m = np.asarray(lung.dataobj), np.asarray(lesion.dataobj)
        assert set(np.unique(lung_m)) == {0, 1, 2}
        assert set(np.unique(lesion_m)) <= {0, 1, 2}
        assert not np.any((lesion_m > 0) & (lung_m == 0))


def test_generate_patient_contract():
    p = generate_patient(np.random.default_rng(0), shape=(64, 48, 3))
    assert p["image"].shape == p["lung"].shape == p["lesion"].shape == (64, 48, 3)
    assert p["image"].dtype == np.int16 and p["lung"].dtype == np.uint8 and p["lesion"].dtype == np.uint8
    assert p["affine"].shape == (4, 4) and p["affine"].dtype == np.float64
    assert np.allclose(np.abs(np.diag(p["affine"])[:3]), p["spacing"])


def test_default_shape(default_set):
    assert all(p["image"].shape == DEFAULT_SHAPE for p in default_set)


@pytest.mark.parametrize("kwargs", [{"patients": 0}, {"patients": 2.5}, {"seed": -1},
                                    {"shape": (16, 16, 4)}, {"shape": (64, 64)}, {"shape": (64.0, 64, 4)}])
def test_bad_arguments_raise(tmp_path, kwargs):
    args = {"out_dir": tmp_path, "patients": 1, "seed": 0, "shape": (48, 48, 2), **kwargs}
    with pytest.raises(ValueError):
        generate_dataset(**args)


def test_generate_patient_rejects_legacy_random_state():
    with pytest.raises(TypeError):
        generate_patient(np.random.RandomState(0), shape=(48, 48, 2))


def test_cli_writes_files(tmp_path, capsys):
    out = tmp_path / "phantoms"
    main(get_args_parser().parse_args(["--out", str(out), "--patients", "2", "--seed", "3",
                                       "--shape", "64", "64", "4"]))
    for sub in SUBFOLDERS:
        assert sorted(p.name for p in (out / sub).iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert nib.load(out / "images" / "phantom_001.nii.gz").shape == (64, 64, 4)
    assert "wrote 2 phantoms" in capsys.readouterr().out


def test_cli_defaults():
    args = get_args_parser().parse_args([])
    assert (args.out, args.patients, args.seed, tuple(args.shape)) == (
        "data/synthetic", DEFAULT_PATIENTS, 0, DEFAULT_SHAPE)


# ----------------------------------------------------------------------------- anatomy and HU
def test_left_lung_is_on_the_patients_left(default_set):
    # RAS+ world: x grows towards the patient's right, so the left lung has the smaller world x
    for p in default_set:
        xs = {}
        for label in (1, 2):
            centroid = np.argwhere(p["lung"] == label).mean(axis=0)
            xs[label] = (p["affine"] @ np.append(centroid, 1.0))[0]
        assert xs[1] < xs[2]
        assert (p["lung"] == 2).sum() > (p["lung"] == 1).sum()  # the heart makes the left lung smaller


def test_hu_of_tissue_classes(default_set):
    parenchyma, ggo, cons = [], [], []
    for p in default_set:
        hu, lung, lesion = p["image"], p["lung"] > 0, p["lesion"]
        parenchyma.append(hu[lung & (lesion == 0)])
        ggo.append(hu[lesion == 1])
        cons.append(hu[lesion == 2])
        mid = hu[:, :, hu.shape[2] // 2]
        air = mid[_threshold_classes(mid)["air"]]
        assert abs(np.median(air) + 1000) <= 10
        assert (hu > 300).sum() > 100  # bone
    parenchyma, ggo, cons = (np.concatenate(v) for v in (parenchyma, ggo, cons))
    # lung parenchyma with its vessels; -800..-650 brackets the real slice (median -696, see
    # test_phantom_matches_real_ct) and a deeper inspiration
    assert -800 <= np.median(parenchyma) <= -650
    assert -700 <= ggo.mean() <= -300
    assert -100 <= cons.mean() <= 50
    assert ggo.size > 1000 and cons.size > 1000


def test_lesion_burden_varies_and_leaves_healthy_slices(default_set):
    burdens, free_slices, total_slices, lung_volumes = [], 0, 0, []
    lesion_y, lung_y = [], []
    for p in default_set:
        lung, lesion = p["lung"] > 0, p["lesion"] > 0
        burdens.append(lesion.sum() / lung.sum())
        lung_volumes.append(lung.sum() * np.prod(p["spacing"]))
        free_slices += int((~lesion.any(axis=(0, 1))).sum())
        total_slices += lesion.shape[2]
        if lesion.any():
            lesion_y.append(np.nonzero(lesion)[1].mean())
            lung_y.append(np.nonzero(lung)[1].mean())
    burdens = np.array(burdens)
    assert (burdens == 0).sum() >= 1
    assert free_slices / total_slices >= 0.25
    assert burdens.max() <= 0.45
    assert (burdens > 0.1).sum() >= 1 and ((burdens > 0) & (burdens < 0.05)).sum() >= 1
    assert len(np.unique(np.round(lung_volumes, 3))) == len(lung_volumes)
    # lesions sit in the dependent (posterior, larger y index) lung more than the lung itself
    assert np.mean(lesion_y) > np.mean(lung_y)


# ----------------------------------------------------------------------------- real CT
def _real_slices() -> list[np.ndarray]:
    pydicom = pytest.importorskip("pydicom", reason="pydicom is needed to read the real DICOM slices")
    paths = sorted(REAL_CT.glob("chest_slice_*.dcm"))
    if not paths:
        pytest.skip("../shared/data not found: real-CT comparison needs it")
    slices = []
    for path in paths:
        ds = pydicom.dcmread(path)
        slices.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return slices


def test_phantom_matches_real_ct(default_set):
    real = [_slice_stats(s) for s in _real_slices()]
    ref = {key: float(np.median([r[key] for r in real])) for key in real[0]}
    # the typical phantom: median over the default patients of their mid-slice statistics
    phantom = [_slice_stats(p["image"][:, :, p["image"].shape[2] // 2]) for p in default_set]
    got = {key: float(np.median([s[key] for s in phantom])) for key in phantom[0]}
    print(f"\nreal {ref}\nphantom {got}")
    assert abs(got["lung"] - ref["lung"]) <= LUNG_TOL_HU
    assert abs(got["soft"] - ref["soft"]) <= SOFT_TOL_HU
    assert abs(got["air"] - ref["air"]) <= AIR_TOL_HU
    assert LUNG_AREA_RATIO[0] <= got["lung_area"] / ref["lung_area"] <= LUNG_AREA_RATIO[1]
