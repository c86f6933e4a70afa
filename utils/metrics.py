"""Binary segmentation metrics from TP/FP/FN/TN counts accumulated over a whole set.

Zero-denominator rule: a ratio whose denominator is 0 (e.g. precision when nothing is predicted) is
float('nan'), never a silent 0 or 1.
Empty-ground-truth rule: Dice/IoU are undefined on an image (or patient) with no foreground, so those
are reported separately (how many have false positives) and left out of the Dice/IoU means.
For a multi-class task, score each class k on the binary masks `pred == k`, `target == k`:
:class:`ClassMeter` does so for classes given as {name: label value}, with the pixel confusion between them.
"""

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

# Equal-width probability bins in [0, 1] for the AUC histograms; AUC is exact up to this resolution.
AUC_BINS = 1000


def confusion_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image binary confusion counts.

    Args:
        pred: predicted foreground mask, bool or integer in {0, 1}.
        target: ground-truth foreground mask, bool or integer in {0, 1}.

    Shape: pred and target (N, H, W).

    Returns:
        int64 tensor (N, 4) of [tp, fp, fn, tn] per image, on the inputs' device.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred is {tuple(pred.shape)} and target is {tuple(target.shape)}; both must be the same (N, H, W)"
        )
    for label, mask in (("pred", pred), ("target", target)):
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{label} must be a bool or integer mask, got {mask.dtype}; threshold probabilities first")
        # A 3-class label map here would silently merge lung and lesion; this check is a GPU sync point.
        if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{label} must be a binary mask in {{0, 1}}; pass `mask == k` for class k")
    p = pred.bool().flatten(1)
    t = target.bool().flatten(1)
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    tn = p.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=1).long()


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def metrics_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Dice, IoU, precision, recall, specificity, accuracy and F1 (= Dice) from confusion counts.

    Returns:
        dict of floats; nan where the denominator is 0.
    """
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "dice": dice,
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "f1": dice,  # identical for a binary task; both keys kept for readers of either vocabulary
    }


# The figures reported per image and per patient (all of metrics_from_counts).
METRICS = ("dice", "iou", "precision", "recall", "specificity", "accuracy", "f1")
# Undefined on an empty ground truth (nothing to overlap or to recall): nan there, see the module rule.
OVERLAP_METRICS = ("dice", "iou", "f1", "recall")


def _scores(counts: Sequence[int]) -> dict:
    """Every metric of one image or patient, overlap metrics nan when its ground truth is empty, plus the counts."""
    tp, fp, fn, tn = (int(c) for c in counts)
    empty_gt = tp + fn == 0
    scores = metrics_from_counts(tp, fp, fn, tn)
    if empty_gt:
        scores.update({k: float("nan") for k in OVERLAP_METRICS})
    return {**scores, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "empty_gt": empty_gt}


def mean_sd(values: Iterable[float | None]) -> dict:
    """Mean and sample SD (ddof=1) of the defined values: None and nan (undefined figures) are left out.

    The one rule for few values: no values -> mean nan, sd nan; one value -> sd nan (a sample SD needs
    two). n counts the values used. :func:`finite_or_none` writes nan as JSON null.

    Returns:
        {"mean": float, "sd": float, "n": int}
    """
    vals = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    return {"mean": float(vals.mean()) if len(vals) else float("nan"),
            "sd": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"), "n": int(len(vals))}


def finite_or_none(obj):
    """Undefined figures (nan) become JSON null, so strict JSON readers accept results.json."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _aggregate(rows: list[dict]) -> dict[str, dict]:
    """:func:`mean_sd` of every metric over rows (images or patients); {metric: {"mean", "sd", "n"}}."""
    return {k: mean_sd(r[k] for r in rows) for k in METRICS}


def histogram_auc(pos_hist: Tensor, neg_hist: Tensor) -> float:
    """ROC AUC from per-bin counts of positive and negative pixels over equal bins in [0, 1].

    Exact up to the bin resolution: scores in the same bin are ties, and a tied positive/negative pair
    counts one half. Returns nan if either class is absent.
    """
    pos = pos_hist.double().numpy()
    neg = neg_hist.double().numpy()
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    bins = len(pos)
    centres = (np.arange(bins) + 0.5) / bins
    y_true = np.concatenate([np.zeros(bins), np.ones(bins)])
    score = np.concatenate([centres, centres])
    from sklearn.metrics import roc_auc_score  # here: importing sklearn takes 1 s of every script start

    return float(roc_auc_score(y_true, score, sample_weight=np.concatenate([neg, pos])))


class SegmentationMeter:
    """Accumulates binary segmentation results over a whole set (pooled, per image, per patient, AUC).

    Memory is bounded: per image only its 4 counts are kept, and AUC uses two AUC_BINS histograms.
    """

    def __init__(self) -> None:
        self._image_counts: list[Tensor] = []  # (N, 4) int64 on CPU per update
        self._cases: list[str | None] = []
        self._pos_hist = torch.zeros(AUC_BINS, dtype=torch.int64)
        self._neg_hist = torch.zeros(AUC_BINS, dtype=torch.int64)

    def update(
        self, probs: Tensor, target: Tensor, threshold: float = 0.5, cases: Sequence[str] | None = None
    ) -> None:
        """Add a batch.

        Args:
            probs: foreground probabilities in [0, 1] (apply sigmoid/softmax first).
            target: ground-truth foreground mask in {0, 1}.
            threshold: a pixel is predicted foreground when prob > threshold.
            cases: optional patient/volume id per image, for the per-patient summary.

        Shape: probs and target (N, H, W).
        """
        if not probs.dtype.is_floating_point:
            raise TypeError(f"probs must be floating point probabilities, got {probs.dtype}")
        if probs.shape != target.shape or probs.ndim != 3:
            raise ValueError(
                f"probs is {tuple(probs.shape)} and target is {tuple(target.shape)}; both must be the same (N, H, W)"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if cases is not None and len(cases) != probs.shape[0]:
            raise ValueError(f"got {len(cases)} case ids for a batch of {probs.shape[0]} images")
        low, high = torch.aminmax(probs.detach())
        # Out-of-range values (e.g. logits) would fall outside the AUC bins; checking them is a GPU sync point.
        if low < 0 or high > 1:
            raise ValueError(
                f"probs must lie in [0, 1], got range [{low.item():.4g}, {high.item():.4g}]; apply sigmoid/softmax"
            )

        counts = confusion_counts(probs > threshold, target)
        self._image_counts.append(counts.cpu())
        self._cases.extend(cases if cases is not None else [None] * probs.shape[0])

        bins = (probs.detach().float() * AUC_BINS).long().clamp_(max=AUC_BINS - 1)
        # One bincount over (label, bin) pairs instead of two boolean-masked ones (masking syncs on GPU).
        joint = torch.bincount((bins + AUC_BINS * target.bool().long()).flatten(), minlength=2 * AUC_BINS).cpu()
        self._neg_hist += joint[:AUC_BINS]
        self._pos_hist += joint[AUC_BINS:]

    def _counts(self) -> Tensor:
        if not self._image_counts:
            return torch.zeros(0, 4, dtype=torch.int64)
        return torch.cat(self._image_counts)

    def pooled(self) -> dict:
        """Metrics of the counts summed over every pixel of the set (see `metrics_from_counts`), plus tp/fp/fn/tn."""
        tp, fp, fn, tn = (int(c) for c in self._counts().sum(0))
        return {**metrics_from_counts(tp, fp, fn, tn), "tp": tp, "fp": fp, "fn": fn, "tn": tn}

    def per_image(self) -> list[dict]:
        """One dict per image: every metric of METRICS (dice, iou, f1 and recall nan if empty_gt), tp, fp, fn,
        tn, empty_gt, case (None if not given)."""
        return [{**_scores(c.tolist()), "case": case} for c, case in zip(self._counts(), self._cases)]

    def summary(self) -> dict:
        """Everything accumulated.

        Returns:
            dict with
            "pooled": `pooled()`;
            "per_image": {metric: {"mean", "sd", "n"}} for every metric of METRICS, over the images where
                it is defined (see :func:`mean_sd`; Dice and IoU over images with non-empty ground truth);
            "empty_gt": {n, n_with_false_positive, fraction_clean} over images with empty ground truth;
            "per_patient": None if no case ids were given, else the same aggregate over patients (Dice of
                each patient's summed counts, patients without any lesion excluded), plus "cases":
                {case: per-patient dict as in `per_image`}; images without a case id are left out;
            "auc": pixel ROC AUC from the histograms (nan if one class is absent).
        """
        images = self.per_image()
        empty = [r for r in images if r["empty_gt"]]
        n_fp = sum(r["fp"] > 0 for r in empty)

        per_patient = None
        patient_counts: dict[str, np.ndarray] = {}
        for r in images:
            if r["case"] is not None:
                counts = np.array([r["tp"], r["fp"], r["fn"], r["tn"]], dtype=np.int64)
                patient_counts[r["case"]] = patient_counts.get(r["case"], 0) + counts
        if patient_counts:
            cases = {case: _scores(counts) for case, counts in patient_counts.items()}
            per_patient = {**_aggregate(list(cases.values())), "cases": cases}

        return {
            "pooled": self.pooled(),
            "per_image": _aggregate(images),
            "empty_gt": {
                "n": len(empty),
                "n_with_false_positive": n_fp,
                "fraction_clean": _ratio(len(empty) - n_fp, len(empty)),
            },
            "per_patient": per_patient,
            "auc": histogram_auc(self._pos_hist, self._neg_hist),
        }


# Fan et al. 2020 (Inf-Net) score a probability map at 256 thresholds of its min-max-rescaled values.
INFNET_THRESHOLDS = 256


def threshold_averaged_dice(prob, target, n_thresholds: int = INFNET_THRESHOLDS) -> float:
    """Dice averaged over thresholds, as in the Inf-Net evaluation (Fan et al., IEEE TMI 2020).

    The map is min-max rescaled to [0, 1] (a constant map is left as it is), then thresholded at
    t_k = k / (n_thresholds - 1), k = 0..n_thresholds-1, predicting p > t_k; the Dice of each threshold is
    averaged. Thresholds where both prediction and ground truth are empty are left out (nan if all are).

    Shape: prob and target (H, W) (numpy or torch), target in {0, 1}. Returns a float.
    """
    p = np.asarray(prob, dtype=np.float64).ravel()
    g = np.asarray(target).ravel() > 0
    if p.shape != g.shape or p.size == 0:
        raise ValueError(f"prob and target must be non-empty and of one shape, got {np.shape(prob)} and {np.shape(target)}")
    lo, hi = p.min(), p.max()
    if hi > lo:
        p = (p - lo) / (hi - lo)
    v = p * (n_thresholds - 1)  # p > k / (n - 1)  <=>  v > k
    ks = np.arange(n_thresholds)
    pos, neg = np.sort(v[g]), np.sort(v[~g])
    tp = len(pos) - np.searchsorted(pos, ks, side="right")
    fp = len(neg) - np.searchsorted(neg, ks, side="right")
    fn = len(pos) - tp
    den = 2 * tp + fp + fn
    dice = np.divide(2.0 * tp, den, out=np.full(n_thresholds, np.nan), where=den > 0)
    return float(np.nanmean(dice)) if (den > 0).any() else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Several classes of one label map (e.g. ground-glass opacity and consolidation): the caller names them,
# {name: label value}; nothing here knows a structure's name.

BACKGROUND = "background"  # the name of label 0 in a confusion table when the caller's classes do not name it


def label_confusion(pred: Tensor, target: Tensor, num_labels: int) -> Tensor:
    """Per-image pixel confusion between the label values of two label maps.

    Args:
        pred: predicted label map, integer (or bool), values in 0..num_labels-1.
        target: ground-truth label map, same rule.
        num_labels: how many label values there are (background 0 included).

    Shape: pred and target (N, H, W).

    Returns:
        int64 tensor (N, num_labels, num_labels) on the inputs' device: [i, t, p] is the number of pixels of
        image i whose truth is t and prediction p (ground truth rows, prediction columns).
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred is {tuple(pred.shape)} and target is {tuple(target.shape)}; both must be the same (N, H, W)"
        )
    for label, labels in (("pred", pred), ("target", target)):
        if labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise TypeError(f"{label} must be an integer label map, got {labels.dtype}; take argmax first")
        if labels.numel():
            low, high = torch.aminmax(labels.long())  # out-of-range values would land in another cell: a sync point
            if low < 0 or high >= num_labels:
                raise ValueError(f"{label} has label values in [{int(low)}, {int(high)}]; "
                                 f"the classes given allow 0..{num_labels - 1}")
    n, k = pred.shape[0], num_labels
    image = torch.arange(n, device=pred.device).view(n, 1, 1)
    index = (image * k + target.long()) * k + pred.long()
    return torch.bincount(index.flatten(), minlength=n * k * k).view(n, k, k)


def class_counts(confusion: Tensor, label: int) -> Tensor:
    """Binary [tp, fp, fn, tn] of one label value (`pred == label` vs `target == label`) from a confusion.

    Shape: confusion (..., K, K) as from :func:`label_confusion` -> (..., 4).
    """
    tp = confusion[..., label, label]
    fp = confusion[..., :, label].sum(-1) - tp
    fn = confusion[..., label, :].sum(-1) - tp
    tn = confusion.sum((-2, -1)) - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=-1)


def confusion_shares(confusion: Tensor, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Row-normalised confusion: {truth name: {predicted name: share of that truth's pixels}}.

    E.g. shares["ground-glass opacity"]["consolidation"] is the fraction of ground-glass pixels called
    consolidation; the diagonal is each class's recall. A row without truth pixels is all nan.

    Shape: confusion (K, K), ground truth rows; names K labels in label-value order.
    """
    rows = confusion.double().cpu()
    totals = rows.sum(1)
    return {t: {p: _ratio(float(rows[i, j]), float(totals[i])) for j, p in enumerate(names)}
            for i, t in enumerate(names)}


def infnet_dice_per_image(prob: Tensor, target: Tensor, n_thresholds: int = INFNET_THRESHOLDS) -> list[float]:
    """Inf-Net threshold-averaged Dice of each image for one class, by the protocol's rule for absent classes.

    The Inf-Net evaluation scores Dice 0 at any threshold without a true positive, so an image without the
    class scores 0 whatever is predicted (its published per-class tables average such slices in as 0).
    :func:`threshold_averaged_dice` instead leaves out thresholds where prediction and truth are both empty
    (nan for an empty truth and a constant map), so the rule is applied here: an image whose truth is empty
    gets 0.0; any other gets :func:`threshold_averaged_dice` unchanged (the same thresholds, p > t_k).

    Args:
        prob: the class's probability (or score) map per image; each is min-max rescaled.
        target: the class's ground-truth mask (`labels == k`), bool or {0, 1}.

    Shape: prob and target (N, H, W).

    Returns:
        N floats.
    """
    if prob.shape != target.shape or prob.ndim != 3:
        raise ValueError(
            f"prob is {tuple(prob.shape)} and target is {tuple(target.shape)}; both must be the same (N, H, W)"
        )
    prob, target = prob.detach().cpu().float(), target.cpu().bool()
    return [threshold_averaged_dice(p, t, n_thresholds) if t.any() else 0.0 for p, t in zip(prob, target)]


def _absent(rows: list[dict]) -> dict:
    """The images (or patients) without a class: how many, how many got a false positive of it, its pixels."""
    absent = [r for r in rows if r["empty_gt"]]
    n_fp = sum(r["fp"] > 0 for r in absent)
    return {"n": len(absent), "n_with_false_positive": n_fp, "false_positive_pixels": sum(r["fp"] for r in absent),
            "fraction_clean": _ratio(len(absent) - n_fp, len(absent))}


class ClassMeter:
    """Accumulates multi-class segmentation results per class: pooled, per image, per patient, Inf-Net Dice,
    and the pixel confusion between classes.

    Each class k is scored on the binary masks `pred == k`, `target == k`, with the rules of this module:
    Dice/IoU means run over the images (patients) that contain the class; those without it are counted
    apart with their false positives, never as 0 or 1. Memory: a K x K count matrix per image, K the
    largest label value + 1, and one float per image per class given probabilities.
    """

    def __init__(self, classes: dict[str, int]) -> None:
        """Args: classes: {name: label value} of the classes to score (background may be one of them)."""
        values = list(classes.values())
        if not classes or any(not isinstance(v, int) or v < 0 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"classes must map names to distinct label values >= 0, got {classes}")
        self.classes = dict(classes)
        self.num_labels = max(values) + 1
        self._confusion: list[Tensor] = []  # (N, K, K) int64 on CPU per update
        self._groups: list[str | None] = []
        self._infnet: dict[str, list[tuple[float, bool]]] = {name: [] for name in classes}  # (dice, present)

    def update(self, pred: Tensor, target: Tensor, probs: dict[str, Tensor] | None = None,
               groups: Sequence[str] | None = None) -> None:
        """Add a batch.

        Args:
            pred: predicted label map (argmax of the classes, or masks merged by the caller).
            target: ground-truth label map, values 0..max label value of the classes.
            probs: optional {class name: probability map} for the Inf-Net threshold-averaged Dice.
            groups: optional patient/volume id per image, for the per-patient summary.

        Shape: pred, target and each probs map (N, H, W).
        """
        confusion = label_confusion(pred, target, self.num_labels)
        n = pred.shape[0]
        if groups is not None and len(groups) != n:
            raise ValueError(f"got {len(groups)} patient ids for a batch of {n} images")
        probs = probs or {}
        unknown = sorted(set(probs) - set(self.classes))
        if unknown:
            raise ValueError(f"probabilities given for {unknown}, which are not among the classes {list(self.classes)}")
        for name, prob in probs.items():
            if not prob.dtype.is_floating_point or prob.shape != target.shape:
                raise ValueError(f"probs[{name!r}] is {prob.dtype} {tuple(prob.shape)}; "
                                 f"a floating-point map of the target's shape {tuple(target.shape)} is needed")
        self._confusion.append(confusion.cpu())
        self._groups.extend(groups if groups is not None else [None] * n)
        for name, prob in probs.items():
            truth = target == self.classes[name]
            present = truth.flatten(1).any(1).tolist()
            self._infnet[name].extend(zip(infnet_dice_per_image(prob, truth), present))

    def _all(self) -> Tensor:
        if not self._confusion:
            return torch.zeros(0, self.num_labels, self.num_labels, dtype=torch.int64)
        return torch.cat(self._confusion)

    def names(self) -> list[str]:
        """The name of every label value 0..K-1: the caller's, else BACKGROUND for 0 and "label V" otherwise."""
        by_value = {v: name for name, v in self.classes.items()}
        return [by_value.get(v, BACKGROUND if v == 0 else f"label {v}") for v in range(self.num_labels)]

    def _per_patient(self, counts: Tensor) -> dict | None:
        patients: dict[str, np.ndarray] = {}
        for c, group in zip(counts.numpy(), self._groups):
            if group is not None:
                patients[group] = patients.get(group, 0) + c
        if not patients:
            return None
        cases = {group: _scores(c) for group, c in patients.items()}
        rows = list(cases.values())
        return {**_aggregate(rows), "absent": _absent(rows), "cases": cases}

    def _infnet_summary(self, name: str) -> dict | None:
        rows = self._infnet[name]
        if not rows:
            return None
        return {"mean": float(np.mean([d for d, _ in rows])), "n": len(rows),
                "n_absent": sum(not p for _, p in rows), "present": mean_sd(d for d, p in rows if p)}

    def summary(self) -> dict:
        """Everything accumulated, JSON-ready (nan written as None, see :func:`finite_or_none`).

        Returns:
            dict with
            "classes": {name: {
                "label": its label value,
                "pooled": metrics of the counts summed over the set, plus tp/fp/fn/tn;
                "per_image": {metric: {"mean", "sd", "n"}} over the images where it is defined (Dice, IoU,
                    F1 and recall over the images that contain the class; see :func:`mean_sd`);
                "absent": {n, n_with_false_positive, false_positive_pixels, fraction_clean} over images
                    without the class;
                "per_patient": None without patient ids, else the same over patients (each patient's counts
                    pooled), with its own "absent", plus "cases" {id: scores}; images without an id left out;
                "threshold_averaged_dice": None without probabilities, else Inf-Net's figure "mean" over
                    all n images with probabilities (absent ones as 0, see :func:`infnet_dice_per_image`),
                    n_absent, and "present" {"mean", "sd", "n"} over the images that contain the class}};
            "confusion": {"labels": names of values 0..K-1, "pixels": K x K counts (truth rows, prediction
                columns)};
            "called_as": {truth name: {predicted name: share of its pixels}}, see :func:`confusion_shares`.
        """
        confusion = self._all()
        classes = {}
        for name, value in self.classes.items():
            counts = class_counts(confusion, value)
            images = [_scores(c) for c in counts.tolist()]
            tp, fp, fn, tn = (int(c) for c in counts.sum(0))
            classes[name] = {
                "label": value,
                "pooled": {**metrics_from_counts(tp, fp, fn, tn), "tp": tp, "fp": fp, "fn": fn, "tn": tn},
                "per_image": _aggregate(images),
                "absent": _absent(images),
                "per_patient": self._per_patient(counts),
                "threshold_averaged_dice": self._infnet_summary(name),
            }
        total = confusion.sum(0)
        return finite_or_none({
            "classes": classes,
            "confusion": {"labels": self.names(), "pixels": total.tolist()},
            "called_as": confusion_shares(total, self.names()),
        })
