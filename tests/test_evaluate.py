"""End-to-end tests of evaluate.py on the checkpoint trained in tests/script_fixtures.py."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

import evaluate
from data.transforms import InputError
from tests.script_fixtures import (SIZE, export_pairs, processed, run_train, slice_rows,  # noqa: F401
                                   train_argv, trained)

METRICS = ("dice", "iou", "precision", "recall", "specificity", "accuracy", "f1")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_evaluate(argv: list[str]) -> tuple[dict, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        results = evaluate.main(evaluate.get_args_parser().parse_args([*argv, "--device", "cpu", "--no-progress"]))
    return results, buf.getvalue()


@pytest.fixture(scope="module")
def eval_test_split(trained, processed, tmp_path_factory):
    """evaluate.py --split test on the preprocessed folder: (results, stdout, output folder)."""
    out = tmp_path_factory.mktemp("eval-test")
    results, stdout = run_evaluate(["--checkpoint", str(trained["out"] / "best_model.pth"), "--data", str(processed),
                                    "--split", "test", "--out", str(out)])
    return results, stdout, out


def test_results_json_has_every_figure_for_every_metric(eval_test_split, processed):
    results, _, out = eval_test_split
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["split"] == "test" and on_disk["task"] == "lesion"
    assert list(on_disk["structures"]) == ["lesion"]
    res = on_disk["structures"]["lesion"]
    assert res["n_images"] == len(slice_rows(processed, "test")) == 8
    for part in ("pooled", "per_image", "per_patient"):
        assert set(METRICS) <= set(res[part]), part
    for k in METRICS:  # precision alone is undefined (nan) should the model predict no lesion at all
        assert 0.0 <= res["pooled"][k] <= 1.0 or (k == "precision" and math.isnan(res["pooled"][k])), k
        assert {"mean", "sd", "n"} <= set(res["per_image"][k]) and {"mean", "sd", "n"} <= set(res["per_patient"][k])
    assert isinstance(res["auc"], float) and 0.0 <= res["auc"] <= 1.0
    assert {"n", "n_with_false_positive", "fraction_clean"} <= set(res["empty_gt"])
    # the returned dict is what was written
    assert results["structures"]["lesion"]["pooled"]["dice"] == res["pooled"]["dice"]


def _refuse(constant):
    raise ValueError(f"{constant} is not JSON")


def test_results_json_is_standard_json(trained, processed, tmp_path):
    # undefined figures (here: the share of clean lesion-free slices, with no lesion-free slice) must still
    # give a file that strict JSON readers (jq, JavaScript, ...) accept: NaN and Infinity are Python extensions
    export_pairs(processed, "test", tmp_path / "one", "test_images", "test_masks", n=1)  # the most lesion
    results, _ = run_evaluate(["--checkpoint", str(trained["out"] / "best_model.pth"),
                               "--data", str(tmp_path / "one"), "--out", str(tmp_path / "eval")])
    assert results["structures"]["lesion"]["empty_gt"]["n"] == 0
    assert any(math.isnan(v) for v in _floats(results))
    json.loads((tmp_path / "eval" / "results.json").read_text(), parse_constant=_refuse)


def _floats(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, float):
        yield obj


def test_per_image_csv_has_one_row_per_test_slice(eval_test_split, processed):
    _, _, out = eval_test_split
    rows = read_csv(out / "per_image.csv")
    meta = json.loads((processed / "meta.json").read_text())
    test_rows = slice_rows(processed, "test")
    assert len(rows) == len(test_rows)
    assert [(r["case"], int(r["z"])) for r in rows] == [(meta["slices"][i]["case"], meta["slices"][i]["z"])
                                                       for i in test_rows]
    for r in rows:
        assert sum(int(r[k]) for k in ("tp", "fp", "fn", "tn")) == SIZE * SIZE
    # empty ground truth is flagged from the counts and counted apart
    lesion = np.load(processed / "lesion_masks.npy")
    assert [r["empty_gt"] == "True" for r in rows] == [not lesion[i].any() for i in test_rows]
    res = json.loads((out / "results.json").read_text())["structures"]["lesion"]
    assert res["empty_gt"]["n"] == sum(r["empty_gt"] == "True" for r in rows)
    assert res["per_image"]["dice"]["n"] == sum(r["empty_gt"] == "False" for r in rows)


def test_pooled_figures_come_from_the_summed_counts(eval_test_split):
    _, _, out = eval_test_split
    rows = read_csv(out / "per_image.csv")
    tp, fp, fn, tn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn"))
    assert tp + fn > 0  # the test patient has lesion
    pooled = json.loads((out / "results.json").read_text())["structures"]["lesion"]["pooled"]
    assert pooled["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert pooled["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert pooled["recall"] == pytest.approx(tp / (tp + fn))
    assert pooled["accuracy"] == pytest.approx((tp + tn) / (tp + fp + fn + tn))
    assert pooled["specificity"] == pytest.approx(tn / (tn + fp))
    # one test patient: the per-patient figure is that patient's pooled Dice
    per_patient = json.loads((out / "results.json").read_text())["structures"]["lesion"]["per_patient"]
    assert per_patient["dice"]["n"] == 1
    assert per_patient["dice"]["mean"] == pytest.approx(pooled["dice"])


def test_cases_figure_is_written(eval_test_split):
    _, _, out = eval_test_split
    with Image.open(out / "cases.png") as img:
        assert img.format == "PNG" and min(img.size) > 100


def test_printed_table_mentions_every_metric(eval_test_split):
    _, stdout, _ = eval_test_split
    lines = stdout.splitlines()
    for k in METRICS + ("auc",):
        assert any(line.split() and line.split()[0] == k for line in lines), k
    assert "results.json" in stdout


def test_folder_of_pairs_is_scored_at_each_mask_size(trained, processed, tmp_path):
    data = tmp_path / "pairs"
    files = export_pairs(processed, "test", data, "test_images", "test_masks", n=3)
    # one pair larger than the training size: its prediction is resized back to 100x80 for scoring
    big = files[0]
    mask_path = data / "test_masks" / big.name
    with Image.open(big) as img:
        img.resize((100, 80), Image.BILINEAR).save(big)
    with Image.open(mask_path) as m:
        m.resize((100, 80), Image.NEAREST).save(mask_path)

    results, stdout = run_evaluate(["--checkpoint", str(trained["out"] / "best_model.pth"), "--data", str(data),
                                    "--out", str(tmp_path / "eval")])
    assert results["split"] == "test" and results["structures"]["lesion"]["n_images"] == 3
    rows = read_csv(tmp_path / "eval" / "per_image.csv")
    assert [r["file"] for r in rows] == [str(p) for p in sorted(files)]
    for r in rows:  # every pixel of the mask's own grid counted once; lesion pixels = the mask's
        pixels = 100 * 80 if r["file"] == str(big) else SIZE * SIZE
        assert sum(int(r[k]) for k in ("tp", "fp", "fn", "tn")) == pixels, r["file"]
        with Image.open(data / "test_masks" / (r["case"] + ".png")) as m:
            assert int(r["tp"]) + int(r["fn"]) == int((np.asarray(m) > 127).sum())
    tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
    assert results["structures"]["lesion"]["pooled"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert "dice" in stdout and (tmp_path / "eval" / "results.json").is_file()
    # Inf-Net's measures of the probability map, per image, beside ours
    per_image = results["structures"]["lesion"]["per_image"]
    tad = [float(r["dice_threshold_averaged"]) for r in rows if r["empty_gt"] == "False"]
    assert per_image["dice_threshold_averaged"]["mean"] == pytest.approx(np.mean(tad))
    assert 0 <= per_image["mae"]["mean"] <= 1 and per_image["mae"]["n"] == 3
    assert "dice_threshold_averaged" in stdout and "mae" in stdout


def test_lung_and_lesion_checkpoint_scores_both_structures(processed, tmp_path):
    run_train(train_argv(processed, tmp_path / "ckpt", "--task", "lung+lesion", epochs=1))
    results, stdout = run_evaluate(["--checkpoint", str(tmp_path / "ckpt" / "last.pth"), "--data", str(processed),
                                    "--out", str(tmp_path / "eval")])
    assert list(results["structures"]) == ["lung", "lesion"]
    rows = read_csv(tmp_path / "eval" / "per_image.csv")
    n = len(slice_rows(processed, "test"))
    assert [r["structure"] for r in rows] == ["lung"] * n + ["lesion"] * n
    for name in ("lung", "lesion"):
        sub = [r for r in rows if r["structure"] == name]
        tp, fp, fn = (sum(int(r[k]) for r in sub) for k in ("tp", "fp", "fn"))
        assert results["structures"][name]["pooled"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert "lung: " in stdout and "lesion: " in stdout


def test_checkpoint_of_other_preprocessing_is_refused(processed, tmp_path):
    # a checkpoint trained on PNG pairs (min-max) does not fit arrays windowed in HU
    pairs = tmp_path / "pairs"
    export_pairs(processed, None, pairs, "Imgs", "GT", n=4)
    run_train(train_argv(pairs, tmp_path / "ckpt", "--val-fraction", "0.25", epochs=1))
    with pytest.raises(InputError, match="preprocess"):
        run_evaluate(["--checkpoint", str(tmp_path / "ckpt" / "last.pth"), "--data", str(processed),
                      "--out", str(tmp_path / "eval")])


def test_aggregate_reports_the_meters_figures_and_no_sd_for_one_patient():
    import torch

    from engine.evaluation import aggregate
    from utils.metrics import SegmentationMeter, finite_or_none

    meter = SegmentationMeter()
    target = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    meter.update(target.float(), target, cases=["a", "a"])
    res, rows = aggregate(meter)
    assert res["n_images"] == 2 and [r["empty_gt"] for r in rows] == [False, True]
    assert res["per_image"]["dice"]["mean"] == 1.0 and res["per_image"]["specificity"]["n"] == 2
    assert res["per_patient"]["cases"] == {"a": 1.0} and res["per_patient"]["dice"]["n"] == 1
    # one rule for few values (utils.metrics.mean_sd): the sd of one value is undefined, null in results.json
    assert finite_or_none(res["per_patient"]["dice"]) == {"mean": 1.0, "sd": None, "n": 1}
