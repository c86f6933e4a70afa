import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from utils.metrics import (AUC_BINS, SegmentationMeter, confusion_counts, finite_or_none, histogram_auc, mean_sd,
                           metrics_from_counts)


def test_confusion_counts_hand_checked():
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    target = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]]])
    counts = confusion_counts(pred, target)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[1, 1, 1, 1], [0, 0, 0, 4]]
    assert confusion_counts(pred.bool(), target.bool()).tolist() == counts.tolist()


def test_confusion_counts_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(1, 2, 2\).*\(1, 2, 3\)"):
        confusion_counts(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="float32"):
        confusion_counts(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="binary"):
        confusion_counts(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 2))


def test_metrics_from_counts_hand_checked_and_nan():
    m = metrics_from_counts(tp=2, fp=1, fn=3, tn=4)
    assert m["dice"] == pytest.approx(4 / 8) == m["f1"]
    assert m["iou"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 5)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(6 / 10)
    nothing_predicted = metrics_from_counts(tp=0, fp=0, fn=3, tn=5)
    assert math.isnan(nothing_predicted["precision"])
    assert nothing_predicted["dice"] == 0.0
    all_empty = metrics_from_counts(tp=0, fp=0, fn=0, tn=5)
    assert math.isnan(all_empty["dice"]) and math.isnan(all_empty["iou"]) and math.isnan(all_empty["recall"])


def test_pooled_matches_sklearn():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(4, 16, 16, generator=gen)
    target = (torch.rand(4, 16, 16, generator=gen) < 0.3).long()
    meter = SegmentationMeter()
    meter.update(probs[:2], target[:2])
    meter.update(probs[2:], target[2:])
    pooled = meter.pooled()
    y, p = target.flatten().numpy(), (probs > 0.5).long().flatten().numpy()
    assert pooled["precision"] == pytest.approx(skm.precision_score(y, p))
    assert pooled["recall"] == pytest.approx(skm.recall_score(y, p))
    assert pooled["f1"] == pytest.approx(skm.f1_score(y, p))
    assert pooled["dice"] == pytest.approx(skm.f1_score(y, p))
    assert pooled["iou"] == pytest.approx(skm.jaccard_score(y, p))
    assert pooled["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert pooled["specificity"] == pytest.approx(skm.recall_score(y, p, pos_label=0))
    assert pooled["tp"] + pooled["fp"] + pooled["fn"] + pooled["tn"] == target.numel()


def test_histogram_auc_close_to_exact():
    gen = torch.Generator().manual_seed(1)
    target = (torch.rand(8, 32, 32, generator=gen) < 0.2).long()
    # Informative but overlapping scores, so the AUC is far from 0.5 and 1.
    probs = torch.sigmoid(torch.randn(8, 32, 32, generator=gen) + 1.5 * target)
    meter = SegmentationMeter()
    meter.update(probs, target)
    exact = skm.roc_auc_score(target.flatten().numpy(), probs.flatten().numpy())
    assert 0.6 < exact < 0.95
    assert meter.summary()["auc"] == pytest.approx(exact, abs=1e-3)


def test_histogram_auc_ties_count_half():
    pos = torch.zeros(AUC_BINS, dtype=torch.int64)
    neg = torch.zeros(AUC_BINS, dtype=torch.int64)
    pos[500] = 3
    neg[500] = 5
    assert histogram_auc(pos, neg) == pytest.approx(0.5)
    assert math.isnan(histogram_auc(pos, torch.zeros_like(neg)))


def test_perfect_and_disjoint():
    target = torch.tensor([[[0, 1], [1, 0]]])
    perfect = SegmentationMeter()
    perfect.update(target.float(), target)
    s = perfect.summary()
    assert s["pooled"]["dice"] == s["pooled"]["iou"] == s["pooled"]["accuracy"] == 1.0
    assert s["per_image"]["dice"]["mean"] == 1.0 and s["auc"] == 1.0
    disjoint = SegmentationMeter()
    disjoint.update(1 - target.float(), target)
    s = disjoint.summary()
    assert s["pooled"]["dice"] == s["pooled"]["iou"] == s["pooled"]["accuracy"] == 0.0
    assert s["per_image"]["dice"]["mean"] == 0.0 and s["auc"] == 0.0


def test_empty_ground_truth_reported_separately():
    meter = SegmentationMeter()
    target = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]])
    probs = torch.tensor([[[0.9, 0.1], [0.1, 0.1]], [[0.1, 0.1], [0.1, 0.1]], [[0.9, 0.1], [0.1, 0.1]]])
    meter.update(probs, target)
    rows = meter.per_image()
    assert [r["empty_gt"] for r in rows] == [False, True, True]
    assert rows[0]["dice"] == pytest.approx(2 / 3)
    assert math.isnan(rows[1]["dice"]) and math.isnan(rows[2]["iou"])
    s = meter.summary()
    assert s["per_image"]["dice"]["n"] == 1
    assert s["per_image"]["dice"]["mean"] == pytest.approx(2 / 3)  # empty-vs-empty is neither 0 nor 1 here
    assert math.isnan(s["per_image"]["dice"]["sd"])  # sample SD needs 2 images
    assert s["per_image"]["specificity"]["n"] == 3  # defined on lesion-free images too
    assert s["empty_gt"] == {"n": 2, "n_with_false_positive": 1, "fraction_clean": 0.5}
    assert s["per_patient"] is None


def test_per_patient_pools_counts_within_patient():
    meter = SegmentationMeter()
    # Patient "a": slice 1 tp=1 fn=1, slice 2 tp=2 -> pooled tp=3 fn=1 -> Dice 6/7; "b": tp=1 fp=1 -> 2/3;
    # "c": lesion-free with one false positive -> excluded from the mean.
    target = torch.tensor([[[1, 1], [0, 0]], [[1, 1], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    pred = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 1]]])
    meter.update(pred.float(), target, cases=["a", "a", "b", "c"])
    patients = meter.summary()["per_patient"]
    assert patients["cases"]["a"]["dice"] == pytest.approx(6 / 7)
    assert patients["cases"]["a"]["tp"] == 3
    assert patients["cases"]["b"]["dice"] == pytest.approx(2 / 3)
    assert patients["cases"]["c"]["empty_gt"] and patients["cases"]["c"]["fp"] == 1
    assert patients["dice"]["n"] == 2
    assert patients["dice"]["mean"] == pytest.approx((6 / 7 + 2 / 3) / 2)
    assert patients["dice"]["sd"] == pytest.approx(np.std([6 / 7, 2 / 3], ddof=1))
    assert [r["case"] for r in meter.per_image()] == ["a", "a", "b", "c"]


def test_empty_meter_is_nan():
    s = SegmentationMeter().summary()
    assert math.isnan(s["pooled"]["dice"]) and math.isnan(s["auc"]) and s["per_image"]["dice"]["n"] == 0


def test_mean_sd_has_one_rule_for_few_values():
    nan = float("nan")
    none, one = mean_sd([]), mean_sd([0.5, nan, None])  # undefined figures are left out, not counted as 0
    assert math.isnan(none["mean"]) and math.isnan(none["sd"]) and none["n"] == 0
    assert one["mean"] == 0.5 and math.isnan(one["sd"]) and one["n"] == 1  # a sample SD needs 2 values
    two = mean_sd([0.25, 0.75])
    assert two == {"mean": 0.5, "sd": pytest.approx(np.std([0.25, 0.75], ddof=1)), "n": 2}
    assert finite_or_none({"m": one, "v": [nan, np.float32(1.5), np.int64(2)]}) == \
        {"m": {"mean": 0.5, "sd": None, "n": 1}, "v": [None, 1.5, 2]}


def test_update_rejects_bad_input():
    meter = SegmentationMeter()
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="apply sigmoid"):
        meter.update(torch.full((1, 2, 2), 3.0), target)
    with pytest.raises(TypeError, match="int64"):
        meter.update(target, target)
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\)"):
        meter.update(torch.zeros(1, 1, 2, 2), target)
    with pytest.raises(ValueError, match="2 case ids"):
        meter.update(torch.zeros(1, 2, 2), target, cases=["a", "b"])


masks = st.integers(1, 3).flatmap(
    lambda n: st.tuples(*(st.lists(st.booleans(), min_size=n * 9, max_size=n * 9) for _ in range(2)))
)


@settings(max_examples=60, deadline=None)
@given(masks)
def test_metric_properties(pair):
    pred, target = (torch.tensor(m).view(-1, 3, 3) for m in pair)
    forward = SegmentationMeter()
    forward.update(pred.float(), target)
    backward = SegmentationMeter()
    backward.update(target.float(), pred)
    m, swapped = forward.pooled(), backward.pooled()
    for key in ("dice", "iou", "precision", "recall", "specificity", "accuracy", "f1"):
        assert math.isnan(m[key]) or 0.0 <= m[key] <= 1.0
    assert m["dice"] == swapped["dice"] or (math.isnan(m["dice"]) and math.isnan(swapped["dice"]))
    if not math.isnan(m["dice"]):
        assert m["iou"] <= m["dice"] + 1e-12
        assert m["dice"] == pytest.approx(2 * m["iou"] / (1 + m["iou"]))
    for row in forward.per_image():
        assert row["empty_gt"] == (row["tp"] + row["fn"] == 0)
        assert math.isnan(row["dice"]) or 0.0 <= row["dice"] <= 1.0


def test_threshold_averaged_dice_by_hand():
    from utils.metrics import threshold_averaged_dice

    # values 0, 0.5, 1 scaled by 255: 0, 127.5, 255. Thresholds k = 0..127 predict {0.5, 1} (Dice 1),
    # k = 128..254 predict {1} (Dice 2/3), k = 255 predicts nothing (Dice 0).
    prob, target = np.array([[0.0, 0.5, 1.0]]), np.array([[0, 1, 1]])
    assert threshold_averaged_dice(prob, target) == pytest.approx((128 * 1 + 127 * 2 / 3 + 0) / 256)
    # min-max rescaling first: an affine change of the map changes nothing
    assert threshold_averaged_dice(prob * 0.2 + 0.3, target) == pytest.approx(threshold_averaged_dice(prob, target))
    assert np.isnan(threshold_averaged_dice(np.zeros((2, 2)) - 1, np.zeros((2, 2))))
