"""Evaluation of lesion-types checkpoints (ground-glass opacity, consolidation): per-class figures.

The checkpoints are built untrained (models.build_model + the entries train.py's run_record writes); where a
figure is checked by hand, the predictor's probabilities are replaced by ones made from the ground truth.
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import engine.evaluation as evaluation
import evaluate
from data.dataset import PairFolderDataset, SliceArrayDataset, pair_files
from data.labels import LESION_LABEL_NAMES, TASK_CLASSES, TASK_OUTPUTS, class_targets, structure_slug, task_masks
from data.preprocess import preprocess
from data.synthetic import generate_dataset
from data.transforms import make_preprocessing, read_label_mask
from engine.evaluation import evaluate_volumes, lesion_types, type_prediction
from models import build_model
from utils.checkpoint import save_checkpoint

GGO, CONS = LESION_LABEL_NAMES["default"]["1"], LESION_LABEL_NAMES["default"]["2"]
S = 32  # slice side (a multiple of 16)
OTHER = 3  # a lesion label that is no type (MedSeg's pleural effusion)


def make_checkpoint(path, task: str, prep: dict, other_labels: str | None = None):
    """An untrained U-Net checkpoint of ``task`` with what train.py's run_record stores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model("unet", in_channels=1, num_classes=TASK_CLASSES[task], width=4)
    args = {"model": "unet", "task": task, "tta": False, **({"other_labels": other_labels} if other_labels else {})}
    save_checkpoint({"model": model.state_dict(), "model_config": {"name": "unet", **model.config},
                     "num_classes": TASK_CLASSES[task], "task": task, "loss": "ce", "preprocessing": prep,
                     "data": {}, "labels": {}, "inference": {"tta": False}, "args": args}, path)
    return path


def _palette_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes("P", labels.shape[::-1], labels.astype(np.uint8).tobytes())
    img.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200])
    img.save(path)


def _labels(*blocks):
    """An S x S label map with (label, row, col, side) square blocks."""
    out = np.zeros((S, S), np.uint8)
    for label, r, c, side in blocks:
        out[r:r + side, c:c + side] = label
    return out


# a: 16 GGO + 4 consolidation pixels; b: 9 GGO; c: nothing; d: 12 pixels of a label that is no type
MASKS = {"a": _labels((1, 2, 2, 4), (2, 10, 10, 2)), "b": _labels((1, 5, 5, 3)), "c": _labels(),
         "d": _labels((OTHER, 20, 20, 2), (OTHER, 24, 24, 2), (OTHER, 0, 0, 2))}


@pytest.fixture
def pairs(tmp_path):
    """A COVID-SemiSeg-like pair folder (Imgs/ + GT/, palette label masks) of MASKS; distinct noise images."""
    rng = np.random.default_rng(0)
    for stem, labels in MASKS.items():
        (tmp_path / "pairs" / "Imgs").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (S, S), dtype=np.uint8)).save(tmp_path / "pairs" / "Imgs" / f"{stem}.png")
        _palette_png(tmp_path / "pairs" / "GT" / f"{stem}.png", labels)
    return tmp_path / "pairs"


def fake_predict(monkeypatch, by_image: dict[bytes, dict[str, torch.Tensor]]):
    """Replace the model's probabilities: each image gets the maps ``by_image`` holds for its pixels."""
    def predict(model, images, task, device, dtype=None, tta=False):
        maps = [by_image[img[0].float().numpy().tobytes()] for img in images.cpu()]
        return {name: torch.stack([m[name] for m in maps]) for name in TASK_OUTPUTS[task]}
    monkeypatch.setattr(evaluation, "predict", predict)


def pair_maps(pairs_dir, prep, rule) -> dict[bytes, dict[str, torch.Tensor]]:
    """{image key: maps} with ``rule(raw labels) -> (lesion, GGO, consolidation) maps`` for every pair."""
    ds = PairFolderDataset(pair_files(pairs_dir / "Imgs", pairs_dir / "GT"), prep, task="lesion-types")
    out = {}
    for i, (_, mask_path) in enumerate(ds.pairs):
        raw = torch.from_numpy(read_label_mask(mask_path)[0])
        out[ds.load(i)[0].numpy().tobytes()] = dict(zip(TASK_OUTPUTS["lesion-types"], (m.float() for m in rule(raw))))
    return out


def run(monkeypatch, pairs_dir, tmp_path, rule, other_labels=None) -> dict:
    prep = make_preprocessing(S, "minmax")
    ckpt = make_checkpoint(tmp_path / "types.pth", "lesion-types", prep, other_labels)
    fake_predict(monkeypatch, pair_maps(pairs_dir, prep, rule))
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluation.evaluate(ckpt, pairs_dir, out=tmp_path / "eval", device="cpu", progress=False, n_figure=0)


def ggo_called_consolidation(raw):
    lesion = (raw == 1) | (raw == 2)
    return lesion, torch.zeros_like(lesion), lesion


def test_ggo_called_consolidation_gives_the_hand_computed_figures(pairs, tmp_path, monkeypatch):
    results = run(monkeypatch, pairs, tmp_path, ggo_called_consolidation)
    on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert on_disk["classes"] == json.loads(json.dumps(results["classes"]))
    ggo, cons = results["classes"]["classes"][GGO], results["classes"]["classes"][CONS]
    # ground-glass: never predicted; present in a and b, absent (and clean) in c and d
    assert ggo["pooled"]["dice"] == 0.0 and ggo["per_image"]["dice"] == {"mean": 0.0, "sd": 0.0, "n": 2}
    assert ggo["absent"]["n"] == 2 and ggo["absent"]["n_with_false_positive"] == 0
    # consolidation: a has 4 true and 16 false-positive pixels -> 8 / 24; b's 9 GGO pixels are its false positives
    assert cons["per_image"]["dice"]["n"] == 1 and cons["per_image"]["dice"]["mean"] == pytest.approx(1 / 3)
    assert cons["pooled"]["dice"] == pytest.approx(8 / (8 + 25))
    assert cons["absent"] == {"n": 3, "n_with_false_positive": 1, "false_positive_pixels": 9,
                              "fraction_clean": pytest.approx(2 / 3)}
    # Inf-Net: a's binary map has Dice 1/3 at thresholds 0..254 and 0 at 255; the 3 slices without it count 0
    infnet = cons["threshold_averaged_dice"]
    assert infnet["n"] == 4 and infnet["n_absent"] == 3
    assert infnet["mean"] == pytest.approx((1 / 3) * 255 / 256 / 4)
    assert ggo["threshold_averaged_dice"]["mean"] == 0.0
    # every ground-glass pixel called consolidation, every consolidation pixel right
    assert results["classes"]["called_as"][GGO][CONS] == 1.0 and results["classes"]["called_as"][CONS][CONS] == 1.0
    # the union is unaffected by the mix-up: every lesion pixel found, nothing else
    assert results["structures"]["lesion"]["pooled"]["dice"] == 1.0
    # the types are scored once, on the label map ("classes"); "structures" holds the mask kinds only
    assert list(results["structures"]) == list(task_masks("lesion-types")) == ["lesion"]


def test_a_perfect_prediction_scores_one_and_reports_absent_classes_apart(pairs, tmp_path, monkeypatch):
    results = run(monkeypatch, pairs, tmp_path, lambda raw: ((raw == 1) | (raw == 2), raw == 1, raw == 2))
    c = results["classes"]
    for name, n_present in ((GGO, 2), (CONS, 1)):
        assert c["classes"][name]["per_image"]["dice"] == {"mean": 1.0, "sd": 0.0 if n_present > 1 else None,
                                                          "n": n_present}
        assert c["classes"][name]["absent"]["n"] == 4 - n_present  # not counted as 0 or 1
        assert c["classes"][name]["threshold_averaged_dice"]["present"]["mean"] == pytest.approx(255 / 256)
    assert c["called_as"][GGO][CONS] == 0.0 and c["called_as"][CONS][GGO] == 0.0
    assert c["confusion"]["labels"][1:] == [GGO, CONS]


def test_labels_that_are_no_type_are_left_out_when_the_checkpoint_ignores_them(pairs, tmp_path, monkeypatch):
    def other_called_ggo(raw):  # d's pixels of label 3 predicted ground-glass
        return raw > 0, (raw == 1) | (raw == OTHER), raw == 2

    fp = {}
    for other in ("background", "ignore"):
        results = run(monkeypatch, pairs, tmp_path / other, other_called_ggo, other)
        fp[other] = (results["classes"]["classes"][GGO]["absent"]["false_positive_pixels"],
                     results["structures"]["lesion"]["empty_gt"]["n_with_false_positive"])
    assert fp == {"background": (12, 1), "ignore": (0, 0)}


def test_a_binary_mask_folder_is_refused_for_a_types_checkpoint(tmp_path):
    (tmp_path / "p" / "Imgs").mkdir(parents=True)
    (tmp_path / "p" / "GT").mkdir()
    Image.fromarray(np.zeros((S, S), np.uint8)).save(tmp_path / "p" / "Imgs" / "x.png")
    Image.fromarray(MASKS["a"].astype(bool).astype(np.uint8) * 255).save(tmp_path / "p" / "GT" / "x.png")
    ckpt = make_checkpoint(tmp_path / "t.pth", "lesion-types", make_preprocessing(S, "minmax"))
    with pytest.raises(evaluation.InputError, match="no lesion types"):
        evaluation.evaluate(ckpt, tmp_path / "p", out=tmp_path / "e", device="cpu", progress=False, n_figure=0)


def test_type_prediction_keeps_the_union_and_picks_the_likelier_type():
    probs = {"lesion": torch.tensor([[[0.9, 0.6, 0.4]]]), GGO: torch.tensor([[[0.2, 0.35, 0.3]]]),
             CONS: torch.tensor([[[0.7, 0.25, 0.1]]])}
    assert lesion_types("lesion-types") == {GGO: 1, CONS: 2} and lesion_types("lesion") == {}
    assert type_prediction(probs, "lesion-types").tolist() == [[[2, 1, 0]]]


# ----------------------------------------------------------------------------- preprocessed phantoms and volumes
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root / "src", patients=2, seed=1, shape=(S, S, 6))
    preprocess(root / "src", root / "processed", size=S, workers=1, progress=False)
    return root


@pytest.mark.parametrize("task", ["lesion-types", "lung+lesion-types"])
def test_preprocessed_phantoms_perfectly_predicted(phantoms, tmp_path, monkeypatch, task):
    processed = phantoms / "processed"
    prep = json.loads((processed / "meta.json").read_text())["preprocessing"]
    ds = SliceArrayDataset(processed, None, task)
    maps = {}
    for i in range(len(ds)):
        image, mask = ds[i]
        maps[image[0].numpy().tobytes()] = {n: t[0].float() for n, t in class_targets(mask[None], task).items()}
    fake_predict(monkeypatch, maps)
    ckpt = make_checkpoint(tmp_path / "t.pth", task, prep)
    args = evaluate.get_args_parser().parse_args(["--checkpoint", str(ckpt), "--data", str(processed), "--split", "all",
                                                  "--out", str(tmp_path / "e"), "--device", "cpu", "--no-progress"])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results = evaluate.main(args)
    classes = results["classes"]["classes"]
    assert list(classes) == [GGO, CONS] and GGO in stdout.getvalue() and "called" in stdout.getvalue()
    for name, c in classes.items():
        present = c["per_image"]["dice"]["n"]
        assert present > 0, f"the phantoms have no {name}"
        assert present + c["absent"]["n"] == len(ds)
        assert c["pooled"]["dice"] == 1.0 and c["absent"]["n_with_false_positive"] == 0
        assert c["per_patient"]["dice"]["mean"] == 1.0 and set(c["per_patient"]["cases"]) == set(ds.cases)
    assert results["structures"]["lesion"]["pooled"]["dice"] == 1.0


def test_a_binary_checkpoint_has_no_classes_block(phantoms, tmp_path):
    prep = json.loads((phantoms / "processed" / "meta.json").read_text())["preprocessing"]
    ckpt = make_checkpoint(tmp_path / "b.pth", "lesion", prep)
    with contextlib.redirect_stdout(io.StringIO()):
        results = evaluation.evaluate(ckpt, phantoms / "processed", "all", tmp_path / "e", device="cpu",
                                      progress=False, n_figure=0)
    assert "classes" not in results and list(results["structures"]) == ["lesion"]


def test_volumes_get_per_type_dice_and_volumes(phantoms, tmp_path):
    prep = json.loads((phantoms / "processed" / "meta.json").read_text())["preprocessing"]
    ckpt = make_checkpoint(tmp_path / "t.pth", "lesion-types", prep)
    with contextlib.redirect_stdout(io.StringIO()):
        results = evaluate_volumes(ckpt, phantoms / "src", tmp_path / "e", device="cpu", progress=False)
    assert set(results["classes"]["classes"]) == {GGO, CONS}
    assert results["classes"]["classes"][GGO]["per_patient"] is not None
    for row in results["patients"]:
        img = nib.load(next((phantoms / "src").rglob(f"{row['case']}.nii*")))
        lesion = np.asarray(nib.load(next((phantoms / "src").rglob(f"*lesion*/{row['case']}.nii*"))).dataobj)
        voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
        for name, value in ((GGO, 1), (CONS, 2)):
            assert row[f"{structure_slug(name)}_ml_true"] == pytest.approx((lesion == value).sum() * voxel_ml)
            dice = row[f"{structure_slug(name)}_dice_3d"]
            assert dice is None or math.isnan(dice) or 0.0 <= dice <= 1.0
    assert f"{structure_slug(CONS)}_dice_3d" in results["summary"]


# ----------------------------------------------------------------------------- cross-validation
def test_cross_validation_gives_per_class_figures_over_folds(pairs, tmp_path, monkeypatch):
    import argparse

    from engine.cross_validation import cross_validate

    prep = make_preprocessing(S, "minmax")
    fake_predict(monkeypatch, pair_maps(pairs, prep, lambda raw: ((raw == 1) | (raw == 2), raw == 1, raw == 2)))
    all_pairs = pair_files(pairs / "Imgs", pairs / "GT")  # a, b | c, d
    folds = [all_pairs[:2], all_pairs[2:]]

    def train(args):
        make_checkpoint(tmp_path / "cv" / f"fold{args.fold}" / "last.pth", "lesion-types", prep)
        return {"best_dice": 0.0, "val_pairs": folds[args.fold]}

    args = argparse.Namespace(folds=2, out=str(tmp_path / "cv"), data=str(pairs), seed=0, tta=False, device="cpu",
                              amp="auto", batch_size=4, task="lesion-types")
    with contextlib.redirect_stdout(io.StringIO()):
        summary = cross_validate(args, train)
    on_disk = json.loads((tmp_path / "cv" / "cv.json").read_text())
    ggo, cons = on_disk["classes"][GGO], on_disk["classes"][CONS]
    # fold 0 (a, b) has both types, perfectly found; fold 1 (c, d) has none: no per-image Dice, Inf-Net 0
    assert ggo["folds"]["dice"] == [1.0, None] and ggo["folds"]["n"] == [2, 0]
    assert ggo["mean_over_folds"]["dice"] == {"mean": 1.0, "sd": None, "n": 1}
    assert ggo["out_of_fold"]["dice"] == 1.0
    assert ggo["folds"]["dice_threshold_averaged"] == [pytest.approx(255 / 256), 0.0]
    assert ggo["out_of_fold"]["dice_threshold_averaged"] == pytest.approx(255 / 256 / 2)
    assert cons["folds"]["n"] == [1, 0]
    assert cons["out_of_fold"]["dice_threshold_averaged"] == pytest.approx(255 / 256 / 2 / 2)  # b has none: 0
    assert summary["classes"] == on_disk["classes"]
