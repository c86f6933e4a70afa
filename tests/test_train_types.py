"""Training with lesion types (ground-glass opacity vs consolidation): losses with ignore_index and class
weights, validation, and tiny end-to-end runs on label-mask pair folders and on preprocessed phantoms."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from base import InputError
from data.dataset import SEMISEG_IMAGES, SEMISEG_TYPES
from data.labels import IGNORE_INDEX, LESION_TYPES, TASK_CLASSES, structure_slug
from engine.training import build_loss, class_weights, default_loss, validate
from models import model_from_checkpoint
from tests.script_fixtures import REPO, SIZE, export_pairs, processed, run_train, train_argv  # noqa: F401
from utils.losses import ce_loss, dice_loss, get_loss

GGO, CONS = (LESION_TYPES[name] for name in LESION_TYPES)  # 1, 2: the labels on disk


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", ["ce", "dice", "ce_dice", "ce_dice_union"])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_ignored_pixels_change_nothing(name, batch_dice):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[:, :2] = IGNORE_INDEX
    loss = get_loss(name, "multiclass", 3, batch_dice=batch_dice, ignore_index=IGNORE_INDEX)
    other = logits.clone()
    other[:, :, :2] = torch.randn(2, 3, 2, 4) * 10  # the ignored rows say something else entirely
    assert loss(other, target).item() == pytest.approx(loss(logits, target).item(), abs=1e-6)
    # and equals the loss of the kept rows alone
    kept = get_loss(name, "multiclass", 3, batch_dice=batch_dice)(logits[:, :, 2:], target[:, 2:])
    assert loss(logits, target).item() == pytest.approx(kept.item(), abs=1e-6)


def test_ce_with_every_pixel_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    value = ce_loss(logits, torch.full((1, 2, 2), IGNORE_INDEX), ignore_index=IGNORE_INDEX)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_softmax_dice_ignores_by_hand():
    # one image, 2 classes; pixel 0 class 1, pixel 1 ignored, and the model is sure of class 1 everywhere
    logits = torch.tensor([[[[-20.0, -20.0]], [[20.0, 20.0]]]])
    target = torch.tensor([[[1, IGNORE_INDEX]]])
    assert dice_loss(logits, target, ignore_index=IGNORE_INDEX).item() == pytest.approx(0.0, abs=1e-6)
    # without ignore_index, pixel 1 would be a false positive: 1 - (2 + 1) / (2 + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(0.25, abs=1e-6)


def test_binary_losses_refuse_ignore_index():
    with pytest.raises(ValueError, match="multiclass"):
        get_loss("bce_dice", "binary", 2, ignore_index=IGNORE_INDEX)


def test_class_weights_weigh_the_cross_entropy():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    w = [1.0, 2.0, 5.0]
    assert get_loss("ce", "multiclass", 3, class_weights=w)(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target, weight=torch.tensor(w)).item(), rel=1e-6)
    target[0, 0] = IGNORE_INDEX
    with_ignore = get_loss("ce", "multiclass", 3, ignore_index=IGNORE_INDEX, class_weights=w)(logits, target)
    assert with_ignore.item() == pytest.approx(F.cross_entropy(logits, target, weight=torch.tensor(w),
                                                               ignore_index=IGNORE_INDEX).item(), rel=1e-6)
    with pytest.raises(ValueError, match="one weight per class"):
        get_loss("ce", "multiclass", 3, class_weights=[1.0, 2.0])
    with pytest.raises(InputError, match="ce, ce_dice, ce_dice_union"):
        build_loss("dice", "lesion-types", class_weights=w)


def test_class_weights_from_counts():
    target = torch.zeros(10, 10, dtype=torch.uint8)  # 64 background, 16 class 1, no class 2, 20 ignored
    target[:2] = IGNORE_INDEX
    target[2:4, :8] = 1
    dataset = [(torch.zeros(1, 10, 10), target)]
    # 1 / sqrt(frequency), over background's: sqrt(64 / 16) = 2; an absent class gets the largest
    assert class_weights(dataset, 3) == pytest.approx([1.0, 2.0, 2.0])


def test_default_loss_is_softmax_beyond_two_classes():
    assert default_loss("unet", "lesion") == "bce_dice"
    assert default_loss("deeplabv3", "lesion") == "ce_dice"
    for task in ("lung+lesion", "lesion-types", "lung+lesion-types"):
        assert default_loss("unet", task) == "ce_dice"
    criterion, channels = build_loss("ce_dice", "lesion-types")
    assert channels == TASK_CLASSES["lesion-types"] == 3
    target = torch.full((1, 2, 2), IGNORE_INDEX)
    target[0, 0, 0] = 1
    logits = torch.randn(1, 3, 2, 2)
    moved = logits.clone()
    moved[0, :, 1] += 7.0  # ignored pixels only
    assert criterion(moved, target).item() == pytest.approx(criterion(logits, target).item(), abs=1e-6)


def test_union_loss_trains_the_task_lesion():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 3)
    target = torch.randint(0, 4, (2, 3, 3))  # lung+lesion-types: 0 background, 1 lung, 2 GGO, 3 consolidation
    criterion, channels = build_loss("ce_dice_union", "lung+lesion-types", batch_dice=False)
    assert channels == 4
    lesion = get_loss("ce_dice_union", "multiclass", 4, batch_dice=False, ignore_index=IGNORE_INDEX, union=(2, 3))
    torch.testing.assert_close(criterion(logits, target), lesion(logits, target))
    assert criterion(logits, target).item() != pytest.approx(
        get_loss("ce_dice_union", "multiclass", 4, batch_dice=False)(logits, target).item())  # not lung + lesion
    with pytest.raises(InputError, match="task 'lung' has no lesion"):
        build_loss("ce_dice_union", "lung")


# ----------------------------------------------------------------------------- validation
class Fixed(torch.nn.Module):
    """A "model" answering the same logits for every batch."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits.expand(len(images), -1, -1, -1)


def test_validation_leaves_ignored_pixels_out_and_ranks_by_the_types():
    # 1x4 image: GGO, GGO, consolidation, ignored; the model calls pixel 1 consolidation and the ignored GGO
    target = torch.tensor([[[GGO, GGO, CONS, IGNORE_INDEX]]])
    called = torch.tensor([GGO, CONS, CONS, GGO])
    logits = F.one_hot(called, 3).T.float().reshape(1, 3, 1, 4) * 20
    criterion, _ = build_loss("ce", "lesion-types")
    val = validate(Fixed(logits), [(torch.zeros(1, 1, 1, 4), target)], criterion, "lesion-types",
                   torch.device("cpu"), None)
    ggo, cons = (f"{structure_slug(name)}_dice" for name in LESION_TYPES)
    # GGO: tp 1, fn 1, and the ignored pixel is no false positive -> 2/3; consolidation: tp 1, fp 1 -> 2/3
    assert val[ggo] == pytest.approx(2 / 3) and val[cons] == pytest.approx(2 / 3)
    assert val["dice"] == val["lesion_dice"] == pytest.approx(1.0)  # the union: every lesion pixel found
    assert val["score"] == pytest.approx(2 / 3)  # the types' mean, not the union's 1
    assert math.isfinite(val["loss"])


# ----------------------------------------------------------------------------- end to end
def write_semiseg_types(processed, root, n: int = 8, effusion: bool = False) -> list[int]:
    """COVID-SemiSeg's multi-class layout from the phantoms' slices: Doctor-label/Imgs/<i>.jpg images and
    MultiClassInfection-Train/GT/<i>.png palette masks (0 background, 1 GGO, 2 consolidation, and 3 in a
    corner with ``effusion``). Returns the lesion labels written."""
    images = np.load(processed / "images.npy", mmap_mode="r")
    lesions = np.load(processed / "lesion_masks.npy", mmap_mode="r")
    rows = [i for i in range(len(lesions)) if lesions[i].any()][:n]
    (root / SEMISEG_IMAGES / "Imgs").mkdir(parents=True)
    (root / SEMISEG_TYPES).mkdir(parents=True)
    seen = set()
    for k, row in enumerate(rows):
        Image.fromarray((np.clip(np.asarray(images[row]).reshape(lesions[row].shape), 0, 1) * 255).astype(np.uint8)).convert("RGB").save(
            root / SEMISEG_IMAGES / "Imgs" / f"{k}.jpg", quality=95)
        labels = np.asarray(lesions[row], dtype=np.uint8).copy()
        if effusion:
            labels[:4, :4] = 3
        seen |= set(np.unique(labels).tolist())
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (256 - 4) * 3)
        mask.save(root / SEMISEG_TYPES / f"{k}.png")
    return sorted(seen)


def check_types_checkpoint(path, task: str, other_labels: str, channels: int | None = None, loss: str = "ce_dice"):
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["task"] == task and ckpt["num_classes"] == TASK_CLASSES[task] and ckpt["loss"] == loss
    assert ckpt["labels"]["lesion"] == LESION_TYPES  # names ground-glass opacity and consolidation
    assert ckpt["other_labels"] == other_labels
    model = model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        side = channels or SIZE
        assert model(torch.rand(1, 1, side, side)).shape == (1, TASK_CLASSES[task], side, side)
    return ckpt


@pytest.mark.parametrize("other", ["background", "ignore"])
def test_unet_trains_lesion_types_on_semiseg_label_masks(processed, tmp_path, capsys, other):
    root = tmp_path / "covid-semiseg"
    assert write_semiseg_types(processed, root, effusion=True) == [0, GGO, CONS, 3]
    result = run_train(train_argv(root, tmp_path / "out", "--task", "lesion-types", "--other-labels", other,
                                  "--val-fraction", "0.25", epochs=1))
    assert "6 train / 2 val slices" in capsys.readouterr().out
    h = result["history"][0]
    assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
    for name in ("lesion", *LESION_TYPES):
        assert 0.0 <= h[f"val_{structure_slug(name)}_dice"] <= 1.0
    check_types_checkpoint(tmp_path / "out" / "last.pth", "lesion-types", other)


def test_binary_masks_are_refused_for_lesion_types(processed, tmp_path):
    root = tmp_path / "binary"
    export_pairs(processed, "train", root, "Imgs", "GT", n=4)  # 0/255 masks: no types in them
    with pytest.raises(InputError, match="no lesion types"):
        run_train(train_argv(root, tmp_path / "out", "--task", "lesion-types", "--val-fraction", "0.25"))


@pytest.mark.parametrize("task", ["lesion-types", "lung+lesion-types"])
def test_unet_trains_types_on_preprocessed_phantoms(processed, tmp_path, task):
    assert {GGO, CONS} <= set(np.unique(np.load(processed / "lesion_masks.npy")).tolist())
    loss = "ce_dice_union" if task == "lung+lesion-types" else "ce_dice"
    result = run_train(train_argv(processed, tmp_path, "--task", task, "--class-weights", "auto", "--loss", loss,
                                  epochs=1))
    h = result["history"][0]
    assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
    ckpt = check_types_checkpoint(tmp_path / "last.pth", task, "background", loss=loss)
    weights = ckpt["class_weights"]
    assert len(weights) == TASK_CLASSES[task] and weights[0] == 1.0 and min(weights[1:]) > 1.0
    if task == "lung+lesion-types":
        assert "lung" in ckpt["labels"] and 0.0 <= h["val_lung_dice"] <= 1.0


def test_binary_task_checkpoint_records_no_other_labels(processed, tmp_path):
    run_train(train_argv(processed, tmp_path, epochs=1))
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["task"] == "lesion" and ckpt["loss"] == "bce_dice" and ckpt["num_classes"] == 1
    assert ckpt["other_labels"] is None and ckpt["class_weights"] is None


def test_resume_with_other_labels_changed_is_refused(processed, tmp_path):
    run_train(train_argv(processed, tmp_path, "--task", "lesion-types", epochs=1))
    with pytest.raises(InputError, match="--other-labels"):
        run_train(train_argv(processed, tmp_path, "--task", "lesion-types", "--other-labels", "ignore",
                             "--resume", str(tmp_path / "last.pth"), epochs=2))


def test_deeplabv3_trains_lesion_types(processed, tmp_path):
    # DeepLabV3 (39.6M parameters) is slow on CPU: 4 slices of 32x32, one step of batch 2
    root = tmp_path / "few"
    write_semiseg_types(processed, root, n=4)
    run_train(train_argv(root, tmp_path / "out", "--model", "deeplabv3", "--size", "32", "--task", "lesion-types",
                         "--val-fraction", "0.25", epochs=1, batch_size=2))
    check_types_checkpoint(tmp_path / "out" / "last.pth", "lesion-types", "background", channels=32)


def test_recipe_trains_lesion_types_into_five_fold_models(processed, tmp_path):
    root = tmp_path / "covid-semiseg"
    write_semiseg_types(processed, root, n=10)
    env = {**os.environ, "PYTHON": sys.executable, "EPOCHS": "1"}
    proc = subprocess.run(["bash", "scripts/covid_semiseg.sh", str(root), str(tmp_path / "model"), "--task",
                           "lesion-types", "--size", str(SIZE), "--width", "4", "--device", "cpu"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    models = sorted((tmp_path / "model").glob("*.pth"))
    assert [p.name for p in models] == [f"fold{i}.pth" for i in range(5)]
    for path in models:  # the types recipe: ce_dice_union with class weights, not the binary bce_dice
        ckpt = check_types_checkpoint(path, "lesion-types", "background", loss="ce_dice_union")
        assert ckpt["class_weights"] is not None and len(ckpt["class_weights"]) == 3
    assert json.loads((tmp_path / "model" / "cv" / "cv.json").read_text())["folds"] == 5
