"""Per-class metrics (ClassMeter): hand-checkable label maps with two lesion classes, 1 and 2."""
import json
import math

import numpy as np
import pytest
import torch

from utils.metrics import (ClassMeter, SegmentationMeter, class_counts, confusion_shares, finite_or_none,
                           infnet_dice_per_image, label_confusion, threshold_averaged_dice)

# Names are the caller's: these tests use neutral ones so nothing depends on data.labels.
CLASSES = {"a": 1, "b": 2}

# Image 0: one pixel of class a predicted as b, one pixel of b missed.
# Image 1: class b absent, two false-positive b pixels.  Image 2: class b absent, nothing predicted as b.
TARGET = torch.tensor([[[1, 1, 2], [0, 0, 2]],
                       [[1, 0, 0], [0, 0, 0]],
                       [[0, 0, 0], [0, 1, 0]]])
PRED = torch.tensor([[[1, 2, 2], [0, 0, 0]],
                     [[1, 2, 2], [0, 0, 0]],
                     [[0, 0, 0], [0, 0, 0]]])


def test_label_confusion_and_class_counts_by_hand():
    confusion = label_confusion(PRED[:1], TARGET[:1], 3)
    assert confusion.dtype == torch.int64
    assert confusion[0].tolist() == [[2, 0, 0], [0, 1, 1], [1, 0, 1]]  # truth rows, prediction columns
    assert class_counts(confusion, 1).tolist() == [[1, 0, 1, 4]]
    assert class_counts(confusion, 2).tolist() == [[1, 1, 1, 3]]


def test_label_confusion_rejects_bad_input():
    with pytest.raises(ValueError, match=r"label values in \[0, 2\].*0\.\.1"):
        label_confusion(PRED, TARGET, 2)
    with pytest.raises(ValueError, match=r"\(3, 2, 3\).*\(3, 6\)"):
        label_confusion(PRED, TARGET.flatten(1), 3)
    with pytest.raises(TypeError, match="float32"):
        label_confusion(PRED.float(), TARGET, 3)
    with pytest.raises(ValueError, match="distinct"):
        ClassMeter({"a": 1, "b": 1})
    with pytest.raises(ValueError, match="not among the classes"):
        ClassMeter(CLASSES).update(PRED, TARGET, probs={"c": torch.zeros(3, 2, 3)})


def test_class_confused_with_another_scores_both_and_the_confusion():
    meter = ClassMeter(CLASSES)
    meter.update(PRED[:1], TARGET[:1])
    s = meter.summary()
    a, b = s["classes"]["a"], s["classes"]["b"]
    assert a["pooled"]["dice"] == pytest.approx(2 / 3) and a["pooled"]["iou"] == pytest.approx(1 / 2)
    assert b["pooled"]["dice"] == pytest.approx(1 / 2) and b["pooled"]["iou"] == pytest.approx(1 / 3)
    assert b["pooled"]["precision"] == pytest.approx(1 / 2) and b["pooled"]["recall"] == pytest.approx(1 / 2)
    assert s["confusion"] == {"labels": ["background", "a", "b"], "pixels": [[2, 0, 0], [0, 1, 1], [1, 0, 1]]}
    assert s["called_as"]["a"]["b"] == pytest.approx(1 / 2)  # half of a's pixels called b
    assert s["called_as"]["b"]["a"] == 0.0
    assert s["called_as"]["b"]["background"] == pytest.approx(1 / 2)
    assert s["called_as"]["a"]["a"] == a["pooled"]["recall"]


def test_absent_class_reported_apart_with_its_false_positives():
    meter = ClassMeter(CLASSES)
    meter.update(PRED, TARGET)
    s = meter.summary()
    b = s["classes"]["b"]
    assert b["absent"] == {"n": 2, "n_with_false_positive": 1, "false_positive_pixels": 2, "fraction_clean": 0.5}
    # Only image 0 contains b: its Dice is the mean, the absent images are neither 0 nor 1 in it.
    assert b["per_image"]["dice"] == {"mean": pytest.approx(1 / 2), "sd": None, "n": 1}
    assert b["per_image"]["specificity"]["n"] == 3  # defined on images without the class too
    a = s["classes"]["a"]
    assert a["absent"]["n"] == 0
    assert a["per_image"]["dice"]["mean"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert a["per_image"]["dice"]["sd"] == pytest.approx(np.std([2 / 3, 1, 0], ddof=1))
    assert b["pooled"]["fp"] == 3 and b["per_patient"] is None and b["threshold_averaged_dice"] is None
    json.dumps(s, allow_nan=False)  # JSON-ready: nan written as null


def test_per_patient_pools_counts_within_patient():
    meter = ClassMeter(CLASSES)
    meter.update(PRED[:2], TARGET[:2], groups=["p", "p"])
    meter.update(PRED[2:], TARGET[2:], groups=["q"])  # batches add up
    s = meter.summary()
    b = s["classes"]["b"]["per_patient"]
    # Patient p, class b: tp 1, fp 1 + 2, fn 1 -> Dice 2/6; patient q has no b and no false positive.
    assert b["cases"]["p"]["dice"] == pytest.approx(1 / 3) and b["cases"]["p"]["fp"] == 3
    assert b["dice"]["n"] == 1 and b["dice"]["mean"] == pytest.approx(1 / 3)
    assert b["absent"] == {"n": 1, "n_with_false_positive": 0, "false_positive_pixels": 0, "fraction_clean": 1.0}
    a = s["classes"]["a"]["per_patient"]
    # Patient p, class a: tp 2, fn 1 -> Dice 4/5; patient q: tp 0, fn 1 -> 0.
    assert a["cases"]["p"]["dice"] == pytest.approx(4 / 5) and a["cases"]["q"]["dice"] == 0.0
    assert a["dice"]["mean"] == pytest.approx(2 / 5)


def test_infnet_per_class_average_with_empty_ground_truth_by_hand():
    # Image 0 contains class b: the map 0, .5, .5, 1 (already min-max) against truth at .5 and 1.
    # p > k/255 for k = 0..127 predicts three pixels (tp 2, fp 1: Dice 4/5), k = 128..254 one (tp 1, fn 1:
    # Dice 2/3), k = 255 none (Dice 0). Image 1 has no b but a map with false positives; image 2 has no b and
    # a constant map: the protocol scores both 0 (no true positive at any threshold).
    target = torch.tensor([[[0, 2], [0, 2]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]])
    prob_b = torch.tensor([[[0.0, 0.5], [0.5, 1.0]], [[0.1, 0.9], [0.2, 0.3]], [[0.0, 0.0], [0.0, 0.0]]])
    present = (128 * 4 / 5 + 127 * 2 / 3 + 0) / 256
    assert infnet_dice_per_image(prob_b, target == 2) == [pytest.approx(present), 0.0, 0.0]
    assert math.isnan(threshold_averaged_dice(prob_b[2], target[2] == 2))  # why the rule is applied on top

    meter = ClassMeter(CLASSES)
    meter.update(target, target, probs={"b": prob_b})
    s = meter.summary()
    infnet = s["classes"]["b"]["threshold_averaged_dice"]
    assert infnet["mean"] == pytest.approx(present / 3) and infnet["n"] == 3 and infnet["n_absent"] == 2
    assert infnet["present"] == {"mean": pytest.approx(present), "sd": None, "n": 1}
    assert s["classes"]["a"]["threshold_averaged_dice"] is None  # no map given for a


def test_binary_path_matches_segmentation_meter():
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(6, 5, 5, generator=gen) > 0.7).long()
    target[2] = 0  # a lesion-free image, with a false positive below
    probs = torch.rand(6, 5, 5, generator=gen)
    cases = ["x", "x", "y", "y", "z", "z"]
    binary = SegmentationMeter()
    binary.update(probs, target, cases=cases)
    meter = ClassMeter({"lesion": 1})
    meter.update((probs > 0.5).long(), target, groups=cases)
    expected = finite_or_none(binary.summary())
    got = meter.summary()["classes"]["lesion"]
    assert got["pooled"] == expected["pooled"]
    assert got["per_image"] == expected["per_image"]
    assert {k: got["absent"][k] for k in expected["empty_gt"]} == expected["empty_gt"]
    assert got["per_patient"] == expected["per_patient"] | {"absent": got["per_patient"]["absent"]}


def test_confusion_shares_row_without_truth_is_nan():
    shares = confusion_shares(torch.tensor([[3, 1], [0, 0]]), ["bg", "x"])
    assert shares["bg"] == {"bg": 0.75, "x": 0.25}
    assert all(math.isnan(v) for v in shares["x"].values())


def test_empty_meter_summary():
    s = ClassMeter(CLASSES).summary()
    assert s["classes"]["a"]["per_image"]["dice"] == {"mean": None, "sd": None, "n": 0}
    assert s["confusion"]["pixels"] == [[0, 0, 0]] * 3
