"""Ground truth is read one way, checked, or refused naming the file (issue 13, cases 5, 6, 7, 10, 13).

A wrong mask must never become a plausible score: a mirrored, shifted, resized or relabelled mask, a gray
export of a label map, a split that is not there. Tiny hand-made volumes and pairs; the trained checkpoint
of tests/script_fixtures.py where a prediction is needed.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import evaluate
from data import transforms
from data.preprocess import preprocess
from data.readers import read_case
from data.transforms import InputError, make_preprocessing, read_mask, to_axial_slices
from tests.conftest import LPS_AFFINE, save_nifti, tiny_case
from tests.script_fixtures import phantoms, processed, run_script, trained  # noqa: F401
from utils.checkpoint import load_checkpoint
from utils.volumes import dice_3d, volume_report, voxel_volume_ml

RAS_AFFINE = np.diag([0.7, 0.7, 2.5, 1.0])  # same voxel size as LPS_AFFINE, axes x and y reversed


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def one_line_error(res, *words: str) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def volume_dir(root, lesion=None, lesion_affine=None, image=None, image_affine=None, lung=True):
    """One case in the default layout (images/, lung_masks/, lesion_masks/), parts replaceable."""
    case = tiny_case(1)
    save_nifti(root / "images" / "c.nii.gz", case["image"] if image is None else image, image_affine)
    if lung:
        save_nifti(root / "lung_masks" / "c.nii.gz", case["lung"], image_affine)
    save_nifti(root / "lesion_masks" / "c.nii.gz", case["lesion"] if lesion is None else lesion,
               lesion_affine if lesion_affine is not None else image_affine)
    return root


def shifted(affine, mm):
    a = np.array(affine, float)
    a[:3, 3] += mm
    return a


# ----------------------------------------------------------------------------- case 5: mask volumes
def test_evaluate_volumes_refuses_a_mask_stored_mirrored_beside_its_image(tmp_path):
    # RAS mask beside an LPS image: same array shape, but every voxel index is the other side of the body
    src = volume_dir(tmp_path / "v", lesion_affine=RAS_AFFINE)
    with pytest.raises(InputError, match=r"lesion_masks/c\.nii\.gz: lesion mask is stored RAS, image c\.nii\.gz is LPS"):
        evaluate.evaluate_volumes(tmp_path / "no-model-needed.pth", src, tmp_path / "eval", device="cpu",
                                  progress=False)
    assert not (tmp_path / "eval").exists()


def test_evaluate_cli_refuses_a_mirrored_mask_in_one_line(trained, tmp_path):
    src = volume_dir(tmp_path / "v", lesion_affine=RAS_AFFINE)
    res = run_script("evaluate.py", "--checkpoint", str(trained["out"] / "best_model.pth"), "--data", str(src),
                     "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-progress")
    one_line_error(res, "lesion_masks/c.nii.gz", "RAS", "LPS")
    assert not (tmp_path / "eval").exists()


def test_preprocess_refuses_a_mask_stored_mirrored_beside_its_image(tmp_path):
    src = volume_dir(tmp_path / "v", lesion_affine=RAS_AFFINE)
    with pytest.raises(InputError, match=r"lesion_masks/c\.nii\.gz: lesion mask is stored RAS"):
        preprocess(src, tmp_path / "out", size=32, workers=1, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reader", ["preprocess", "evaluate"])
def test_a_mask_shifted_by_50_mm_is_refused(reader, tmp_path):
    src = volume_dir(tmp_path / "v", lesion_affine=shifted(LPS_AFFINE, [0, 50, 0]))
    with pytest.raises(InputError, match=r"lesion_masks/c\.nii\.gz: lesion mask is placed 50 mm"):
        if reader == "preprocess":
            preprocess(src, tmp_path / "out", size=32, workers=1, progress=False)
        else:
            evaluate.evaluate_volumes(tmp_path / "unused.pth", src, tmp_path / "eval", device="cpu", progress=False)


def test_a_mask_within_the_affine_tolerance_is_read(tmp_path):
    # a fifth of a voxel and float32 rounding of the axes: the same grid, written by another tool
    close = shifted(LPS_AFFINE, [0.14, 0, 0.5])
    close[:3, :3] *= 1 + 1e-6
    src = volume_dir(tmp_path / "v", lesion_affine=close)
    meta = preprocess(src, tmp_path / "out", size=32, workers=1, progress=False)
    assert meta["cases"]["c"]["lesion_label_values"] == [0, 1, 2]


def test_a_mask_of_another_shape_is_refused_naming_the_file(tmp_path):
    # before: a numpy broadcast error naming no file, from dice_3d after the prediction
    src = volume_dir(tmp_path / "v", lesion=np.zeros((32, 32, 5), np.uint8))
    with pytest.raises(InputError, match=r"lesion_masks/c\.nii\.gz: lesion mask is \(32, 32, 5\), image c\.nii\.gz is \(32, 32, 4\)"):
        evaluate.evaluate_volumes(tmp_path / "unused.pth", src, tmp_path / "eval", device="cpu", progress=False)


def test_evaluate_volumes_refuses_a_mask_with_background_minus_one(trained, tmp_path):
    # before: -1 became label 255 (lesion) everywhere: 100% infection, exit 0
    lesion = tiny_case(1)["lesion"].astype(np.int16) - 1
    src = volume_dir(tmp_path / "v", lesion=lesion)
    with pytest.raises(InputError, match=r"lesion_masks/c\.nii\.gz: lesion mask has negative labels \[-1\]"):
        quiet(evaluate.evaluate_volumes, trained["out"] / "best_model.pth", src, tmp_path / "eval", device="cpu",
              progress=False)
    assert not (tmp_path / "eval" / "results.json").exists()


def test_a_correct_mask_still_scores_its_3d_dice_and_volumes(trained, tmp_path):
    from engine.predict import Predictor

    src = volume_dir(tmp_path / "v", lung=False)
    ckpt = trained["out"] / "best_model.pth"
    res = quiet(evaluate.evaluate_volumes, ckpt, src, tmp_path / "eval", device="cpu", progress=False)
    # the same figures, computed here from the prediction and the mask read directly
    img, _, masks = quiet(Predictor(ckpt, "cpu", "auto", 8).predict_volume, src / "images" / "c.nii.gz")
    truth = to_axial_slices(np.asarray(nib.load(src / "lesion_masks" / "c.nii.gz").dataobj), img.affine) > 0
    row = res["patients"][0]
    assert res["split"] == "all" and row["case"] == "c"
    want = dice_3d(masks["lesion"], truth)
    assert (np.isnan(want) and np.isnan(row["lesion_dice_3d"])) or row["lesion_dice_3d"] == pytest.approx(want)
    assert row["lesion_ml_true"] == pytest.approx(truth.sum() * 0.7 * 0.7 * 2.5 / 1000)


# ----------------------------------------------------------------------------- case 6: mask image files
def _label_masks(folder, mode):
    """Masks of a 3-class label map (0 background, 1 GGO, 2 consolidation) as a viewer exports them."""
    labels = np.zeros((24, 40), np.uint8)
    labels[2:8, 3:12] = 1
    labels[12:20, 20:30] = 2
    if mode == "gray":
        return Image.fromarray(np.array([0, 38, 75], np.uint8)[labels])
    colours = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0]], np.uint8)  # VOC palette: dark red, dark green
    return Image.fromarray(colours[labels])


@pytest.mark.parametrize("mode", ["gray", "RGB"])
def test_a_gray_or_rgb_export_of_a_label_map_is_refused_with_its_values(mode, tmp_path):
    path = tmp_path / "m.png"
    _label_masks(tmp_path, mode).save(path)
    with pytest.raises(InputError) as err:
        read_mask(path)  # before: values below 128, read as an empty mask
    assert str(path) in str(err.value) and "0, 38, 75" in str(err.value)


def test_binary_and_label_masks_are_still_read(tmp_path):
    truth = np.zeros((24, 40), np.uint8)
    truth[4:9, 5:20] = 1
    for name, arr in (("bin", truth * 255), ("one", truth), ("labels", truth * 2), ("nearly", truth * 254 + 1)):
        Image.fromarray(arr.astype(np.uint8)).save(tmp_path / f"{name}.png")
        np.testing.assert_array_equal(read_mask(tmp_path / f"{name}.png"), truth, err_msg=name)


def test_evaluate_refuses_a_pair_folder_of_gray_label_masks_in_one_line(trained, processed, tmp_path):
    # before: every mask read as empty, accuracy 1.0, "100% clean", exit 0
    data = tmp_path / "pairs"
    for sub in ("Imgs", "GT"):
        (data / sub).mkdir(parents=True)
    image = (np.load(processed / "images.npy", mmap_mode="r")[0] * 255).astype(np.uint8)
    Image.fromarray(image).save(data / "Imgs" / "s1.png")
    _label_masks(tmp_path, "gray").resize(image.shape[::-1], Image.NEAREST).save(data / "GT" / "s1.png")
    res = run_script("evaluate.py", "--checkpoint", str(trained["out"] / "best_model.pth"), "--data", str(data),
                     "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-progress")
    one_line_error(res, "GT/s1.png", "38", "75")
    assert not (tmp_path / "eval" / "results.json").exists()


# ----------------------------------------------------------------------------- case 7: the split scored
def _pairs(root, parts, n=2):
    """n 64x64 gradient images with 0/255 rectangle masks in each (images folder, masks folder) of parts."""
    for images, masks in parts:
        for d in (root / images, root / masks):
            d.mkdir(parents=True)
        for i in range(n):
            img = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            mask[10:20 + i, 10:30] = 255
            Image.fromarray(img).save(root / images / f"{i}.png")
            Image.fromarray(mask).save(root / masks / f"{i}.png")
    return root


def test_evaluate_refuses_a_test_split_that_the_pair_folder_lacks(trained, tmp_path):
    # before: silently scored val_images/, recorded split null, wrote eval-test/
    data = _pairs(tmp_path / "pairs", [("train_images", "train_masks"), ("val_images", "val_masks")])
    with pytest.raises(InputError, match=r"pairs: no 'test' part of image-mask pairs \(it has train, val\)"):
        quiet(evaluate.evaluate, trained["out"] / "best_model.pth", data, "test", tmp_path / "eval", device="cpu",
              progress=False)
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_a_named_split_of_an_unsplit_pair_folder(trained, tmp_path):
    # before: --split test on Imgs/ + GT/ scored every image, training ones included
    data = _pairs(tmp_path / "pairs", [("Imgs", "GT")])
    res = run_script("evaluate.py", "--checkpoint", str(trained["out"] / "best_model.pth"), "--data", str(data),
                     "--split", "test", "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-progress")
    one_line_error(res, str(data), "'test'", "--split all")
    assert not (tmp_path / "eval").exists()


def test_an_unsplit_pair_folder_is_scored_as_split_all_and_says_so(trained, tmp_path):
    data = _pairs(tmp_path / "pairs", [("Imgs", "GT")])
    ckpt = tmp_path / "run" / "model.pth"  # a copy, so the default output folder lands in tmp_path
    ckpt.parent.mkdir()
    shutil.copy(trained["out"] / "best_model.pth", ckpt)
    results = quiet(evaluate.evaluate, ckpt, data, device="cpu", progress=False)
    assert results["split"] == "all" and results["structures"]["lesion"]["n_images"] == 2
    assert json.loads((tmp_path / "run" / "eval-all" / "results.json").read_text())["split"] == "all"
    assert not (tmp_path / "run" / "eval-test").exists()


def test_a_named_part_of_a_split_pair_folder_is_scored_and_recorded(trained, tmp_path):
    data = _pairs(tmp_path / "pairs", [("train_images", "train_masks"), ("val/images", "val/masks")], n=3)
    results = quiet(evaluate.evaluate, trained["out"] / "best_model.pth", data, "val", tmp_path / "eval",
                    device="cpu", progress=False)
    assert results["split"] == "val" and results["structures"]["lesion"]["n_images"] == 3


def test_evaluate_volumes_refuses_a_split_without_splits_json(tmp_path):
    # before: --split test without --splits scored every volume
    src = volume_dir(tmp_path / "v")
    with pytest.raises(InputError, match="--split test needs --splits"):
        evaluate.evaluate_volumes(tmp_path / "unused.pth", src, tmp_path / "eval", split="test", progress=False)


# ----------------------------------------------------------------------------- case 10: volumes in mL
def test_voxel_volume_of_a_sheared_affine_is_its_determinant():
    # columns (1, 0, 0), (0.5, 1, 0), (0, 0, 2) mm: a 2 mm3 parallelepiped; pixdims would say 1 x 1.118 x 2
    sheared = np.array([[1.0, 0.5, 0, 10], [0, 1, 0, -5], [0, 0, 2, 3], [0, 0, 0, 1]])
    zooms = np.linalg.norm(sheared[:3, :3], axis=0)
    assert voxel_volume_ml(sheared) == pytest.approx(2.0 / 1000)
    assert np.prod(zooms) / 1000 > 1.1 * voxel_volume_ml(sheared)  # what the pixdims product overstated
    lesion = np.zeros((3, 4, 4), np.uint8)
    lesion[1, :2, :3] = 1
    assert volume_report(lesion, None, voxel_volume_ml(sheared))["lesion_ml"] == pytest.approx(6 * 2.0 / 1000)
    assert voxel_volume_ml(LPS_AFFINE) == pytest.approx(0.7 * 0.7 * 2.5 / 1000)  # the sign of an axis is no volume


# ----------------------------------------------------------------------------- case 13: degenerate affines
def _degenerate(path, how):
    """A volume whose sform (which nibabel prefers to the qform) has a zero column, or is all zeros."""
    sform = np.zeros((4, 4))
    if how == "zero column":
        sform = LPS_AFFINE.copy()
        sform[:3, 1] = 0
    img = nib.Nifti1Image(tiny_case(0)["image"], np.eye(4))
    img.set_sform(sform, code=1)
    img.set_qform(np.eye(4), code=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("how", ["zero column", "all-zero sform"])
def test_preprocess_refuses_a_degenerate_affine_in_one_line(how, tmp_path):
    # before: an IndexError traceback from the orientation code
    src = _degenerate(tmp_path / "src" / "scan.nii.gz", how)
    res = run_script("-m", "data.preprocess", "--src", str(src.parent), "--out", str(tmp_path / "out"),
                     "--size", "32", "--workers", "1")
    one_line_error(res, "scan.nii.gz", "degenerate affine")
    assert not (tmp_path / "out").exists()


def test_infer_refuses_a_degenerate_affine_naming_the_file(trained, tmp_path):
    src = _degenerate(tmp_path / "scan.nii.gz", "zero column")
    res = run_script("infer.py", "--checkpoint", str(trained["out"] / "best_model.pth"), "--input", str(src),
                     "--output", str(tmp_path / "out"), "--device", "cpu", "--no-progress")
    one_line_error(res, "scan.nii.gz", "degenerate affine")


# ----------------------------------------------------------------------------- 8-bit volumes, HU window
def test_an_8_bit_volume_under_the_hu_window_is_warned_about_by_name(tmp_path, capsys):
    src = tmp_path / "src"
    save_nifti(src / "display.nii.gz", np.random.default_rng(0).integers(0, 256, (32, 32, 4)).astype(np.uint8))
    save_nifti(src / "hu.nii.gz", tiny_case(0)["image"])
    preprocess(src, tmp_path / "out", size=32, workers=1, progress=False)
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "display.nii.gz" in warned[0] and "Hounsfield" in warned[0]
    preprocess(src, tmp_path / "out2", size=32, norm="minmax", workers=1, progress=False)
    assert "warning:" not in capsys.readouterr().err  # min-max needs no HU


# ----------------------------------------------------------------------------- image files, window checkpoint
def test_evaluate_says_once_how_a_window_checkpoint_reads_image_files(trained, tmp_path):
    data = _pairs(tmp_path / "pairs", [("Imgs", "GT")], n=3)
    ckpt = trained["out"] / "best_model.pth"
    note = transforms.image_files_note(load_checkpoint(ckpt)["preprocessing"])
    assert note  # the fixture's checkpoint was trained on HU-windowed volumes
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        evaluate.evaluate(ckpt, data, out=tmp_path / "eval", device="cpu", progress=False, batch_size=1)
    assert buf.getvalue().count(note) == 1


# ----------------------------------------------------------------------------- data.readers.read_case
def _case_files(root, case=None, mask_affine=None):
    case = case or tiny_case(0, (32, 32, 4))
    paths = [save_nifti(root / f"{k}.nii.gz", case[k], mask_affine if k != "image" else None)
             for k in ("image", "lung", "lesion")]
    return case, paths


def test_read_case_returns_slices_labels_and_geometry(tmp_path):
    case, (image, lung, lesion) = _case_files(tmp_path)
    vol = read_case(image, lung, lesion)
    assert vol.image.dtype == np.float32 and vol.image.shape == (4, 32, 32)
    np.testing.assert_array_equal(vol.image, to_axial_slices(case["image"].astype(np.float32), LPS_AFFINE))
    for kind in ("lung", "lesion"):  # the original labels, in display orientation
        assert vol.masks[kind].dtype == np.uint8
        np.testing.assert_array_equal(vol.masks[kind], to_axial_slices(case[kind], LPS_AFFINE))
        assert vol.label_values[kind] == [0, 1, 2]
    assert vol.shape == vol.file_shape == (32, 32, 4) and vol.n_slices == 4
    assert vol.spacing == pytest.approx([0.7, 0.7, 2.5]) and vol.voxel_ml == pytest.approx(voxel_volume_ml(LPS_AFFINE))
    np.testing.assert_array_equal(vol.to_file_order(vol.masks["lesion"]), case["lesion"])
    header_only = read_case(image, lung, lesion, voxels=False)
    assert header_only.image is None and header_only.masks == {} and header_only.n_slices == 4


def test_read_case_keeps_a_4d_file_shape(tmp_path):
    case = tiny_case(0, (32, 32, 4))
    path = save_nifti(tmp_path / "image.nii.gz", case["image"][..., None])
    vol = read_case(path)
    assert vol.shape == (32, 32, 4) and vol.file_shape == (32, 32, 4, 1) and vol.masks == {}
    assert vol.to_file_order(vol.image).shape == (32, 32, 4, 1)


@pytest.mark.parametrize("voxels", [True, False])
def test_read_case_refuses_a_mask_off_the_image_grid(tmp_path, voxels):
    shifted = np.array(LPS_AFFINE, float)
    shifted[:3, 3] += 50
    _, (image, lung, lesion) = _case_files(tmp_path, mask_affine=shifted)
    with pytest.raises(InputError, match="lung.nii.gz.*resample"):
        read_case(image, lung, lesion, voxels=voxels)


def test_read_case_refuses_bad_labels_and_unknown_formats(tmp_path):
    case, (image, lung, lesion) = _case_files(tmp_path)
    bad = case["lesion"].astype(np.float32)
    bad[0, 0, 0] = 0.5
    save_nifti(lesion, bad)
    with pytest.raises(InputError, match="lesion.nii.gz.*non-integer"):
        read_case(image, lung, lesion)
    (tmp_path / "scan.dcm").write_bytes(b"x")
    with pytest.raises(InputError, match="scan.dcm.*not a volume format"):
        read_case(tmp_path / "scan.dcm")


def test_read_case_warns_about_8_bit_data_only_for_an_hu_window(tmp_path, capsys):
    path = save_nifti(tmp_path / "eight.nii.gz", np.full((16, 16, 2), 200, np.uint8))
    read_case(path, prep=make_preprocessing(16, "window"))
    assert "eight.nii.gz" in capsys.readouterr().err
    read_case(path, prep=make_preprocessing(16, "minmax"))
    read_case(path)
    assert capsys.readouterr().err == ""


def test_evaluate_volumes_scores_the_lungs_from_hu_of_a_lesion_only_checkpoint(trained, phantoms, tmp_path):
    """--lungs hu: a checkpoint without a lung head gets lungs from HU, scored against the lung masks."""
    ckpt = trained["out"] / "best_model.pth"
    res = quiet(evaluate.evaluate_volumes, ckpt, phantoms, tmp_path / "eval", device="cpu", progress=False,
                lungs="hu")
    rows = res["patients"]
    assert {r["lung_source"] for r in rows} == {"hu"}
    # 64x64x8 phantoms: coarse, so lower than bench/lungs.py's 0.97-0.99 at 256x256x32
    assert all(r["lung_dice_3d"] > 0.8 and r["lung_dice_slices"] > 0.8 for r in rows), [
        (r["lung_dice_3d"], r["lung_dice_slices"]) for r in rows]
    assert res["summary"]["lung_dice_slices"]["n"] == len(rows)
    with pytest.raises(InputError, match="no lung head"):
        quiet(evaluate.evaluate_volumes, ckpt, phantoms, tmp_path / "eval2", device="cpu", progress=False,
              lungs="model")
