"""Malformed input the other test files do not try: absurd sizes, odd paths, unwritable outputs, odd labels.

Each case ends in one clear line naming the file (no traceback, non-zero exit) or in a documented handling.
"""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data.labels import structure_mask
from data.preprocess import preprocess
from data.transforms import MAX_IMAGE_SIDE, MAX_VOLUME_VOXELS, InputError, load_nifti, read_image
from tests.script_fixtures import processed, run_script, trained  # noqa: F401


def one_line_error(res, *words: str) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_absurd_image_size_is_refused_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (MAX_IMAGE_SIDE + 1, 1)).save(path)  # a few hundred bytes on disk
    with pytest.raises(InputError, match=r"wide\.png.*larger than"):
        read_image(path)


def test_absurd_volume_header_is_refused_before_reading(tmp_path):
    # a header claiming more voxels than the limit; the file itself holds almost nothing
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape((2048, 2048, 1024))
    path = tmp_path / "huge.nii"
    path.write_bytes(img.header.binaryblock + b"\0" * 4 + b"\0" * 16)
    assert np.prod(nib.load(path).shape) > MAX_VOLUME_VOXELS
    with pytest.raises(InputError, match=r"huge\.nii.*voxel limit"):
        load_nifti(path)


def test_paths_with_spaces_and_non_ascii_work_end_to_end(trained, processed, tmp_path):
    odd = tmp_path / "my scans" / "pätient ünï 1"
    odd.mkdir(parents=True)
    row = json.loads((processed / "meta.json").read_text())["slices"][0]
    image = (np.load(processed / "images.npy", mmap_mode="r")[0] * 255).astype(np.uint8)
    Image.fromarray(image).save(odd / "slice ä 1.png")
    res = run_script("infer.py", "--checkpoint", str(trained["out"] / "best_model.pth"),
                     "--input", str(odd), "--output", str(odd / "masks ü"))
    assert res.returncode == 0, res.stderr
    assert (odd / "masks ü" / "slice ä 1.png").is_file() and row["case"]


def test_volume_paths_with_spaces_and_non_ascii_preprocess(tmp_path):
    src = tmp_path / "données CT" / "images"
    src.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.full((16, 16, 2), -500, np.int16), np.eye(4)), src / "patient é 1.nii.gz")
    meta = preprocess(src.parent, tmp_path / "sortie ü", size=16, workers=1, progress=False)
    assert list(meta["cases"]) == ["patient é 1"] and len(meta["slices"]) == 2


def test_unwritable_output_is_one_clear_line(trained, processed, tmp_path):
    image = (np.load(processed / "images.npy", mmap_mode="r")[0] * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "s.png")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should go")
    res = run_script("infer.py", "--checkpoint", str(trained["out"] / "best_model.pth"),
                     "--input", str(tmp_path / "s.png"), "--output", str(blocker / "mask.png"))
    one_line_error(res, "not_a_folder")
    res = run_script("evaluate.py", "--checkpoint", str(trained["out"] / "best_model.pth"),
                     "--data", str(processed), "--out", str(blocker / "eval"))
    one_line_error(res, "not_a_folder")


def _volume_dir(root, lesion_values):
    for sub in ("images", "lesion_masks"):
        (root / sub).mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.full((16, 16, 2), -500, np.int16), np.eye(4)), root / "images" / "c.nii.gz")
    mask = np.zeros((16, 16, 2), np.int16)
    mask[4:8, 4:8, 0] = lesion_values
    nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "lesion_masks" / "c.nii.gz")


def test_negative_mask_labels_are_one_clear_line(tmp_path):
    _volume_dir(tmp_path / "src", -1)
    res = run_script("-m", "data.preprocess", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                     "--size", "16", "--workers", "1")
    one_line_error(res, "c.nii.gz", "labels")
    assert not (tmp_path / "out").exists()


def test_unexpected_positive_labels_count_as_lesion_and_are_recorded(tmp_path):
    _volume_dir(tmp_path / "src", 7)
    meta = preprocess(tmp_path / "src", tmp_path / "out", size=16, workers=1, progress=False)
    assert meta["cases"]["c"]["lesion_label_values"] == [0, 7]
    # the original labels are kept; the lesion is the binary view label > 0 (data.labels.structure_mask)
    lesion = np.load(tmp_path / "out" / "lesion_masks.npy")
    assert set(np.unique(lesion)) == {0, 7} and structure_mask(lesion, meta["lesion_labels"]).sum() == 16
    shutil.rmtree(tmp_path / "out")
    meta = preprocess(tmp_path / "src", tmp_path / "out", size=16, workers=1, progress=False, lesion_labels=[1, 2])
    assert structure_mask(np.load(tmp_path / "out" / "lesion_masks.npy"), meta["lesion_labels"]).sum() == 0
