"""data.transforms (slice functions) and data.preprocess (volumes -> slice arrays + meta.json)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import LPS_AFFINE, SHARED_DATA, run_module, save_nifti, tiny_case

from data.preprocess import get_args_parser, preprocess
from data.dataset import SliceArrayDataset
from data.readers import find_cases
from data.preprocess import main as preprocess_main
from data.transforms import (InputError, from_axial_slices, load_nifti, make_preprocessing, normalize,
                             read_volume_data, resize_images, resize_masks, to_axial_slices)
from utils.cli import run_cli

REAL_CT = SHARED_DATA / "real-ct" / "abdomen_ct_small.nii.gz"


def run(src, out, **kw):
    kw = {"size": 32, "workers": 1, "progress": False, **kw}
    return preprocess(src, out, **kw)


def arrays(out):
    return {p.stem: np.load(p) for p in sorted(out.glob("*.npy"))}


def hu_window(hu, low=-1000.0, high=400.0):
    return np.clip((np.asarray(hu, np.float64) - low) / (high - low), 0, 1)


def flip_affine(affine, axis, n):
    """Affine of data flipped along ``axis`` (length n) that keeps every voxel at the same world point."""
    f = np.eye(4)
    f[axis, axis], f[axis, 3] = -1, n - 1
    return affine @ f


def permute_affine(affine, perm):
    """Affine of ``data.transpose(perm)`` that keeps every voxel at the same world point."""
    p = np.zeros((4, 4))
    p[3, 3] = 1
    for new, old in enumerate(perm):
        p[old, new] = 1
    return affine @ p


def rotation_z(deg):
    t = np.deg2rad(deg)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


# ----------------------------------------------------------------------------- slice functions
def test_normalize_window_hand_computed():
    hu = np.array([[[-2000.0, -1000.0, -300.0], [400.0, 1000.0, 50.0]]])
    got = normalize(hu, "window", (-1000, 400))
    assert got.dtype == np.float32 and got.shape == hu.shape
    np.testing.assert_allclose(got, [[[0, 0, 0.5], [1, 1, 0.75]]], atol=1e-6)
    np.testing.assert_allclose(normalize(hu, "window", (-500, 500)), [[[0, 0, 0.2], [0.9, 1, 0.55]]], atol=1e-6)


def test_normalize_minmax_is_per_slice_and_constant_slice_is_zero():
    x = np.stack([np.array([[3.0, 5.0], [7.0, 11.0]]), np.full((2, 2), 9.0), np.array([[-4.0, 0.0], [4.0, 0.0]])])
    got = normalize(x, "minmax")
    np.testing.assert_allclose(got[0], [[0, 0.25], [0.5, 1]])
    np.testing.assert_array_equal(got[1], 0)
    np.testing.assert_allclose(got[2], [[0, 0.5], [1, 0.5]])


@pytest.mark.parametrize("window", [(400, 400), (400, -1000)])
def test_degenerate_window_raises(window):
    with pytest.raises(ValueError, match="window"):
        normalize(np.zeros((1, 2, 2)), "window", window)
    with pytest.raises(ValueError, match="window"):
        make_preprocessing(32, "window", window)


def test_make_preprocessing_validates():
    assert make_preprocessing(48, "minmax") == {"size": 48, "norm": "minmax", "window": None}
    assert make_preprocessing(32, "window", (-1000, 400)) == {"size": 32, "norm": "window", "window": [-1000.0, 400.0]}
    for size in (0, 8, 40):
        with pytest.raises(ValueError, match="multiple of 16"):
            make_preprocessing(size)
    with pytest.raises(ValueError, match="norm"):
        make_preprocessing(32, "zscore")


def test_resize_masks_keeps_labels_and_images_bilinear():
    m = np.zeros((1, 8, 8), np.uint8)
    m[0, :4, :4] = 2
    up = resize_masks(m, 16)
    assert up.dtype == torch.uint8 and set(up.unique().tolist()) == {0, 2}
    assert int((up == 2).sum()) == 64  # a 4x4 block becomes exactly 8x8
    np.testing.assert_array_equal(resize_masks(up, 8).numpy(), m)  # nearest-exact round trip is lossless
    img = resize_images(np.full((2, 8, 8), 0.25, np.float32), (4, 12))
    assert img.shape == (2, 4, 12) and np.allclose(img.numpy(), 0.25)


# ----------------------------------------------------------------------------- output format
def test_output_arrays_and_meta(tmp_path):
    shapes = [(32, 32, 4), (32, 32, 3)]  # cases of different lengths: rows must not be assumed equal
    for i, shape in enumerate(shapes):
        case = tiny_case(i, shape)
        for sub, key in (("images", "image"), ("lung_masks", "lung"), ("lesion_masks", "lesion")):
            save_nifti(tmp_path / "src" / sub / f"c{i}.nii.gz", case[key])
    meta = run(tmp_path / "src", tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "lesion_masks.npy", "lung_masks.npy", "meta.json"]
    a = arrays(out)
    assert a["images"].shape == (7, 32, 32) and a["images"].dtype == np.float32
    assert 0 <= a["images"].min() and a["images"].max() <= 1 and a["images"].std() > 0.1
    for kind in ("lung_masks", "lesion_masks"):
        assert a[kind].shape == (7, 32, 32) and a[kind].dtype == np.uint8
        assert set(np.unique(a[kind]).tolist()) == {0, 1, 2}  # the original labels
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["slices"] == [{"case": "c0", "z": z} for z in range(4)] + [{"case": "c1", "z": z} for z in range(3)]
    assert meta["cases"]["c0"]["rows"] == [0, 4] and meta["cases"]["c1"]["rows"] == [4, 7]
    assert meta["preprocessing"] == {"size": 32, "norm": "window", "window": [-1000.0, 400.0]}
    assert meta["masks"] == {"lung": True, "lesion": True}
    assert meta["label_mapping"]["lesion"] == "label > 0"
    assert meta["label_mapping"]["source_labels"]["default"] == {"1": "ground-glass opacity", "2": "consolidation"}
    assert meta["labels"] == {"lung": {"left lung": 1, "right lung": 2},
                              "lesion": {"ground-glass opacity": 1, "consolidation": 2}}
    assert meta["lesion_labels"] is None
    for i, name in enumerate(("c0", "c1")):
        c = meta["cases"][name]
        assert c["shape"] == list(shapes[i]) and c["layout"] == "default"
        assert c["spacing"] == pytest.approx([0.7, 0.7, 2.5])
        np.testing.assert_allclose(c["affine"], LPS_AFFINE)
        assert c["lung_label_values"] == [0, 1, 2] and c["lesion_label_values"] == [0, 1, 2]
        # rows hold this case: its lesion voxel count (i + 2 of label 1, 3 of label 2; no resize at 32)
        r0, r1 = c["rows"]
        assert (a["lesion_masks"][r0:r1] == 1).sum() == i + 2 and (a["lesion_masks"][r0:r1] == 2).sum() == 3
        assert (a["lung_masks"][r0:r1] > 0).sum() == (tiny_case(i, shapes[i])["lung"] > 0).sum()


def test_window_values_hand_computed_per_slice(tmp_path):
    # one HU value per axial slice (identity affine: voxel z is world z), so every row is a constant
    hu = np.array([-2000, -1000, -300, 50, 400, 1000], np.int16)
    save_nifti(tmp_path / "v.nii.gz", np.broadcast_to(hu, (32, 32, 6)).copy(), np.eye(4))
    run(tmp_path / "v.nii.gz", tmp_path / "a")
    images = np.load(tmp_path / "a" / "images.npy")
    np.testing.assert_allclose(images.reshape(6, -1).min(1), hu_window(hu), atol=1e-6)
    np.testing.assert_allclose(images.reshape(6, -1).max(1), hu_window(hu), atol=1e-6)
    meta = run(tmp_path / "v.nii.gz", tmp_path / "b", window=(-500, 500))
    assert meta["preprocessing"]["window"] == [-500.0, 500.0]
    np.testing.assert_allclose(np.load(tmp_path / "b" / "images.npy")[:, 0, 0], hu_window(hu, -500, 500), atol=1e-6)


def test_scaled_nifti_is_read_in_hu(tmp_path):
    # stored uint16 with scl_inter = -1024 (common for CT): 724 on disk is -300 HU -> 0.5
    img = nib.Nifti1Image(np.full((32, 32, 2), 724, np.uint16), np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "v.nii.gz"))
    run(tmp_path / "v.nii.gz", tmp_path / "out")
    np.testing.assert_allclose(np.load(tmp_path / "out" / "images.npy"), 0.5, atol=1e-6)


def test_minmax_gives_0_and_1_per_slice(tmp_path):
    data = np.random.default_rng(0).normal(-400, 300, (32, 32, 3)).astype(np.float32)
    data[..., 1] += 500  # slices on different levels: a global min-max would not reach 0 and 1 in each
    save_nifti(tmp_path / "v.nii.gz", data)
    meta = run(tmp_path / "v.nii.gz", tmp_path / "out", norm="minmax")
    assert meta["preprocessing"] == {"size": 32, "norm": "minmax", "window": None}
    images = np.load(tmp_path / "out" / "images.npy")
    np.testing.assert_allclose(images.reshape(3, -1).min(1), 0, atol=1e-6)
    np.testing.assert_allclose(images.reshape(3, -1).max(1), 1, atol=1e-6)


def test_degenerate_window_raises_in_preprocess(tmp_path, make_volume_dir):
    make_volume_dir(tmp_path / "src", n_cases=1)
    with pytest.raises(ValueError, match="window"):
        run(tmp_path / "src", tmp_path / "out", window=(400, -1000))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- orientation
AFFINES = {
    "RAS": np.eye(4),
    "LPS": LPS_AFFINE,
    "LAS scaled": np.diag([-0.8, 0.8, 3.0, 1.0]) + np.array([[0, 0, 0, 10], [0, 0, 0, -5], [0, 0, 0, 2], [0, 0, 0, 0]]),
    "z first (SPL)": permute_affine(LPS_AFFINE, (2, 1, 0)),
    "y, z, x (ASL)": permute_affine(flip_affine(np.eye(4), 0, 7), (1, 2, 0)),
    "oblique 20 deg": rotation_z(20) @ LPS_AFFINE,
}


def _world(affine, shape):
    ijk = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *shape)


@pytest.mark.parametrize("name", list(AFFINES))
def test_display_convention_from_world_coordinates(name):
    """Slices run inferior -> superior, anterior at the top, the patient's right (RAS+ +x) on the image's left."""
    affine, shape = AFFINES[name], (7, 9, 5)
    world = _world(affine, shape)
    z_len = shape[int(np.argmax(np.abs(affine[2, :3])))]
    # (world axis, max or min end) -> where the marked voxels must land in the (Z, H, W) slice stack
    expect = {(0, "max"): (2, 0), (0, "min"): (2, -1),  # right -> first column, left -> last
              (1, "max"): (1, 0), (1, "min"): (1, -1),  # anterior -> first row, posterior -> last
              (2, "max"): (0, z_len - 1), (2, "min"): (0, 0)}  # superior -> last slice
    for (axis, end), (out_axis, pos) in expect.items():
        w = world[axis]
        target = w.max() if end == "max" else w.min()
        marker = np.isclose(w, target, atol=1e-6).astype(np.uint8)
        slices = to_axial_slices(marker, affine)
        assert slices.shape[0] == z_len
        where = np.nonzero(slices)[out_axis]
        assert where.size == marker.sum()
        assert np.all(where == (pos % slices.shape[out_axis])), (name, axis, end)


@pytest.mark.parametrize("name", list(AFFINES))
def test_from_axial_slices_inverts_to_axial_slices(name):
    data = np.random.default_rng(1).integers(0, 1000, (7, 9, 5)).astype(np.int16)
    slices = to_axial_slices(data, AFFINES[name])
    back = from_axial_slices(np.ascontiguousarray(slices), AFFINES[name])
    assert back.shape == data.shape
    np.testing.assert_array_equal(back, data)


def _rewrite(src, dst, change):
    """Copy every NIfTI under src to dst with (data, affine) -> change(data, affine)."""
    for path in src.rglob("*.nii.gz"):
        img = nib.load(str(path))
        data, affine = change(np.asanyarray(img.dataobj), img.affine)
        save_nifti(dst / path.relative_to(src), np.ascontiguousarray(data), affine)


@pytest.mark.parametrize("change", [
    pytest.param(lambda d, a: (d[::-1], flip_affine(a, 0, d.shape[0])), id="flip x"),
    pytest.param(lambda d, a: (d[:, ::-1, ::-1], flip_affine(flip_affine(a, 1, d.shape[1]), 2, d.shape[2])),
                 id="flip y and z"),
    pytest.param(lambda d, a: (d.transpose(1, 0, 2), permute_affine(a, (1, 0, 2))), id="swap x y"),
    pytest.param(lambda d, a: (d.transpose(2, 0, 1)[:, ::-1], flip_affine(permute_affine(a, (2, 0, 1)), 1, d.shape[0])),
                 id="z first and flipped"),
])
def test_same_world_volume_gives_same_slices(tmp_path, make_volume_dir, change):
    # non-square in-plane (40 x 32 -> 32 x 32) so a swapped axis would show
    make_volume_dir(tmp_path / "a", n_cases=2, shape=(40, 32, 4))
    _rewrite(tmp_path / "a", tmp_path / "b", change)
    meta_a, meta_b = run(tmp_path / "a", tmp_path / "out_a"), run(tmp_path / "b", tmp_path / "out_b")
    a, b = arrays(tmp_path / "out_a"), arrays(tmp_path / "out_b")
    assert a.keys() == b.keys() == {"images", "lung_masks", "lesion_masks"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert meta_a["slices"] == meta_b["slices"]
    spacing_a, spacing_b = (m["cases"]["case_000"]["spacing"] for m in (meta_a, meta_b))
    assert sorted(spacing_a) == pytest.approx(sorted(spacing_b))  # the file's own axis order, permuted


@pytest.mark.parametrize("affine", [LPS_AFFINE, np.eye(4)], ids=["LPS", "RAS"])
def test_marker_at_patient_right_anterior_lands_top_left(tmp_path, affine):
    """An asymmetric phantom: a lesion at the patient's right-anterior side, the image's top-left after preprocess."""
    shape = (48, 32, 3)
    world = _world(affine, shape)
    right, anterior = world[0] > np.median(world[0]), world[1] > np.median(world[1])
    lesion = (right & anterior & (np.abs(world[0] - world[0].mean()) > 8) & (np.abs(world[1] - world[1].mean()) > 5))
    image = np.where(lesion, 300, -800).astype(np.int16)
    for sub, data in (("images", image), ("lesion_masks", lesion.astype(np.uint8))):
        save_nifti(tmp_path / "src" / sub / "p.nii.gz", data, affine)
    run(tmp_path / "src", tmp_path / "out")
    a = arrays(tmp_path / "out")
    for key in ("lesion_masks", "images"):
        rows, cols = np.nonzero(a[key] > 0.5)[1:]
        assert rows.size > 0 and rows.max() < 16 and cols.max() < 16, key


# ----------------------------------------------------------------------------- labels
def test_lesion_labels_kept_and_selected_by_the_dataset(tmp_path):
    lesion = np.zeros((32, 32, 3), np.uint8)
    lesion[2:4, 2:4, 0] = 1  # 4 voxels
    lesion[10:13, 10:13, 1] = 2  # 9 voxels
    lesion[20:24, 20:25, 2] = 3  # 20 voxels (MedSeg: pleural effusion)
    image = np.full(lesion.shape, -700, np.int16)
    for sub, data in (("images", image), ("lesion_masks", lesion)):
        save_nifti(tmp_path / "src" / sub / "p.nii.gz", data)
    meta = run(tmp_path / "src", tmp_path / "all")
    masks = np.load(tmp_path / "all" / "lesion_masks.npy")
    assert (masks > 0).sum(axis=(1, 2)).tolist() == [4, 9, 20]
    assert [int(m.max()) for m in masks] == [1, 2, 3]  # the original labels, not binarised
    assert meta["labels"]["lesion"] == {"ground-glass opacity": 1, "consolidation": 2, "label 3": 3}
    assert [int(t.sum()) for t in _targets(tmp_path / "all")] == [4, 9, 20]
    assert meta["cases"]["p"]["lesion_label_values"] == [0, 1, 2, 3]
    assert meta["masks"] == {"lung": False, "lesion": True}
    assert not (tmp_path / "all" / "lung_masks.npy").exists()

    meta = run(tmp_path / "src", tmp_path / "no3", lesion_labels=[1, 2])
    assert (np.load(tmp_path / "no3" / "lesion_masks.npy") == masks).all()  # the selection is a view
    assert meta["lesion_labels"] == [1, 2]
    assert meta["cases"]["p"]["lesion_label_values"] == [0, 1, 2, 3]
    assert "[1, 2]" in meta["label_mapping"]["lesion"]
    targets = _targets(tmp_path / "no3")
    assert [int(t.sum()) for t in targets] == [4, 9, 0] and set(np.unique(np.stack(targets))) == {0, 1}


def _targets(folder) -> list[np.ndarray]:
    """The lesion task's targets of every slice of a preprocessed folder."""
    ds = SliceArrayDataset(folder, None, "lesion")
    return [ds[i][1].numpy() for i in range(len(ds))]


# ----------------------------------------------------------------------------- layouts
def _expected_counts(root, lesion_dir):
    return {p.name.split(".")[0]: int((np.asarray(nib.load(str(p)).dataobj) > 0).sum())
            for p in sorted((root / lesion_dir).iterdir())}


@pytest.mark.parametrize("layout, lesion_dir, names", [
    ("default", "lesion_masks", ["case_000", "case_001"]),
    ("ma2020", "Infection_Mask", ["coronacases_001", "coronacases_002"]),
    ("medseg_radiopaedia", "rp_msk", ["1", "2"]),
])
def test_folder_layouts(tmp_path, make_volume_dir, layout, lesion_dir, names):
    src = make_volume_dir(tmp_path / "src", n_cases=2, layout=layout, seed=3)
    meta = run(src, tmp_path / "out")
    a = arrays(tmp_path / "out")
    assert list(meta["cases"]) == names
    assert {c["layout"] for c in meta["cases"].values()} == {layout}
    assert meta["masks"] == {"lung": True, "lesion": True}
    assert a["images"].shape == a["lesion_masks"].shape == a["lung_masks"].shape == (8, 32, 32)
    expected = _expected_counts(src, lesion_dir)
    for name in names:  # each image paired with its own masks
        r0, r1 = meta["cases"][name]["rows"]
        assert (a["lesion_masks"][r0:r1] > 0).sum() == expected[name]
        hu = np.asarray(nib.load(meta["cases"][name]["image"]).dataobj)
        assert a["images"][r0:r1].mean() == pytest.approx(hu_window(hu).mean(), abs=1e-5)


@pytest.mark.parametrize("with_lung", [True, False])
def test_medseg_tr_layout(tmp_path, with_lung):
    case = tiny_case(5, (32, 32, 5))
    lesion = case["lesion"].copy()
    lesion[20:22, 20:22, 2] = 3
    save_nifti(tmp_path / "tr_im.nii.gz", case["image"])
    save_nifti(tmp_path / "tr_mask.nii.gz", lesion)
    if with_lung:
        save_nifti(tmp_path / "tr_lungmasks_updated.nii.gz", case["lung"])
    meta = run(tmp_path, tmp_path / "out", lesion_labels=[1, 2])
    assert list(meta["cases"]) == ["tr_im"] and meta["cases"]["tr_im"]["layout"] == "medseg_tr"
    assert meta["masks"] == {"lung": with_lung, "lesion": True}
    assert (tmp_path / "out" / "lung_masks.npy").exists() == with_lung
    assert sum(int(t.sum()) for t in _targets(tmp_path / "out")) == (5 + 2) + 3  # label 3 dropped
    assert meta["cases"]["tr_im"]["lesion_label_values"] == [0, 1, 2, 3]


def test_medseg_tr_without_mask_is_an_error(tmp_path):
    save_nifti(tmp_path / "tr_im.nii.gz", tiny_case(0)["image"])
    with pytest.raises(InputError, match="tr_mask.nii.gz"):
        find_cases(tmp_path)


def test_layouts_side_by_side(tmp_path, make_volume_dir):
    make_volume_dir(tmp_path, n_cases=2, layout="default")
    make_volume_dir(tmp_path, n_cases=1, layout="medseg_radiopaedia", seed=7)
    meta = run(tmp_path, tmp_path / "out")
    assert list(meta["cases"]) == ["case_000", "case_001", "1"]
    assert len(meta["slices"]) == len(np.load(tmp_path / "out" / "images.npy")) == 12


def test_find_cases_refuses_ambiguous_sets(tmp_path, make_volume_dir):
    make_volume_dir(tmp_path / "dup", n_cases=1, layout="medseg_radiopaedia")
    save_nifti(tmp_path / "dup" / "images" / "1.nii.gz", tiny_case(0)["image"])
    with pytest.raises(InputError, match=r"share the case name.*'1'"):
        find_cases(tmp_path / "dup")
    # lung masks for one layout but not the other: the lung_masks.npy rows would not line up
    make_volume_dir(tmp_path / "mixed", n_cases=1, layout="default")
    make_volume_dir(tmp_path / "mixed", n_cases=1, layout="medseg_radiopaedia", lung=False)
    with pytest.raises(InputError, match=r"some volumes have lung masks and some do not.*rp_im/1.nii.gz"):
        find_cases(tmp_path / "mixed")


def test_images_without_masks_folder_and_single_file(tmp_path, make_volume_dir):
    make_volume_dir(tmp_path / "gen", n_cases=2, lung=False, lesion=False)
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "gen" / "images", flat)
    meta = run(flat, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images.npy", "meta.json"]
    assert meta["masks"] == {"lung": False, "lesion": False}
    assert list(meta["cases"]) == ["case_000", "case_001"]
    assert {c["layout"] for c in meta["cases"].values()} == {"images_only"}
    images = np.load(tmp_path / "out" / "images.npy")
    assert images.shape == (8, 32, 32) and images.dtype == np.float32

    meta = run(flat / "case_001.nii.gz", tmp_path / "one")
    assert list(meta["cases"]) == ["case_001"] and meta["masks"] == {"lung": False, "lesion": False}
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "images.npy"), images[4:])


def test_4d_file_with_one_volume_is_accepted(tmp_path):
    data = tiny_case(0)["image"]
    save_nifti(tmp_path / "v4.nii.gz", data[..., None])
    save_nifti(tmp_path / "v3.nii.gz", data)
    assert load_nifti(tmp_path / "v4.nii.gz").shape == (32, 32, 4)
    run(tmp_path / "v4.nii.gz", tmp_path / "a")
    run(tmp_path / "v3.nii.gz", tmp_path / "b")
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "images.npy"), np.load(tmp_path / "b" / "images.npy"))


@pytest.mark.skipif(not REAL_CT.is_file(), reason=f"real CT volume not found at {REAL_CT}")
def test_real_nifti_as_image_only_volume(tmp_path):
    meta = preprocess(REAL_CT, tmp_path / "out", size=64, workers=1, progress=False)
    images = np.load(tmp_path / "out" / "images.npy")
    assert images.shape == (30, 64, 64) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    assert images.min() == 0 and images.max() > 0.9 and images.std() > 0.1  # air and bone both present
    assert meta["cases"]["abdomen_ct_small"]["shape"] == [122, 101, 30]
    assert meta["masks"] == {"lung": False, "lesion": False}
    assert len(meta["slices"]) == 30
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images.npy", "meta.json"]


# ----------------------------------------------------------------------------- bad input on the command line
def _bad_cases(root):
    """name -> (src, text that the error line must contain: the file, a word of the problem)."""
    good = tiny_case(0)

    def folder(name, image=good["image"], lesion=good["lesion"], bad="bad.nii.gz"):
        src = root / name / "src"
        save_nifti(src / "images" / "a_good.nii.gz", good["image"])
        save_nifti(src / "lesion_masks" / "a_good.nii.gz", good["lesion"])
        save_nifti(src / "images" / bad, image)
        save_nifti(src / "lesion_masks" / bad, lesion)
        return src

    cases = {}
    src = folder("unreadable", bad="random_bytes.nii.gz")
    (src / "images" / "random_bytes.nii.gz").write_bytes(np.random.default_rng(0).bytes(4000))
    cases["unreadable"] = (src, ["random_bytes.nii.gz", "NIfTI"])
    src = folder("truncated", bad="cut.nii.gz")
    p = src / "images" / "cut.nii.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    cases["truncated"] = (src, ["cut.nii.gz", "truncated"])
    src = folder("zero byte", bad="empty_file.nii.gz")
    (src / "images" / "empty_file.nii.gz").write_bytes(b"")
    cases["zero byte"] = (src, ["empty_file.nii.gz", "read"])
    cases["mask shape"] = (folder("mask shape", lesion=np.zeros((32, 32, 5), np.uint8), bad="mismatch.nii.gz"),
                           ["mismatch.nii.gz", "(32, 32, 5)", "(32, 32, 4)"])
    cases["2D"] = (folder("2D", image=good["image"][..., 0], lesion=good["lesion"][..., 0], bad="flat.nii.gz"),
                   ["flat.nii.gz", "3D"])
    cases["4D"] = (folder("4D", image=np.stack([good["image"]] * 2, -1), lesion=np.stack([good["lesion"]] * 2, -1),
                          bad="timeseries.nii.gz"), ["timeseries.nii.gz", "3D"])
    nan = good["image"].astype(np.float32)
    nan[3, 4, 1] = np.nan
    cases["NaN"] = (folder("NaN", image=nan, bad="has_nan.nii.gz"), ["has_nan.nii.gz", "NaN"])
    src = folder("mask missing", bad="lonely.nii.gz")
    (src / "lesion_masks" / "lonely.nii.gz").unlink()
    cases["mask missing"] = (src, ["lonely.nii.gz", "mask"])
    (root / "empty folder" / "src").mkdir(parents=True)
    cases["empty folder"] = (root / "empty folder" / "src", [str(root / "empty folder" / "src"), "no NIfTI"])
    (root / "nonexistent").mkdir()
    cases["nonexistent"] = (root / "nonexistent" / "nothing_here", ["nothing_here", "no such"])
    return cases


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every bad input through the command line: the first as ``python -m data.preprocess`` in a subprocess,
    the others through utils.cli.run_cli in this process, as that command calls it (a new interpreter costs
    3-5 s of imports on a 2-core CPU, for the same code path). {name: (src, needles, result)}; result has
    ``returncode`` and ``stderr``."""
    root = tmp_path_factory.mktemp("cli")
    cases = _bad_cases(root)
    results = {}
    for i, (name, (src, _)) in enumerate(cases.items()):
        argv = ["--src", src, "--out", src.parent / "out", "--size", "32", "--workers", "1"]
        if i == 0:
            results[name] = run_module("data.preprocess", *argv)
            continue
        code, _, err = _run_cli_in_process(*argv)
        results[name] = SimpleNamespace(returncode=code, stderr=err)
    return {name: (src, needles, results[name]) for name, (src, needles) in cases.items()}


def _assert_one_clear_line(returncode, stderr, needles):
    assert returncode != 0
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}: {stderr!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


BAD_INPUTS = ["unreadable", "truncated", "zero byte", "mask shape", "2D", "4D", "NaN", "mask missing", "empty folder",
              "nonexistent"]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_cli_bad_input_is_one_clear_line(cli_runs, name):
    src, needles, proc = cli_runs[name]
    _assert_one_clear_line(proc.returncode, proc.stderr, needles)


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_cli_bad_input_leaves_no_output(cli_runs, name):
    src, _, proc = cli_runs[name]
    assert proc.returncode != 0
    # neither OUT nor a partial folder beside it ("truncated" and "NaN" fail half-way, after OUT's temporary)
    leftovers = sorted(p.name for p in src.parent.iterdir() if p.name != "src")
    assert leftovers == [], leftovers


def _run_cli_in_process(*argv):
    """utils.cli.run_cli as ``python -m data.preprocess`` calls it, without paying for a new interpreter:
    (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(preprocess_main, get_args_parser(), [str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_cli_failure_leaves_existing_output_intact(tmp_path):
    good = tmp_path / "good"
    for sub, key in (("images", "image"), ("lesion_masks", "lesion")):
        save_nifti(good / sub / "g.nii.gz", tiny_case(1)[key])
    run(good, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    # a failure half-way through: the second volume (after "a_good") has a NaN voxel
    bad = _bad_cases(tmp_path / "bad")["NaN"][0]
    code, _, err = _run_cli_in_process("--src", bad, "--out", tmp_path / "out", "--size", "32",
                                       "--workers", "1")
    assert code == 1 and "has_nan.nii.gz" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out"]


def test_cli_degenerate_window(tmp_path, make_volume_dir):
    make_volume_dir(tmp_path / "src", n_cases=1)
    code, _, err = _run_cli_in_process("--src", tmp_path / "src", "--out", tmp_path / "out",
                                       "--window", "400", "-1000")
    _assert_one_clear_line(code, err, ["window", "400"])
    assert not (tmp_path / "out").exists()


def test_cli_good_run_passes_options_through(tmp_path, make_volume_dir):
    make_volume_dir(tmp_path / "src", n_cases=1, seed=1)
    code, out, err = _run_cli_in_process("--src", tmp_path / "src", "--out", tmp_path / "out",
                                         "--size", "32", "--workers", "1", "--window", "-500", "500",
                                         "--lesion-labels", "1")
    assert code == 0, err
    assert "wrote 4 slices of 1 volumes" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["preprocessing"] == {"size": 32, "norm": "window", "window": [-500.0, 500.0]}
    assert meta["label_mapping"]["lesion"] == "label in [1]"
    # tiny_case(1): its 3 voxels of label 1 kept, its 3 of label 2 dropped
    assert sum(int(t.sum()) for t in _targets(tmp_path / "out")) == 3


# ----------------------------------------------------------------------------- parallel path
def test_parallel_workers_give_identical_arrays(tmp_path, make_volume_dir):
    make_volume_dir(tmp_path / "src", n_cases=3, shape=(40, 32, 4))
    meta1 = run(tmp_path / "src", tmp_path / "one", workers=1)
    meta2 = run(tmp_path / "src", tmp_path / "two", workers=2)
    for name in ("images.npy", "lung_masks.npy", "lesion_masks.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert meta1 == meta2


def test_read_volume_data_names_file_for_nan(tmp_path):
    data = np.zeros((4, 4, 2), np.float32)
    data[0, 0, 0] = np.inf
    path = save_nifti(tmp_path / "inf.nii.gz", data)
    with pytest.raises(InputError, match="inf.nii.gz.*1 NaN or infinite"):
        read_volume_data(load_nifti(path), path)
