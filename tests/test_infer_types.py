"""infer.py with lesion-types checkpoints (ground-glass opacity, consolidation): label PNGs, per-type probability
maps, coloured overlays, label volumes, per-type mL and % in the report, DICOM SEG segments, --lesion any.

The checkpoints are untrained; the model's output is replaced by logits made from the input's grey value
(:func:`banded_predict`), so every expected mask is known pixel by pixel: grey < 0.05 background, < 0.25 lung,
< 0.75 ground-glass opacity, else consolidation.
"""
from __future__ import annotations

import contextlib
import io
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import engine.predict
import infer
from base import InputError
from data.labels import LESION_LABEL_NAMES, TASK_CLASSES, structure_slug
from data.transforms import make_preprocessing
from engine.batch import PNG_MARK, type_colours
from engine.predict import class_probs
from models import build_model
from utils.checkpoint import save_checkpoint

GGO, CONS = LESION_LABEL_NAMES["default"]["1"], LESION_LABEL_NAMES["default"]["2"]
TYPES = {GGO: 1, CONS: 2}
S = 32
WINDOW = (-1024.0, 0.0)  # HU -> grey (HU + 1024) / 1024
BANDS = torch.tensor([0.05, 0.25, 0.75])  # grey edges: background | lung | ground-glass | consolidation
CLASS_OF_BAND = {"lesion": (0, 0, 1, 1), "lesion-types": (0, 0, 1, 2), "lung+lesion-types": (0, 1, 2, 3)}


def banded_predict(model, images, task, device, dtype=None, tta=False):
    """engine.predict.predict with the class of each pixel from its grey value, through the real class_probs."""
    band = torch.bucketize(images[:, 0].float().cpu().contiguous(), BANDS)
    cls = torch.tensor(CLASS_OF_BAND[task])[band]
    logits = torch.nn.functional.one_hot(cls, TASK_CLASSES[task]).permute(0, 3, 1, 2).float() * 4.0
    if task == "lesion":  # one sigmoid channel
        logits = (cls[:, None].float() * 2 - 1) * 4.0
    return class_probs(logits, task)


@pytest.fixture(autouse=True)
def banded(monkeypatch):
    monkeypatch.setattr(engine.predict, "predict", banded_predict)


def make_checkpoint(path, task: str):
    """An untrained U-Net checkpoint of ``task`` with what train.py's run_record stores (HU window -1024..0)."""
    model = build_model("unet", in_channels=1, num_classes=1 if task == "lesion" else TASK_CLASSES[task], width=4)
    save_checkpoint({"model": model.state_dict(), "model_config": {"name": "unet", **model.config},
                     "num_classes": TASK_CLASSES[task], "task": task, "loss": "ce",
                     "preprocessing": make_preprocessing(S, "window", WINDOW), "data": {}, "labels": {},
                     "inference": {"tta": False}, "args": {"model": "unet", "task": task, "tta": False}}, path)
    return path


def run(checkpoint, src, output=None, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return infer.infer(checkpoint, src, output, device="cpu", progress=False, **kwargs)


def grey_blocks(shift: int = 0) -> np.ndarray:
    """An 8-bit S x S slice: background 0, a lung block 40, a ground-glass block 128, a consolidation block 250."""
    img = np.zeros((S, S), np.uint8)
    img[2:30, 2:30] = 40
    img[4 + shift:12 + shift, 4:14] = 128
    img[18:26, 16 + shift:28] = 250
    return img


def expected_types(grey: np.ndarray) -> np.ndarray:
    """The type labels the banded model gives an 8-bit slice: 1 ground-glass, 2 consolidation."""
    band = np.digitize(grey / 255.0, BANDS.numpy(), right=True)
    return np.array([0, 0, 1, 2], np.uint8)[band]


@pytest.fixture()
def slices(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    arrays = {"a": grey_blocks(), "b": grey_blocks(2)}
    for stem, a in arrays.items():
        Image.fromarray(a).save(folder / f"{stem}.png")
    return folder, arrays


def read(path):
    with Image.open(path) as img:
        return img.mode, np.asarray(img), img.getpalette(), img.info.get("Software")


# ----------------------------------------------------------------------------- slices
def test_a_types_checkpoint_writes_label_pngs_per_type_probability_maps_and_coloured_overlays(slices, tmp_path):
    folder, arrays = slices
    ckpt = make_checkpoint(tmp_path / "t.pth", "lesion-types")
    written = run(ckpt, folder, tmp_path / "out", save_probs=tmp_path / "prob")
    assert sorted(p.name for p in written) == ["a.png", "b.png"]
    for stem, grey in arrays.items():
        mode, labels, palette, mark = read(tmp_path / "out" / f"{stem}.png")
        assert mode == "P" and mark == PNG_MARK  # a palette PNG, marked as infer.py's
        assert palette[:9] == [0, 0, 0, *type_colours(TYPES)[0], *type_colours(TYPES)[1]]
        np.testing.assert_array_equal(labels, expected_types(grey))
        assert set(np.unique(labels)) == {0, 1, 2}
        for name, value in TYPES.items():  # PROB/<type>/<stem>.png: 8-bit, high exactly where that type is
            mode, prob, _, mark = read(tmp_path / "prob" / structure_slug(name) / f"{stem}.png")
            assert mode == "L" and prob.dtype == np.uint8 and mark == PNG_MARK
            assert prob[labels == value].min() > 200 and prob[labels != value].max() < 50
        _, rgb, _, _ = read(tmp_path / "out" / "overlays" / f"{stem}.png")
        ggo, cons, lung = rgb[labels == 1], rgb[labels == 2], rgb[expected_types(grey) == 0]
        assert len(np.unique(ggo, axis=0)) == 1  # one colour over one grey level
        assert not np.array_equal(ggo[0], cons[0]) and (lung[:, 0] == lung[:, 1]).all()  # types differ, rest grey
    assert sorted(p.name for p in (tmp_path / "prob").iterdir()) == sorted(structure_slug(n) for n in TYPES)
    assert not list((tmp_path / "prob").glob("*.png"))  # no union map beside the per-type ones


def test_one_slice_gets_a_label_png_and_per_type_maps(slices, tmp_path):
    folder, arrays = slices
    ckpt = make_checkpoint(tmp_path / "t.pth", "lung+lesion-types")
    run(ckpt, folder / "a.png", tmp_path / "mask.png", save_probs=tmp_path / "prob")
    _, labels, _, _ = read(tmp_path / "mask.png")
    np.testing.assert_array_equal(labels, expected_types(arrays["a"]))  # the lung class is no lesion
    assert (tmp_path / "prob" / structure_slug(CONS) / "mask.png").exists()
    run(ckpt, folder / "a.png", tmp_path / "mask.png", save_probs=tmp_path / "prob")  # its own files: replaced


def test_lesion_any_writes_the_union_as_a_binary_model_does(slices, tmp_path):
    folder, arrays = slices
    ckpt = make_checkpoint(tmp_path / "t.pth", "lesion-types")
    run(ckpt, folder, tmp_path / "out", save_probs=tmp_path / "prob", lesion="any")
    for stem, grey in arrays.items():
        mode, mask, _, _ = read(tmp_path / "out" / f"{stem}.png")
        assert mode == "L" and set(np.unique(mask)) == {0, 255}
        np.testing.assert_array_equal(mask == 255, expected_types(grey) > 0)
        assert read(tmp_path / "prob" / f"{stem}.png")[0] == "L"
    settings = json.loads((tmp_path / "out" / "infer_manifest.json").read_text())["settings"]
    assert settings["lesion"] == "any"
    run(ckpt, folder, tmp_path / "out", save_probs=tmp_path / "prob")  # other settings: redone as types
    assert read(tmp_path / "out" / "a.png")[0] == "P"


def test_a_binary_checkpoint_is_unchanged(slices, tmp_path):
    folder, arrays = slices
    ckpt = make_checkpoint(tmp_path / "b.pth", "lesion")
    run(ckpt, folder, tmp_path / "out", save_probs=tmp_path / "prob")
    mode, mask, _, _ = read(tmp_path / "out" / "a.png")
    assert mode == "L" and set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask == 255, expected_types(arrays["a"]) > 0)
    assert read(tmp_path / "prob" / "a.png")[0] == "L" and not [p for p in (tmp_path / "prob").iterdir() if p.is_dir()]
    assert "lesion" not in json.loads((tmp_path / "out" / "infer_manifest.json").read_text())["settings"]
    for src, out, probs in ((folder, tmp_path / "out", tmp_path / "out"), (folder / "a.png", tmp_path / "m" / "a.png",
                                                                           tmp_path / "m")):
        with pytest.raises(InputError, match="--save-probs"):  # maps named like the masks would replace them
            run(ckpt, src, out, save_probs=probs)
    assert read(tmp_path / "out" / "a.png")[1].tolist() == mask.tolist() and not (tmp_path / "m").exists()


def test_a_bad_lesion_mode_is_refused(slices, tmp_path):
    with pytest.raises(InputError, match="--lesion"):
        run(make_checkpoint(tmp_path / "t.pth", "lesion-types"), slices[0], tmp_path / "out", lesion="ggo")


# ----------------------------------------------------------------------------- volumes
def hu_volume(z: int = 4, shift: int = 0) -> np.ndarray:
    """(X, Y, Z) HU: air -1024, a lung block -900, a ground-glass block -500, a consolidation block 0, on every slice."""
    grey = np.stack([grey_blocks(shift) for _ in range(z)], axis=-1).astype(np.float32)
    return grey / 255.0 * 1024.0 - 1024.0


AFFINE = np.array([[-0.7, 0, 0, 90.0], [0, 0.8, 0, -60.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def test_volumes_get_a_type_label_map_and_per_type_ml_and_percent(tmp_path):
    src = tmp_path / "vols"
    src.mkdir()
    for case, shift in (("p1", 0), ("p2", 2)):
        nib.save(nib.Nifti1Image(hu_volume(shift=shift), AFFINE), src / f"{case}.nii.gz")
    ckpt = make_checkpoint(tmp_path / "t.pth", "lung+lesion-types")
    run(ckpt, src, tmp_path / "out", save_probs=tmp_path / "prob")
    for case, shift in (("p1", 0), ("p2", 2)):
        img = nib.load(tmp_path / "out" / f"{case}_lesion.nii.gz")
        lesion = np.asarray(img.dataobj)
        assert lesion.shape == (S, S, 4) and np.allclose(img.affine, AFFINE) and lesion.dtype == np.uint8
        grey = np.round((hu_volume(shift=shift) + 1024) / 1024 * 255).astype(np.uint8)
        np.testing.assert_array_equal(lesion, expected_types(grey))
        lung = np.asarray(nib.load(tmp_path / "out" / f"{case}_lung.nii.gz").dataobj) > 0
        report = json.loads((tmp_path / "out" / f"{case}_report.json").read_text())
        assert report["lesion_labels"] == TYPES and abs(report["voxel_ml"] - abs(np.linalg.det(AFFINE[:3, :3])) / 1000) < 1e-6  # float32 header
        voxel_ml = report["voxel_ml"]
        for name, value in TYPES.items():
            slug = structure_slug(name)
            assert abs(report[f"{slug}_ml"] - (lesion == value).sum() * voxel_ml) < 1e-9
            assert report[f"{slug}_ml"] > 0
            share = 100 * ((lesion == value) & lung).sum() / lung.sum()
            assert abs(report[f"{slug}_percent"] - share) < 1e-9
            for side in ("left", "right"):  # each lung's share, weighted by its volume, adds up to the whole
                assert report[f"{slug}_percent_{side}"] is not None
            parts = sum(report[f"{slug}_percent_{s}"] * report[f"lung_{s}_ml"] for s in ("left", "right"))
            assert abs(parts / report["lung_ml"] - share) < 1e-9
        assert abs(report["lesion_ml"] - (lesion > 0).sum() * voxel_ml) < 1e-9  # the union as before
        assert not list((tmp_path / "out").glob(f"{case}_{structure_slug(GGO)}*"))  # no per-type NIfTI
        for name, value in TYPES.items():  # but a probability map per type: PROB/<type>/<case>_lesion.nii.gz
            prob = nib.load(tmp_path / "prob" / structure_slug(name) / f"{case}_lesion.nii.gz")
            assert prob.get_data_dtype() == np.uint8 and np.allclose(prob.affine, AFFINE)  # shown as 0..1
            assert prob.get_fdata()[lesion == value].min() > 0.9 and prob.get_fdata()[lesion != value].max() < 0.1
    columns = (tmp_path / "out" / "report.csv").read_text().splitlines()[0].split(",")
    assert {f"{structure_slug(n)}_{k}" for n in TYPES for k in ("ml", "percent", "percent_left")} <= set(columns)
    assert "lesion_labels" not in columns


def test_a_volume_with_lesion_any_gets_a_binary_lesion_mask(tmp_path):
    nib.save(nib.Nifti1Image(hu_volume(), AFFINE), tmp_path / "p.nii.gz")
    run(make_checkpoint(tmp_path / "t.pth", "lesion-types"), tmp_path / "p.nii.gz", tmp_path / "out", lesion="any",
        save_probs=tmp_path / "prob")
    lesion = np.asarray(nib.load(tmp_path / "out" / "p_lesion.nii.gz").dataobj)
    assert set(np.unique(lesion)) == {0, 1}
    assert [p.name for p in (tmp_path / "prob").iterdir()] == ["p_lesion.nii.gz"]  # the union's map only
    np.testing.assert_array_equal(nib.load(tmp_path / "prob" / "p_lesion.nii.gz").get_fdata() > 0.5, lesion == 1)
    report = json.loads((tmp_path / "out" / "p_report.json").read_text())
    assert f"{structure_slug(GGO)}_ml" not in report and "lesion_labels" not in report
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["p_lesion.nii.gz", "p_lung.nii.gz"]


def test_dicom_seg_has_one_segment_per_lesion_type(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from tests.test_dicom import write_series

    write_series(tmp_path / "series", hu_volume(), AFFINE)
    for f in (tmp_path / "series").iterdir():
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.save_as(f)
    run(make_checkpoint(tmp_path / "t.pth", "lung+lesion-types"), tmp_path / "series", tmp_path / "out",
        dicom_seg=True)
    seg = pydicom.dcmread(tmp_path / "out" / "series_seg.dcm")
    segments = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence}
    assert set(segments) == {"lung", GGO, CONS}
    assert segments[GGO].CodeValue == "112120" and segments[CONS].CodeValue == "9656002"
    lesion = np.asarray(nib.load(tmp_path / "out" / "series_lesion.nii.gz").dataobj)
    frames = {s.SegmentNumber: 0 for s in seg.SegmentSequence}
    pixels = seg.pixel_array.reshape(-1, *seg.pixel_array.shape[-2:])
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        frames[item.SegmentIdentificationSequence[0].ReferencedSegmentNumber] += int(frame.sum())
    numbers = {s.SegmentLabel: s.SegmentNumber for s in seg.SegmentSequence}
    for name, value in TYPES.items():  # every voxel of the type is in its segment, once
        assert frames[numbers[name]] == int((lesion == value).sum())
