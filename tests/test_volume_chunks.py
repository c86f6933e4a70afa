"""Volume inference in chunks of slices (data.look, engine.predict, utils.volumes): the same values as the
whole volume at once, on transposed views (the layout read_case returns) and on crop boxes that end before
the last slice (restore_volume once smeared or refused those)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.labels import TYPE_TASKS
from data.look import present_volume, restore_volume
from data.readers import Volume
from data.transforms import make_preprocessing, normalize, resize_images
from engine.predict import Predictor, main_structure, type_prediction
from models import build_model
from utils.checkpoint import save_checkpoint
from utils.volumes import HIGH_OPACITY_HU, ZONES, split_lungs, volume_report, zone_of_slices


def _transposed(rng, shape) -> np.ndarray:
    """Random HU slices as a transposed, flipped view, as data.transforms.to_axial_slices returns them."""
    z, h, w = shape
    return (rng.normal(-500, 500, (w, h, z)).astype(np.float32).T)[:, ::-1]


@pytest.mark.parametrize("prep", [make_preprocessing(32), make_preprocessing(32, "minmax"),
                                  {**make_preprocessing(32, "minmax"), "look": {"window": [-1090.0, 260.0],
                                                                                 "crop": "none"}}])
def test_present_volume_is_each_slice_prepared_alone(prep):
    hu = _transposed(np.random.default_rng(0), (45, 40, 50))  # more slices than one chunk
    shown, box = present_volume(hu, prep)
    assert box == (0, 45, 0, 40, 0, 50)
    for z in (0, 31, 32, 44):
        x = hu[z:z + 1]
        if "look" in prep:
            x = np.round(255 * normalize(x, "window", prep["look"]["window"])) / np.float32(255)
        one = resize_images(normalize(x, prep["norm"], prep["window"]), prep["size"])[0]
        assert torch.equal(shown[z], one)


@pytest.mark.parametrize("box", [(1, 6, 2, 20, 3, 25), (0, 12, 0, 30, 0, 40), (11, 12, 5, 6, 0, 40)])
def test_restore_volume_puts_each_slice_in_its_box_and_zeros_elsewhere(box):
    """A box ending before the last slice: each restored slice is its own map resized, nothing smeared past z1."""
    z0, z1, y0, y1, x0, x1 = box
    probs = torch.rand((z1 - z0, 16, 16), generator=torch.Generator().manual_seed(1))
    full = restore_volume(probs, box, (12, 30, 40), chunk=4)
    expected = torch.zeros((12, 30, 40))
    for i in range(z1 - z0):
        expected[z0 + i, y0:y1, x0:x1] = resize_images(probs[i:i + 1], (y1 - y0, x1 - x0))[0]
    assert torch.equal(full, expected)


@pytest.mark.parametrize("task", ["lesion", TYPE_TASKS[0]])
def test_predict_volume_is_volume_probs_thresholded(task, tmp_path):
    """The masks are the probability maps thresholded (and typed), on a volume of several chunks."""
    classes = 1 if task == "lesion" else 3
    torch.manual_seed(0)
    model = build_model("unet", num_classes=classes, width=4)
    ckpt = tmp_path / "m.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": {"name": "unet", **model.config},
                     "num_classes": classes, "task": task, "preprocessing": make_preprocessing(32)}, ckpt)
    predictor = Predictor(ckpt, "cpu", "off", batch_size=4)
    vol = Volume(tmp_path / "v.nii.gz", None, (48, 40, 37))
    vol.image = _transposed(np.random.default_rng(2), (37, 40, 48))
    _, images, probs = predictor.volume_probs(vol)
    main = probs[main_structure(task)]
    threshold = float(main.median())  # about half the voxels on each side
    _, images2, masks = predictor.predict_volume(vol, threshold, types=task != "lesion")
    assert np.array_equal(images, images2)
    assert 0 < masks[main_structure(task)].sum() < masks[main_structure(task)].size
    if task == "lesion":
        assert list(masks) == list(probs)
        for name, p in probs.items():
            assert masks[name].dtype == np.uint8 and np.array_equal(masks[name], (p > threshold).numpy())
    else:
        expected = type_prediction(probs, task, threshold).numpy().astype(np.uint8)
        assert set(np.unique(expected)) > {0} and np.array_equal(masks[main_structure(task)], expected)


def test_volume_report_counts_match_whole_volume_masks():
    """Per-slice counting gives the figures of the masks themselves (zones, sides, high opacity)."""
    rng = np.random.default_rng(3)
    lung = (rng.random((20, 24, 30)) < 0.6).astype(np.uint8)
    lung[:3] = 0
    lesion = (rng.random(lung.shape) < 0.3).astype(np.uint8)
    hu = rng.normal(-400, 300, lung.shape).astype(np.float32)
    report = volume_report(lesion, lung, 0.5, hu=hu)
    right, left = split_lungs(lung)
    les = lesion > 0
    for side, mask in (("left", left), ("right", right)):
        zones = zone_of_slices(mask)
        for zone, name in enumerate(ZONES):
            part = mask & (zones == zone)[:, None, None]
            assert report[f"lung_ml_{side}_{name}"] == part.sum() * 0.5
            assert report[f"lesion_ml_{side}_{name}"] == (les & part).sum() * 0.5
    dense = les & (hu >= HIGH_OPACITY_HU)
    assert report["high_opacity_percent_left"] == pytest.approx(100 * (dense & left).sum() / left.sum(), abs=1e-12)
    assert report["infection_percent"] == pytest.approx(100 * (les & (lung > 0)).sum() / (lung > 0).sum(), abs=1e-12)
    assert report["slices_with_lesion"] == int(les.any(axis=(1, 2)).sum())
