"""Lesion types (ground-glass opacity, consolidation): tasks, label masks in pair folders, preprocessed volumes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, save_nifti, tiny_case
from PIL import Image

from data.dataset import PairFolderDataset, SliceArrayDataset, find_pair_dirs, pair_files
from data.labels import (IGNORE_INDEX, LESION_LABEL_NAMES, TASK_CLASSES, TASK_OUTPUTS, class_targets, task_masks,
                         task_target, type_mask, type_values)
from data.preprocess import preprocess
from data.synthetic import generate_dataset
from data.transforms import InputError, read_label_mask, read_mask
from utils.checkpoint import load_checkpoint, save_checkpoint

GGO, CONS = LESION_LABEL_NAMES["default"]["1"], LESION_LABEL_NAMES["default"]["2"]
SEMISEG = SHARED_DATA / "covid-semiseg"
LABELS = np.array([[0, 1, 1, 2, 0], [0, 2, 2, 0, 1], [0, 0, 0, 0, 0]], np.uint8)  # 0 / GGO / consolidation


def _palette_png(path, labels, palette=(0, 0, 0, 200, 30, 30, 30, 200, 30)):
    """A palette (mode P) PNG whose indices are ``labels``, coloured as a viewer would (not grey levels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes("P", labels.shape[::-1], labels.astype(np.uint8).tobytes())
    img.putpalette(list(palette))
    img.save(path)
    return path


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(path, shape=LABELS.shape):
    return _png(path, (np.arange(np.prod(shape)).reshape(shape) * 7 % 256).astype(np.uint8))


# ----------------------------------------------------------------------------- tasks and targets
def test_types_tasks_are_named_from_the_label_map_and_keep_the_union():
    assert TASK_OUTPUTS["lesion-types"] == ("lesion", GGO, CONS)
    assert TASK_OUTPUTS["lung+lesion-types"] == ("lung", "lesion", GGO, CONS)
    assert (TASK_CLASSES["lesion-types"], TASK_CLASSES["lung+lesion-types"]) == (3, 4)
    assert task_masks("lesion-types") == ("lesion",) and task_masks("lung+lesion-types") == ("lung", "lesion")
    target = torch.tensor([[[0, 1, 2, 3, IGNORE_INDEX]]])
    got = {k: v[0, 0].tolist() for k, v in class_targets(target, "lung+lesion-types").items()}
    assert got == {"lung": [0, 1, 1, 1, 0], "lesion": [0, 0, 1, 1, 0], GGO: [0, 0, 1, 0, 0], CONS: [0, 0, 0, 1, 0]}
    got = {k: v[0, 0].tolist() for k, v in class_targets(target, "lesion-types").items()}
    assert got == {"lesion": [0, 1, 1, 0, 0], GGO: [0, 1, 0, 0, 0], CONS: [0, 0, 1, 0, 0]}


def test_type_mask_maps_other_labels_to_background_or_ignore():
    labels = np.array([0, 1, 2, 3, 7], np.uint8)  # 3: MedSeg's pleural effusion
    values = type_values({GGO: 1, CONS: 2, "pleural effusion": 3})
    assert values == {1: 1, 2: 2}
    assert type_mask(labels, values).tolist() == [0, 1, 2, 0, 0]
    assert type_mask(labels, values, "ignore").tolist() == [0, 1, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert type_mask(labels, {5: 1, 1: 2}).tolist() == [0, 2, 0, 0, 0]  # the map decides, not the values
    with pytest.raises(ValueError, match="other labels must be one of"):
        type_mask(labels, values, "drop")


def test_task_target_of_types_hand_checked():
    lesion = np.array([[0, 1, 2, IGNORE_INDEX], [0, 2, 0, 0]], np.uint8)
    lung = np.array([[1, 1, 0, 1], [0, 1, 1, 0]], np.uint8)
    assert task_target(lesion, None, "lesion-types").tolist() == lesion.tolist()
    assert task_target(lesion, lung, "lung+lesion-types").tolist() == [[1, 2, 3, IGNORE_INDEX], [0, 3, 1, 0]]


@pytest.mark.parametrize("names", [{"infection": 1}, {f"{GGO} / infection": 1, CONS: 2}, {GGO: 1}])
def test_a_label_map_without_both_types_is_refused(names):
    with pytest.raises(ValueError, match="do not name"):
        type_values(names)


# ----------------------------------------------------------------------------- label masks
def test_palette_8_and_16_bit_label_masks_keep_their_labels(tmp_path):
    files = [_palette_png(tmp_path / "p.png", LABELS), _png(tmp_path / "l.png", LABELS),
             _png(tmp_path / "i16.png", LABELS.astype(np.uint16))]
    for path in files:
        labels, is_label_map = read_label_mask(path)
        assert is_label_map and labels.dtype == np.uint8, path
        np.testing.assert_array_equal(labels, LABELS)
        np.testing.assert_array_equal(read_mask(path), LABELS > 0)  # read_mask is unchanged: the union


def test_a_binary_mask_reads_as_label_1_and_not_a_label_map(tmp_path):
    path = _png(tmp_path / "b.png", (LABELS > 0).astype(np.uint8) * 255)
    labels, is_label_map = read_label_mask(path)
    assert not is_label_map
    np.testing.assert_array_equal(labels, LABELS > 0)
    np.testing.assert_array_equal(labels, read_mask(path))


def test_a_fractional_label_map_is_refused(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0, 0.5], [1, 2]], np.float32), mode="F").save(path)
    with pytest.raises(InputError, match=r"f\.tif: mask values such as 0.5 are not labels"):
        read_label_mask(path)


def test_pair_folder_gives_types_targets_and_refuses_binary_masks(tmp_path):
    image = _image(tmp_path / "img" / "a.png")
    ds = PairFolderDataset([(image, _palette_png(tmp_path / "types" / "a.png", LABELS))],
                           {"size": LABELS.shape}, task="lesion-types")
    assert ds.labels == {"lesion": {GGO: 1, CONS: 2}}
    np.testing.assert_array_equal(ds[0][1].numpy(), LABELS)
    binary = _png(tmp_path / "binary" / "a.png", (LABELS > 0).astype(np.uint8) * 255)
    ds = PairFolderDataset([(image, binary)], {"size": LABELS.shape}, task="lesion-types")
    with pytest.raises(InputError, match=r"binary.*a\.png: a binary \(0/255\) mask has no lesion types.*"
                                         r"'lesion-types'.*1 ground-glass opacity, 2 consolidation"):
        ds[0]
    with pytest.raises(InputError, match="needs lung masks"):
        PairFolderDataset([(image, binary)], {"size": 8}, task="lung+lesion-types")


def test_binary_pair_targets_are_unchanged(tmp_path):
    image = _image(tmp_path / "img" / "a.png", (20, 30))
    labels = np.zeros((20, 30), np.uint8)
    labels[3:9, 4:12], labels[12:15, 20:26] = 1, 2
    masks = (_palette_png(tmp_path / "p" / "a.png", labels), _png(tmp_path / "l" / "a.png", labels),
             _png(tmp_path / "b" / "a.png", (labels > 0).astype(np.uint8) * 255))
    for mask in masks:
        for size in ((20, 30), 16):
            ds = PairFolderDataset([(image, mask)], {"size": size})
            assert ds.task == "lesion" and ds.labels == {"lesion": {"lesion": 1}}
            want = torch.nn.functional.interpolate(torch.from_numpy(read_mask(mask))[None, None].float(),
                                                   size=size, mode="nearest-exact")[0, 0].long()
            assert torch.equal(ds[0][1], want)


def test_semiseg_multiclass_layout_is_found_for_types_tasks_only(tmp_path):
    root = tmp_path / "covid-semiseg"
    for name in ("0", "1"):
        _image(root / "TrainingSet" / "LungInfection-Train" / "Doctor-label" / "Imgs" / f"{name}.png")
        _png(root / "TrainingSet" / "LungInfection-Train" / "Doctor-label" / "GT" / f"{name}.png",
             (LABELS > 0).astype(np.uint8) * 255)
        _palette_png(root / "TrainingSet" / "MultiClassInfection-Train" / "GT" / f"{name}.png", LABELS)
    doctor = root / "TrainingSet" / "LungInfection-Train" / "Doctor-label"
    types = (doctor / "Imgs", root / "TrainingSet" / "MultiClassInfection-Train" / "GT")
    assert find_pair_dirs(root, task="lesion-types") == types
    assert find_pair_dirs(root / "TrainingSet", task="lesion-types") == types
    assert find_pair_dirs(root) == find_pair_dirs(root, task="lesion") == (doctor / "Imgs", doctor / "GT")
    ds = PairFolderDataset(pair_files(*types), {"size": LABELS.shape}, task="lesion-types")
    assert [ds.case_of(i) for i in range(len(ds))] == ["0", "1"]
    np.testing.assert_array_equal(ds[1][1].numpy(), LABELS)


@pytest.mark.skipif(not SEMISEG.is_dir(), reason="real data ../shared/data/covid-semiseg absent (fresh clone)")
def test_real_semiseg_multiclass_masks_match_the_binary_ones():
    types_pairs = pair_files(*find_pair_dirs(SEMISEG, task="lesion-types"))
    binary = {img.stem: mask for img, mask in pair_files(*find_pair_dirs(SEMISEG))}
    assert len(types_pairs) == len(binary) == 50
    seen = set()
    for img, mask in types_pairs:
        labels, is_label_map = read_label_mask(mask)
        assert is_label_map
        seen |= set(np.unique(labels).tolist())
        np.testing.assert_array_equal(labels > 0, read_mask(binary[img.stem]), err_msg=str(mask))
    assert seen == {0, 1, 2}
    target = PairFolderDataset(types_pairs[:1], {"size": 64}, task="lesion-types")[0][1]
    assert set(target.unique().tolist()) <= {0, 1, 2}


# ----------------------------------------------------------------------------- preprocessed volumes
def _volumes(root, lesion_extra=None, **kwargs):
    """Two tiny_case volumes (lesion 1 GGO, 2 consolidation; ``lesion_extra`` value added), preprocessed."""
    for i in range(2):
        case = tiny_case(i, (32, 32, 3))
        if lesion_extra is not None:
            case["lesion"][10:12, 10:12, 1] = lesion_extra
        for sub, key in (("images", "image"), ("lung_masks", "lung"), ("lesion_masks", "lesion")):
            save_nifti(root / "src" / sub / f"c{i}.nii.gz", case[key])
    preprocess(root / "src", root / "out", size=32, workers=1, progress=False, **kwargs)
    return root / "out"


def _targets(ds):
    return np.stack([ds[i][1].numpy() for i in range(len(ds))])


def test_synthetic_phantoms_give_types_targets(tmp_path):
    generate_dataset(tmp_path / "src", 2, 0, shape=(48, 48, 8))
    preprocess(tmp_path / "src", tmp_path / "out", size=48, workers=1, progress=False)
    lesion = np.load(tmp_path / "out" / "lesion_masks.npy")
    lung = np.load(tmp_path / "out" / "lung_masks.npy")
    assert set(np.unique(lesion).tolist()) == {0, 1, 2}
    ds = SliceArrayDataset(tmp_path / "out", None, "lesion-types")
    assert ds.labels == {"lesion": {GGO: 1, CONS: 2}}
    np.testing.assert_array_equal(_targets(ds), lesion)
    ds = SliceArrayDataset(tmp_path / "out", None, "lung+lesion-types")
    assert list(ds.labels) == ["lung", "lesion"] and ds.labels["lesion"] == {GGO: 1, CONS: 2}
    both = _targets(ds)
    np.testing.assert_array_equal(both, np.where(lesion > 0, lesion + 1, lung > 0))
    assert set(np.unique(both).tolist()) == {0, 1, 2, 3}
    binary = _targets(SliceArrayDataset(tmp_path / "out", None, "lesion"))
    np.testing.assert_array_equal(binary, lesion > 0)  # the binary task as before


def test_effusion_goes_to_background_or_ignore_and_the_map_survives_a_checkpoint(tmp_path):
    out = _volumes(tmp_path, lesion_extra=3)
    lesion = np.load(out / "lesion_masks.npy")
    assert set(np.unique(lesion).tolist()) == {0, 1, 2, 3}
    ds = SliceArrayDataset(out, None, "lesion-types")
    assert ds.labels == {"lesion": {GGO: 1, CONS: 2}}  # label 3 is no class of the task
    np.testing.assert_array_equal(_targets(ds), np.where(lesion == 3, 0, lesion))
    ignored = _targets(SliceArrayDataset(out, None, "lesion-types", other_labels="ignore"))
    np.testing.assert_array_equal(ignored, np.where(lesion == 3, IGNORE_INDEX, lesion))
    np.testing.assert_array_equal(_targets(SliceArrayDataset(out, None, "lesion")), lesion > 0)  # unchanged
    save_checkpoint({"model": {}, "model_config": {"name": "unet"}, "task": ds.task, "labels": ds.labels},
                    tmp_path / "c.pth")
    ckpt = load_checkpoint(tmp_path / "c.pth")
    assert ckpt["labels"] == ds.labels and type_values(ckpt["labels"]["lesion"]) == ds.types


def test_volumes_without_types_are_refused_for_types_tasks(tmp_path):
    out = _volumes(tmp_path / "ggo", lesion_labels=[1])  # consolidation left out at preprocessing
    with pytest.raises(InputError, match=r"meta\.json: task 'lesion-types' needs lesion types.*'consolidation'"):
        SliceArrayDataset(out, None, "lesion-types")
    out = _volumes(tmp_path / "old")
    meta = json.loads((out / "meta.json").read_text())
    del meta["labels"], meta["lesion_labels"]  # written before preprocessing kept the labels
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="binary .*preprocess the volumes again"):
        SliceArrayDataset(out, None, "lung+lesion-types")
